"""Decode attention: the extension's `toyllm::decode_attention` against PyTorch SDPA with a
per-row length mask (what the engine uses otherwise), in one run on one GPU.

    python scripts/bench_decode_attention.py --json out/bench_decode_attention.json

Both read K/V in place from a [batch, max_seq_len, kv_heads, head_dim] cache. "ours" is the
default (pass 1 on tensor cores where it applies), "cores" the same op with tensor_cores=False
(pass 1 on CUDA cores), to compare the two in the same run. Times are per call inside a CUDA
graph of 50 calls (GPU time without launch overhead: toyllm.engine.tools.timing.time_graph),
median of 5 replays; GB/s counts the K/V bytes each call must read (batch x seq_len x kv_heads
x head_dim x 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

from toyllm.engine.cached_attention import grouped_attention
from toyllm.engine.device import cuda_kernels_missing
from toyllm.engine.ops.kv_cache import decode_attention
from toyllm.engine.tools.timing import time_graph

# (batch, seq_len, q_heads, kv_heads, head_dim): Llama-1B heads, batch and context swept
SHAPES = [(1, 128, 32, 8, 64), (1, 4096, 32, 8, 64), (4, 4096, 32, 8, 64),
          (8, 8192, 32, 8, 64), (16, 4096, 32, 8, 64), (32, 4096, 32, 8, 64),
          (1, 4096, 32, 32, 64), (1, 4096, 32, 1, 64), (16, 1024, 32, 8, 128)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    missing = cuda_kernels_missing()
    if missing:
        print(f"bench_decode_attention: {missing}", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    dev = torch.device("cuda")
    rows = []
    print(f"{'shape (b, s, hq, hkv, d)':28} {'ours us':>9} {'cores us':>9} {'sdpa us':>9} "
          f"{'ours GB/s':>10} {'sdpa GB/s':>10} {'speed-up':>9} {'rel err':>8} {'cores err':>9}")
    for b, s, hq, hkv, d in SHAPES:
        gen = torch.Generator(device=dev).manual_seed(0)
        kc = torch.randn(b, s, hkv, d, device=dev, dtype=dtype, generator=gen)
        vc = torch.randn(b, s, hkv, d, device=dev, dtype=dtype, generator=gen)
        q = torch.randn(b, hq, d, device=dev, dtype=dtype, generator=gen)
        lens = torch.full((b,), s, dtype=torch.int32, device=dev)
        lens[::2] = max(1, s // 2)  # ragged rows
        allowed = (torch.arange(s, device=dev)[None, :] < lens[:, None]).unsqueeze(1)
        ours = partial(decode_attention, q, kc, vc, lens)
        sdpa = partial(grouped_attention, q.unsqueeze(1), kc, vc, allowed)
        err = ((ours().float() - sdpa()[:, 0].float()).norm() / sdpa().float().norm()).item()
        t_ours, t_sdpa = time_graph(ours, 50, 5), time_graph(sdpa, 50, 5)
        cores = partial(decode_attention, q, kc, vc, lens, tensor_cores=False)
        err_cores = ((cores().float() - sdpa()[:, 0].float()).norm()
                     / sdpa().float().norm()).item()
        t_cores = time_graph(cores, 50, 5)
        nbytes = 2 * int(lens.sum()) * hkv * d * kc.element_size()
        row = dict(batch=b, seq_len=s, q_heads=hq, kv_heads=hkv, head_dim=d, ours_us=t_ours,
                   cores_us=t_cores, sdpa_us=t_sdpa, ours_gbs=nbytes / t_ours / 1e3,
                   sdpa_gbs=nbytes / t_sdpa / 1e3,
                   speedup=t_sdpa / t_ours, rel_err=err, cores_rel_err=err_cores)
        rows.append(row)
        print(f"{str((b, s, hq, hkv, d)):28} {t_ours:9.1f} {t_cores:9.1f} {t_sdpa:9.1f} "
              f"{row['ours_gbs']:10.0f} {row['sdpa_gbs']:10.0f} {row['speedup']:9.2f} "
              f"{err:8.1e} {err_cores:9.1e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "dtype": args.dtype,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
