"""Where do the cached engine and the no-cache reference part in low precision?

`toyllm check` compares the engine's teacher-forced logits with the reference's (models/, plain
torch) in the same dtype; in bf16 both sit about as far from an fp32 run of the same weights, and
from each other, as the 1e-2 bound. This probe runs one case of the check's matrix (its model,
prompts and fed tokens, as engine/check/harness.py draws them) through three paths:

* ``fp32``: the reference forward on the same (already rounded) weights upcast to fp32;
* ``ref``: the reference forward in the case's dtype (what the check compares against);
* ``eng``: the cached engine in the case's dtype (prefill, chunked if the case is, then one
  decode step at a time, ragged rows going inactive as in the harness), eagerly (no CUDA
  graph: the hooks are Python).

and records the same intermediate values of every layer on each (hooks on the model's modules
for the reference runs; wrappers of the engine forward's products and layer function for the
engine), token by token, aligned by (row, position). Per point it prints the relative error
||a-b||/||b|| (mean over tokens / worst token) of ref and eng against fp32, of eng against ref
(all tokens, prefill tokens, decode tokens), of the reference against itself run over each
sequence plus ``--pad`` later tokens (``padded-ref``: causally the same values, so whatever it
shows is the reference's own dependence on the sequence's length), and the fraction of elements
whose bits differ between eng and ref (``eng!=ref``). The first point where eng!=ref leaves 0 is
where the two computations part. Then: the SDPA backend each path's calls took, the worst
logits step (row, position, prefill or decode), and what the check's metric reads for the
reference against itself with ``--nudge`` of layer 0's attention outputs moved by one ulp.

Points per layer i (the engine's fused one-row kernels hide some of them: those print '-'):
  L{i}.norm1    input RMSNorm output (the q/k/v product's input)
  L{i}.qkv      the q, k, v products (before RoPE)
  L{i}.core     attention output (the o product's input)
  L{i}.attn     o product output
  L{i}.mid      residual stream after the attention half
  L{i}.norm2    post-attention RMSNorm output
  L{i}.gate_up  the gate and up products
  L{i}.mlp      down product output
  L{i}.out      residual stream after the layer
then ``norm`` (the final RMSNorm) and ``logits``.

``--swap OP`` makes the reference (ref and fp32 alike) compute OP another way, to test a
rounding hypothesis: ``sdpa-math`` (every SDPA call on the math backend), ``attn-fp32`` (the
reference's attention in fp32, rounded once to the dtype). Options that change the
engine instead: ``--engine-fusion none`` (the models/ torch code for every elementwise piece).

    python scripts/probe_bf16_divergence.py --device cpu --configs gqa-ragged
    python scripts/probe_bf16_divergence.py --device cuda \
        --configs mqa-ragged-chunked,gqa-ragged-eager,gqa-ragged-sdpa --json out/probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend

from toyllm.engine import forward as engine_forward
from toyllm.engine.check.cases import BASE_CASES, CUDA_ONLY_CASES, Case
from toyllm.engine.check.harness import (
    _fp32_twin,
    _random_ids,
    build_case_model,
    decode_steps,
)
from toyllm.engine.device import DTYPES
from toyllm.engine.generate import Engine
from toyllm.engine.settings import Fusion
from toyllm.models.llama import Transformer

DEFAULT_CONFIGS = "mqa-ragged-chunked,gqa-ragged-eager,gqa-ragged-sdpa"
POINTS = ("norm1", "qkv", "core", "attn", "mid", "norm2", "gate_up", "mlp", "out")

# (row, position) -> point -> [width] tensor (fp64 on the CPU)
Record = dict[tuple[int, int], dict[str, Tensor]]


def _store(record: Record, point: str, value: Tensor, where: list[tuple[int, int] | None]) -> None:
    """value [B, T, ...] of one forward call; where[b * T + t] is the (row, position) of that
    token, or None for a token not measured (an inactive decode row). A value with T == 1 for
    a call of more tokens (the engine's last_only) belongs to each row's last token."""
    flat = value.detach().reshape(value.shape[0] * value.shape[1], -1).double().cpu()
    if flat.shape[0] != len(where):
        per_row = len(where) // value.shape[0]
        where = [where[(b + 1) * per_row - 1] for b in range(value.shape[0])]
    for key, v in zip(where, flat, strict=True):
        if key is not None:
            record.setdefault(key, {})[point] = v


# the reference: hooks on the model's modules ---------------------------------------------
@torch.inference_mode()
def run_reference(model: Transformer, seqs: list[list[int]]) -> Record:
    """One causal forward per row over its whole sequence; every point of every token."""
    record: Record = {}
    where: list[tuple[int, int] | None] = []
    hooks = []

    def put(point: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Tensor, ...], out: Tensor) -> None:
            _store(record, point, out, where)
        return hook

    def put_input(point: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Tensor, ...]) -> None:
            _store(record, point, args[0], where)
        return hook

    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        hooks += [
            layer.input_layernorm.register_forward_hook(put(f"L{i}.norm1")),
            attn.q_proj.register_forward_hook(put(f"L{i}.q")),
            attn.k_proj.register_forward_hook(put(f"L{i}.k")),
            attn.v_proj.register_forward_hook(put(f"L{i}.v")),
            attn.o_proj.register_forward_pre_hook(put_input(f"L{i}.core")),
            attn.o_proj.register_forward_hook(put(f"L{i}.attn")),
            layer.post_attention_layernorm.register_forward_pre_hook(put_input(f"L{i}.mid")),
            layer.post_attention_layernorm.register_forward_hook(put(f"L{i}.norm2")),
            mlp.gate_proj.register_forward_hook(put(f"L{i}.gate")),
            mlp.up_proj.register_forward_hook(put(f"L{i}.up")),
            mlp.down_proj.register_forward_hook(put(f"L{i}.mlp")),
            layer.register_forward_hook(put(f"L{i}.out")),
        ]
    hooks += [model.norm.register_forward_hook(put("norm")),
              model.lm_head.register_forward_hook(put("logits"))]
    try:
        for row, ids in enumerate(seqs):
            where[:] = [(row, p) for p in range(len(ids))]
            model(torch.tensor([ids], device=model.device),
                  torch.arange(len(ids), device=model.device).unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    for i in range(len(model.layers)):  # the engine's fused products, as one vector each
        for values in record.values():
            values[f"L{i}.qkv"] = torch.cat([values.pop(f"L{i}.{n}") for n in "qkv"])
            values[f"L{i}.gate_up"] = torch.cat([values.pop(f"L{i}.{n}") for n in ("gate", "up")])
    return record


# the engine: wrappers of its forward's products and layer function --------------------------
class _Recording:
    """Wraps one EngineForward: its products (Gemv.linear, silu_mul_linear) name their point
    by the weight they read; its layer function gives the streams and the MLP output."""

    def __init__(self, fwd: engine_forward.EngineForward, record: Record) -> None:
        self.record = record
        self.where: list[tuple[int, int] | None] = []
        weights: dict[int, tuple[int, str]] = {}
        for i, w in enumerate(fwd.layers):
            weights[w.qkv.data_ptr()] = (i, "qkv")
            weights[w.o.data_ptr()] = (i, "o")
            weights[w.gate_up.data_ptr()] = (i, "gate_up")
            weights[w.down.data_ptr()] = (i, "down")
        head = fwd.model.lm_head.weight.data_ptr()
        gemv, layer = fwd.gemv, fwd._layer
        recording = self

        class RecordingGemv:
            def __getattr__(self, name: str) -> Any:
                return getattr(gemv, name)

            def linear(self, x: Tensor, weight: Tensor) -> Tensor:
                out = gemv.linear(x, weight)
                recording.product(weights, head, x, weight, out)
                return out

            def silu_mul_linear(self, gate_up: Tensor, weight: Tensor,
                                silu_mul: Callable[[Tensor], Tensor], fused: bool = True) -> Tensor:
                i, _ = weights[weight.data_ptr()]
                recording.put(f"L{i}.gate_up", gate_up)
                return gemv.silu_mul_linear(gate_up, weight, silu_mul, fused)

        def recording_layer(i: int, w: Any, x: Tensor, pending: Tensor | None, *rest: Any
                            ) -> tuple[Tensor, Tensor]:
            mid, mlp = layer(i, w, x, pending, *rest)
            recording.put(f"L{i}.mid", mid)
            recording.put(f"L{i}.mlp", mlp)
            recording.put(f"L{i}.out", mid + mlp)  # the sum the next norm computes
            return mid, mlp

        fwd.gemv = RecordingGemv()  # type: ignore[assignment]
        fwd._layer = recording_layer  # type: ignore[method-assign]
        fwd.cpu_step = False  # one call per step hides every point: the per-op path instead

    def put(self, point: str, value: Tensor) -> None:
        _store(self.record, point, value, self.where)

    def product(self, weights: dict[int, tuple[int, str]], head: int, x: Tensor, weight: Tensor,
                out: Tensor) -> None:
        ptr = weight.data_ptr()
        if ptr == head:
            self.put("norm", x)
            self.put("logits", out)
            return
        i, name = weights[ptr]
        if name == "qkv":
            self.put(f"L{i}.norm1", x)
            self.put(f"L{i}.qkv", out)
        elif name == "o":
            self.put(f"L{i}.core", x)
            self.put(f"L{i}.attn", out)
        elif name == "gate_up":
            self.put(f"L{i}.norm2", x)
            self.put(f"L{i}.gate_up", out)


@torch.inference_mode()
def run_engine(engine: Engine, prompts: list[list[int]], conts: list[list[int]]) -> Record:
    """engine/check/harness.py's teacher-forced run, recording every point of every token."""
    record: Record = {}
    rec = _Recording(engine.forward, record)
    rows = len(prompts)
    cache = engine.prepare_cache(rows, engine.max_seq_len)
    for r in range(rows, cache.batch_size):
        cache.set_active(r, False)
    chunk = engine.prefill_chunk
    for b, p in enumerate(prompts):
        size = chunk or len(p)
        for s in range(0, len(p), size):
            rec.where = [(b, s + t) for t in range(min(size, len(p) - s))]
            # one chunk at a time, so each forward call's tokens are known
            engine.prefill_chunk = None
            engine.prefill(cache, b, p[s : s + size])
        engine.prefill_chunk = chunk
    for s in range(max(len(c) for c in conts)):
        for b, c in enumerate(conts):
            if s == len(c) and cache.is_active(b):
                cache.set_active(b, False)
        rec.where = [(b, len(prompts[b]) + s) if s < len(c) else None
                     for b, c in enumerate(conts)]
        feed = [c[s] if s < len(c) else 0 for c in conts]
        engine.decode_step(cache, rows, torch.tensor(feed, device=engine.device))
    return record


# which SDPA backend each path's calls take ------------------------------------------------
@contextmanager
def sdpa_backends(seen: Counter[str]) -> Iterator[None]:
    """Counts, while the block runs, the backend PyTorch picks for each SDPA call (flash,
    cuDNN, efficient, math) with how it was called: causal, with a mask, or GQA heads."""
    plain = F.scaled_dot_product_attention

    def counted(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> Tensor:
        choice = torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal,
                                         scale=scale, enable_gqa=enable_gqa)
        how = ("causal" if is_causal else "mask" if attn_mask is not None else "full") + \
            (" gqa" if enable_gqa else "")
        seen[f"{SDPBackend(choice).name.lower()} ({how}, {q.shape[-2]} rows)"] += 1
        return plain(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                     scale=scale, enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = counted
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


# the reference's alternatives (--swap) -----------------------------------------------------
@contextmanager
def swapped(swap: str | None) -> Iterator[None]:
    """The reference computing one piece another way while the block runs."""
    if swap is None:
        yield
        return
    from toyllm.models import llama

    if swap == "sdpa-math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            yield
        return
    if swap == "attn-fp32":
        plain = llama.causal_attention

        def fp32_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return plain(q.float(), k.float(), v.float()).to(q.dtype)

        llama.causal_attention = fp32_attention
        try:
            yield
        finally:
            llama.causal_attention = plain
        return
    raise SystemExit(f"--swap: expected sdpa-math or attn-fp32, got {swap!r}")


# comparison ---------------------------------------------------------------------------------
def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(fp32: Record, ref: Record, eng: Record, padded: Record, prompts: list[list[int]],
            logits_from: dict[int, int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per point: mean and worst relative error over the tokens every side recorded (ref vs
    fp32, eng vs fp32, eng vs ref with prefill and decode tokens apart, and the reference
    against itself over a longer sequence: padded vs ref), and the fraction of elements whose
    bits differ between eng and ref. logits_from[row]: the first position whose logits the
    check compares (the prompt's last); earlier logits are left out. Also the worst compared
    logits step of eng vs ref: (row, position, phase, value)."""
    seen = {point for values in fp32.values() for point in values}
    order = [f"L{i}.{p}" for i in range(len(seen)) for p in POINTS] + ["norm", "logits"]
    points = [p for p in order if p in seen]
    rows = []
    worst: dict[str, Any] = {"rel": -1.0}
    for point in points:
        errs: dict[str, list[float]] = defaultdict(list)
        differing, elements = 0, 0
        for key, truth in fp32.items():
            row, pos = key
            if point not in truth or point not in ref.get(key, {}):
                continue
            phase = "decode" if pos >= len(prompts[row]) else "prefill"
            if point == "logits" and pos < logits_from[row]:
                continue  # the check does not compare these
            r = ref[key][point]
            errs["ref"].append(_rel(r, truth[point]))
            p = padded.get(key, {}).get(point)
            if p is not None:
                errs["padded-ref"].append(_rel(p, r))
            e = eng.get(key, {}).get(point)
            if e is not None:
                rel = _rel(e, r)
                errs["eng"].append(_rel(e, truth[point]))
                errs[f"eng-ref {phase}"].append(rel)
                errs["eng-ref"].append(rel)
                differing += int((e != r).sum())
                elements += e.numel()
                if point == "logits" and rel > worst["rel"]:
                    worst = {"rel": rel, "row": row, "position": pos, "phase": phase}
        out: dict[str, Any] = {"point": point}
        for name, values in errs.items():
            t = torch.tensor(values, dtype=torch.float64)
            out[name] = {"mean": t.mean().item(), "max": t.max().item(), "n": len(values)}
        if elements:
            out["differing"] = differing / elements
        rows.append(out)
    return rows, worst


COLUMNS = ("ref", "eng", "eng-ref", "eng-ref prefill", "eng-ref decode", "padded-ref")


def render(rows: list[dict[str, Any]]) -> str:
    """One line per point: mean / worst token of each column, and eng's differing elements."""
    lines = [f"{'point':10s}" + "".join(f"{c:>20s}" for c in COLUMNS) + f"{'eng!=ref':>10s}"]
    for r in rows:
        cells = []
        for c in COLUMNS:
            s = r.get(c)
            cells.append(f"{'-':>20s}" if s is None else f"{s['mean']:>10.1e}/{s['max']:<8.1e} ")
        frac = r.get("differing")
        cells.append(f"{'-':>10s}" if frac is None else f"{frac:>10.1e}")
        lines.append(f"{r['point']:10s}" + "".join(cells))
    return "\n".join(lines)


def nudge(x: Tensor, fraction: float, gen: torch.Generator) -> Tensor:
    """x (fp16/bf16) with a random `fraction` of its nonzero elements moved by one ulp, up or
    down: the smallest change a different summation order makes to a rounded result."""
    bits = x.contiguous().view(torch.int16)
    draw = torch.rand(x.shape, generator=gen).to(x.device)
    step = torch.where(torch.rand(x.shape, generator=gen) < 0.5, 1, -1).to(bits)
    return torch.where((draw < fraction) & (x != 0), bits + step, bits).view(x.dtype)


@contextmanager
def nudged(model: Transformer, fraction: float) -> Iterator[None]:
    """The model's layer-0 attention output (the o product's input) nudged by `nudge`."""
    gen = torch.Generator().manual_seed(1)
    hook = model.layers[0].self_attn.o_proj.register_forward_pre_hook(
        lambda module, args: (nudge(args[0], fraction, gen),))
    try:
        yield
    finally:
        hook.remove()


def probe_case(case: Case, swap: str | None, fusion: Fusion | None, pad: int,
               nudge_fraction: float) -> dict[str, Any]:
    """The points of the case's three paths, the reference over `pad` more tokens than each
    row's sequence, and (low precision) the reference with layer 0's attention output nudged."""
    model = build_case_model(case)
    gen = torch.Generator().manual_seed(case.seed)
    vocab = model.config.vocab_size
    prompts = [_random_ids(n, vocab, gen) for n in case.prompt_lens]
    conts = [_random_ids(n, vocab, gen) for n in decode_steps(case.prompt_lens, case.new_tokens)]
    seqs = [p + c for p, c in zip(prompts, conts, strict=True)]
    limit = max(len(s) for s in seqs) if case.fill_to_end else None
    settings = case.settings()
    if fusion is not None:
        settings = replace(settings, fusion=fusion)
    engine = Engine(model, max_seq_len=limit, prefill_chunk=case.prefill_chunk,
                    cuda_graph=False, settings=settings)
    backends: dict[str, Counter[str]] = {"eng": Counter(), "ref": Counter()}
    with sdpa_backends(backends["eng"]):
        eng = run_engine(engine, prompts, conts)
    extra = _random_ids(pad, vocab, torch.Generator().manual_seed(case.seed + 7))
    with swapped(swap):
        with sdpa_backends(backends["ref"]):
            ref = run_reference(model, seqs)
        padded = run_reference(model, [s + extra for s in seqs]) if pad > 0 else {}
        fp32 = run_reference(_fp32_twin(model), seqs)
        low = model.dtype in (torch.float16, torch.bfloat16)
        if low and nudge_fraction > 0:
            with nudged(model, nudge_fraction):
                nudged_ref = run_reference(model, seqs)
    logits_from = {b: len(p) - 1 for b, p in enumerate(prompts)}
    rows, worst = compare(fp32, ref, eng, padded, prompts, logits_from)
    result = {"case": case.name, "dtype": case.dtype, "device": case.device, "swap": swap,
              "engine_fusion": settings.fusion.name, "pad": pad, "points": rows,
              "worst_logits_step": worst,
              "sdpa": {path: dict(seen) for path, seen in backends.items()}}
    if low and nudge_fraction > 0:
        # the reference against itself with a few ulps moved: where the check's metric lands
        # for a change far below any bug
        _, moved = compare(fp32, ref, nudged_ref, {}, prompts, logits_from)
        result["nudge"] = {"fraction": nudge_fraction, "worst_logits_step": moved}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default="bf16", help="bf16, fp16 (CUDA) or fp32")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="comma list of case names of the check's matrix")
    parser.add_argument("--swap", default=None, help="sdpa-math or attn-fp32 (the reference)")
    parser.add_argument("--engine-fusion", default=None,
                        help="the engine's fusion level (none ... full); default the case's")
    parser.add_argument("--pad", type=int, default=8,
                        help="tokens appended for the padded reference (0: none)")
    parser.add_argument("--nudge", type=float, default=1e-3,
                        help="fraction of layer 0's attention outputs moved by one ulp in the "
                             "nudged reference (0: none)")
    parser.add_argument("--json", type=Path, default=None, help="write the tables here")
    args = parser.parse_args(argv)
    if args.pad < 0 or not 0 <= args.nudge <= 1:
        print(f"--pad: expected >= 0, got {args.pad}; --nudge: expected 0..1, got {args.nudge}")
        return 2
    if args.dtype not in DTYPES:
        print(f"--dtype: expected one of {', '.join(DTYPES)}, got {args.dtype!r}")
        return 2
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        print(f"--device: expected cpu or cuda[:N], got {args.device!r}")
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA GPU is available here")
        return 2
    fusion = None
    if args.engine_fusion is not None:
        try:
            fusion = Fusion[args.engine_fusion.upper()]
        except KeyError:
            print(f"--engine-fusion: expected one of "
                  f"{', '.join(f.name.lower() for f in Fusion)}, got {args.engine_fusion!r}")
            return 2
    by_name = {c.name: c for c in BASE_CASES + CUDA_ONLY_CASES}
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        print(f"--configs: expected case names among {', '.join(by_name)}, got "
              f"{args.configs!r}")
        return 2
    torch.set_num_threads(1)
    results = []
    for name in names:
        case = replace(by_name[name], device=args.device, dtype=args.dtype)
        result = probe_case(case, args.swap, fusion, args.pad, args.nudge)
        results.append(result)
        print(f"\n{case.name} {case.dtype} on {case.device} (engine fusion "
              f"{result['engine_fusion'].lower()}, eager; reference swap {args.swap}; "
              f"padded by {args.pad}):")
        print(render(result["points"]))
        for path, seen in result["sdpa"].items():
            print(f"{path} SDPA calls: " + (", ".join(f"{n} x {k}" for k, n in seen.items())
                                            or "none"))
        w = result["worst_logits_step"]
        if "row" in w:
            print(f"worst logits step eng vs ref: {w['rel']:.4f} at row {w['row']} position "
                  f"{w['position']} ({w['phase']})")
        if "nudge" in result:
            m = result["nudge"]["worst_logits_step"]
            print(f"reference with {args.nudge:g} of layer 0's attention outputs moved by one "
                  f"ulp, against the reference: worst logits step {m['rel']:.4f}")
        sys.stdout.flush()
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
