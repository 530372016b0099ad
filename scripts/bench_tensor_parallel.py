"""Tensor-parallel decode speed: one GPU against N GPUs (NCCL) in the same run, batch 1, CUDA
graphs, random weights of the Llama-8B and Llama-1B shapes, with each GPU's share of the
weight-read roofline (issue 23's targets: 8B on 2 GPUs >= 1.6x one GPU's tok/s).

    python scripts/bench_tensor_parallel.py [--shapes llama-8b,llama-1b] [--ranks 2] \
        [--dtype bf16] [--context 128] [--new-tokens 128] [--json out.json]

`--device cpu --dtype fp32 --shapes tiny` runs the same code on gloo ranks (a smoke run of the
script, not a measurement the issue asks for).

Per shape: the one-GPU engine on cuda:0 (toyllm's Engine, CUDA graphs), then the same request
on N ranks (TensorParallelEngine: each rank draws its slice of the same seeded weights).
tok/s is GenerationStats.decode_tok_per_s, the median of 3 timed requests after a warm-up
(engine/tools/bench.py's time_engine, the figure `toyllm bench` reports). The roofline: a
decode token reads every layer weight, the output head and the K/V written so far; on N GPUs
each reads 1/N of them at its own copy bandwidth (measured here on every GPU), so
roofline tok/s = bandwidth / (bytes per token / N). The gap between the N-GPU roofline and the
measurement is mostly the 2 all-reduces per layer (plus the embedding's and the logits'
gather) that one GPU does not pay: the 1B shape shows where they start to dominate.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from toyllm.engine.device import DTYPES, dtype_name
from toyllm.engine.generate import Engine
from toyllm.engine.tensor_parallel.parallel_engine import TensorParallelEngine
from toyllm.engine.tensor_parallel.plan import check_ranks
from toyllm.engine.tools.bench import copy_bandwidth, random_prompts, time_engine
from toyllm.models.config import ModelConfig, config_from_dict, load_config
from toyllm.models.llama import build_model
from toyllm.models.shipped import resolve_config

# Llama-3.1-8B's shape (issue 23); the 1B shape is the shipped configs/llama-1b.toml
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                num_kv_heads=8, head_dim=128, intermediate_size=14336, max_seq_len=8192,
                rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=False)


def shape(name: str) -> ModelConfig:
    if name == "llama-8b":
        return config_from_dict(dict(LLAMA_8B, name="llama-8b"))
    return load_config(resolve_config(name))


def toml_of(config: ModelConfig, path: Path) -> Path:
    """The config as a TOML file the ranks load (random weights)."""
    lines = []
    for key, value in config.to_dict().items():
        if key in ("name", "rope_scaling"):
            continue
        lines.append(f"{key} = {json.dumps(value)}")
    if config.rope_scaling is not None:
        lines.append("[rope_scaling]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in asdict(config.rope_scaling).items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def bytes_per_token(config: ModelConfig, element: int, context: float) -> float:
    """Bytes one decode token reads on one GPU: the layers' weights, the norms, the output
    head (the embedding reads one row), the K/V of `context` positions."""
    counts = config.param_counts()
    head = config.vocab_size * config.hidden_size  # tied or not, the head is read whole
    weights = counts["attention"] + counts["mlp"] + counts["norms"] + head
    return weights * element + config.kv_bytes_per_token(element) * context


@dataclass
class Row:
    shape: str
    gpus: int
    tok_s: float
    ms_per_token: float
    speedup: float
    bytes_per_token_per_gpu: float
    roofline_tok_s: float
    of_roofline: float


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-8b,llama-1b")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--context", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.ranks < 2 or (cuda and have < args.ranks):
        ap.error(f"--ranks {args.ranks}: expected 2 or more, with as many GPUs ({have} visible)")
    if args.context < 1 or args.new_tokens < 2:
        ap.error("--context >= 1 and --new-tokens >= 2 expected")
    dtype = DTYPES[args.dtype]
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    configs = {n: shape(n) for n in names}
    for n, c in configs.items():
        check_ranks(c, args.ranks, where=n)
    devices = [torch.device("cuda", i) if cuda else torch.device("cpu")
               for i in range(args.ranks)]
    bandwidth = [copy_bandwidth(d) for d in devices]
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"{card} x{args.ranks}; copy bandwidth per GPU (GB/s): "
          + ", ".join(f"{b / 1e9:.0f}" for b in bandwidth), flush=True)
    rows: list[Row] = []
    avg_context = args.context + args.new_tokens / 2
    element = torch.finfo(dtype).bits // 8
    with tempfile.TemporaryDirectory(prefix="toyllm-bench-tp-") as tmp:
        for name, config in configs.items():
            prompts = random_prompts(1, args.context, config.vocab_size)
            total = bytes_per_token(config, element, avg_context)
            model = build_model(config, device=devices[0], dtype=dtype, seed=0)
            one, _ = time_engine(Engine(model, cuda_graph=cuda), prompts, args.new_tokens)
            del model
            gc.collect()  # an Engine is a reference cycle: free its weights and graphs now
            if cuda:
                torch.cuda.empty_cache()
            print(f"{name}: 1 GPU {one:.1f} tok/s", flush=True)
            with TensorParallelEngine(str(toml_of(config, Path(tmp) / f"{name}.toml")),
                                      tensor_parallel=args.ranks, device=args.device,
                                      dtype=dtype, random_weights=True, with_tokenizer=False,
                                      cuda_graph=cuda) as engine:
                many, _ = time_engine(engine, prompts, args.new_tokens)
            print(f"{name}: {args.ranks} GPUs {many:.1f} tok/s", flush=True)
            for gpus, tok_s in ((1, one), (args.ranks, many)):
                per_gpu = total / gpus
                roof = min(bandwidth[:gpus]) / per_gpu
                rows.append(Row(name, gpus, tok_s, 1e3 / tok_s, tok_s / one, per_gpu, roof,
                                tok_s / roof))
    how = "CUDA graphs" if cuda else "CPU"
    print(f"\nbatch 1, {dtype_name(dtype)}, {how}, prompt {args.context}, "
          f"{args.new_tokens} new tokens; roofline = one GPU's copy bandwidth / its share of "
          "the bytes a token reads")
    print(f"{'shape':10} {'GPUs':>4} {'tok/s':>8} {'ms/tok':>7} {'speedup':>8} "
          f"{'MB/tok/GPU':>11} {'roofline':>9} {'% roof':>7}")
    for r in rows:
        print(f"{r.shape:10} {r.gpus:>4} {r.tok_s:>8.1f} {r.ms_per_token:>7.3f} "
              f"{r.speedup:>7.2f}x {r.bytes_per_token_per_gpu / 1e6:>11.1f} "
              f"{r.roofline_tok_s:>9.0f} {100 * r.of_roofline:>6.1f}%")
    target = [r for r in rows if r.shape == "llama-8b" and r.gpus == args.ranks]
    if target and args.ranks == 2:
        verdict = "met" if target[0].speedup >= 1.6 else "NOT met"
        print(f"target (issue 23): llama-8b on 2 GPUs >= 1.6x one GPU: {target[0].speedup:.2f}x,"
              f" {verdict}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "card": card, "ranks": args.ranks, "dtype": dtype_name(dtype),
            "context": args.context, "new_tokens": args.new_tokens,
            "bandwidth_gb_s": [b / 1e9 for b in bandwidth],
            "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
