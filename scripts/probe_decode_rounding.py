"""Which rounding of the decode-attention kernel tracks the prefill's attention kernel best?

The harness compares the cached engine (prefill through SDPA, decode through
`toyllm::decode_attention`) with the no-cache forward (SDPA over the whole sequence) in the
same low precision. Both round p to the cache dtype before P @ V, against a running max that
depends on how the kernel tiles the keys. This script runs the bf16/fp16 CUDA cases of the
harness for every SDPA backend PyTorch has here (put first in the priority list) and every
kernel rounding setting (the decode-attention op's `tile` x `reverse` arguments, on tensor cores
and on CUDA cores: `tensor_cores`, given to every call the engine makes), and prints the worst
step's ||engine - reference|| / ||reference|| per case. Tolerances are not involved: this
measures, the harness judges.

    python scripts/probe_decode_rounding.py --dtypes bf16 --json out/probe.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from toyllm.engine import cached_attention
from toyllm.engine.check.harness import run_matrix, select_cases
from toyllm.engine.device import cuda_kernels_missing
from toyllm.engine.ops.kv_cache import decode_attention

BACKENDS = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
ALL = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
       SDPBackend.MATH]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bf16", help="comma list of fp16, bf16")
    parser.add_argument("--configs", default=None, help="case-name filters (comma list)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma list")
    parser.add_argument("--tiles", default="64,128")
    parser.add_argument("--orders", default="1,0", help="reverse: 1 last tile first, 0 first")
    parser.add_argument("--mma", default="1,0", help="tensor_cores: 1 on, 0 CUDA cores")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    missing = cuda_kernels_missing()
    if missing:
        print(f"probe_decode_rounding: {missing}", file=sys.stderr)
        return 2
    cases = select_cases(args.configs.split(",") if args.configs else None,
                         args.dtypes.split(","), "cuda")
    rows = []
    for backend, tile, order, mma in itertools.product(
            args.backends.split(","), args.tiles.split(","), args.orders.split(","),
            args.mma.split(",")):
        # every decode-attention call of the engine gets this setting's arguments
        cached_attention.decode_attention = functools.partial(
            decode_attention, tile=int(tile), reverse=order == "1", tensor_cores=mma == "1")
        first = BACKENDS[backend]
        setting = (f"{backend} tile={tile} {'reverse' if order == '1' else 'forward'} "
                   f"{'mma' if mma == '1' else 'cores'}")
        try:
            if first is None:
                report = run_matrix(cases, hf=False)
            else:
                with sdpa_kernel([first] + [b for b in ALL if b != first], set_priority=True):
                    report = run_matrix(cases, hf=False)
        except Exception as exc:  # a backend this build lacks: say so, go on
            print(f"{setting}: failed: {type(exc).__name__}: {exc}")
            continue
        rels = {f"{c['name']}/{c['dtype']}": c["rel"] for c in report["cases"]}
        passed = sum(1 for c in report["cases"] if c["verdict"] == "PASS")
        worst = max((r for r in rels.values() if isinstance(r, float)), default=float("nan"))
        print(f"{setting:40s} passed {passed}/{len(rels)}  worst rel {worst:.3g}  " +
              " ".join(f"{k.split('/')[0]}={v:.2g}" for k, v in rels.items()
                       if isinstance(v, float) and v > 0), flush=True)
        rows.append({"backend": backend, "tile": int(tile), "reverse": order == "1",
                     "tensor_cores": mma == "1",
                     "passed": passed, "total": len(rels), "rel": rels})
    if args.json is not None:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                         "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
