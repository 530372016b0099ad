"""Paged decode attention: `toyllm::paged_decode_attention` over shuffled blocks against the
contiguous `toyllm::decode_attention` on the same keys, in one run on one GPU.

    python scripts/bench_paged_decode_attention.py --json out/bench_paged_decode_attention.json

Both read K/V in place: the contiguous op from a [batch, capacity, kv_heads, head_dim] cache,
the paged one from pools [num_blocks, block_size, kv_heads, head_dim] through a block table
whose blocks are shuffled over the pool (as a serving engine's tables end up). The two run the
same kernels and plan, so "paged / contig" is the price of the table lookups and of scattered
blocks, and the outputs are compared bit for bit ("same bits"). Times are per call inside a
CUDA graph of 50 calls (toyllm.engine.tools.timing.time_graph), median of 5 replays; GB/s
counts the K/V bytes each call must read. A last column times paged_kv_write of one decode
token per row (the paged twin of kv_update).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

from toyllm.engine.device import cuda_kernels_missing
from toyllm.engine.ops.kv_cache import decode_attention
from toyllm.engine.ops.paged_cache import paged_decode_attention, paged_kv_write
from toyllm.engine.tools.timing import time_graph

# (batch, seq_len, q_heads, kv_heads, head_dim): Llama-1B heads, batch and context swept; half
# the rows at seq_len, half at seq_len // 2
SHAPES = [(1, 4096, 32, 8, 64), (16, 4096, 32, 8, 64), (64, 1024, 32, 8, 64),
          (256, 600, 32, 8, 64), (16, 1024, 32, 8, 128)]
BLOCK_SIZES = [16, 32, 256]
# A serving engine's decode step (the random workload of `toyllm bench --workload random` some
# 150 steps in): 256 rows whose lengths are uniform in [250, 1200].
SERVING_SHAPES = [(256, 1200, 32, 8, 64)]
SERVING_MIN_LEN = 250


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--serving", action="store_true",
                    help="only the serving step's shape (lengths uniform in [250, 1200]), with "
                         "block sizes 16 to 256 and each tile the kernel takes (64, 128)")
    args = ap.parse_args(argv)
    missing = cuda_kernels_missing()
    if missing:
        print(f"bench_paged_decode_attention: {missing}", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dev = torch.device("cuda")
    rows = []
    print(f"{'shape (b, s, hq, hkv, d)':28} {'block':>5} {'contig us':>9} {'paged us':>9} "
          f"{'paged GB/s':>10} {'paged/contig':>12} {'same bits':>9} {'write us':>9}")
    shapes = SERVING_SHAPES if args.serving else SHAPES
    block_sizes = [16, 32, 64, 128, 256] if args.serving else BLOCK_SIZES
    tiles = [0, 64, 128] if args.serving else [0]
    for b, s, hq, hkv, d in shapes:
        gen = torch.Generator(device=dev).manual_seed(0)
        kc = torch.randn(b, s, hkv, d, device=dev, dtype=dtype, generator=gen)
        vc = torch.randn(b, s, hkv, d, device=dev, dtype=dtype, generator=gen)
        q = torch.randn(b, hq, d, device=dev, dtype=dtype, generator=gen)
        if args.serving:
            lens = torch.randint(SERVING_MIN_LEN, s + 1, (b,), dtype=torch.int32,
                                 generator=torch.Generator().manual_seed(0)).to(dev)
        else:
            lens = torch.full((b,), s, dtype=torch.int32, device=dev)
            lens[::2] = max(1, s // 2)  # ragged rows
        nbytes = 2 * int(lens.sum()) * hkv * d * kc.element_size()
        for bs, tile in [(bs, t) for bs in block_sizes for t in tiles]:
            width = -(-s // bs)
            # The contiguous cache of the table's capacity, and the same keys in shuffled blocks.
            cap = width * bs
            kcap = torch.zeros(b, cap, hkv, d, device=dev, dtype=dtype)
            vcap = torch.zeros_like(kcap)
            kcap[:, :s], vcap[:, :s] = kc, vc
            order = torch.randperm(b * width, generator=torch.Generator().manual_seed(bs))
            table = order.view(b, width).to(torch.int32).to(dev)
            k_pool = torch.empty(b * width, bs, hkv, d, device=dev, dtype=dtype)
            v_pool = torch.empty_like(k_pool)
            k_pool[table.long().flatten()] = kcap.view(b * width, bs, hkv, d)
            v_pool[table.long().flatten()] = vcap.view(b * width, bs, hkv, d)
            contig = partial(decode_attention, q, kcap, vcap, lens, tile=tile)
            paged = partial(paged_decode_attention, q, k_pool, v_pool, table, lens, tile=tile)
            same = bool(torch.equal(contig(), paged()))
            t_contig, t_paged = time_graph(contig, 50, 5), time_graph(paged, 50, 5)
            new_k = torch.randn(b, hkv, d, device=dev, dtype=dtype, generator=gen)
            slots = (table[:, 0].long() * bs + bs - 1).contiguous()  # one token per row
            write = partial(paged_kv_write, k_pool, v_pool, new_k, new_k, slots)
            t_write = time_graph(write, 50, 5)
            row = dict(batch=b, seq_len=s, q_heads=hq, kv_heads=hkv, head_dim=d, block_size=bs,
                       tile=tile, serving=args.serving,
                       contig_us=t_contig, paged_us=t_paged, paged_gbs=nbytes / t_paged / 1e3,
                       ratio=t_paged / t_contig, same_bits=same, write_us=t_write)
            rows.append(row)
            print(f"{str((b, s, hq, hkv, d)) + (f' t{tile}' if tile else ''):28} {bs:5d} "
                  f"{t_contig:9.1f} {t_paged:9.1f} "
                  f"{row['paged_gbs']:10.0f} {row['ratio']:12.3f} {str(same):>9} "
                  f"{t_write:9.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "dtype": args.dtype,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
