"""Decode and prefill benchmark: toyllm (eager, CUDA graphs), the no-cache
reference and Hugging Face transformers (dynamic and static cache), against the roofline.

    toyllm bench --json out/bench_decode.json          # GPU: full table
    toyllm bench --device cpu --models stories15m      # CPU: stories15M shape
    (python scripts/bench_decode.py takes the same arguments)

Every baseline is measured in the same run on the same device. The roofline for a decode step
is bandwidth / (weight bytes + KV bytes read that step), with the bandwidth measured here: on
CUDA by a device-to-device copy of 1 GiB (bytes read + written); on the CPU by reading, over and
over, a buffer of the model's weight bytes (`weight_read_bandwidth`), which stays where the
weights stay between decode steps (a small model's in the last-level cache, where a 256 MiB copy
would measure main memory instead). Throughput counts generated tokens of all rows.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from toyllm.engine.check.reference import reference_logits
from toyllm.engine.forward import decode_kernel_max_rows
from toyllm.engine.generate import Engine
from toyllm.engine.ops import cpu_step
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.settings import Settings
from toyllm.models.config import load_config
from toyllm.models.llama import Transformer, build_model
from toyllm.models.model_source import DEFAULT_MODEL_DIR, load_model
from toyllm.models.shipped import resolve_config


class BenchError(ValueError):
    """Benchmark options that cannot run: reported before anything is measured."""


def model_config_path(name: str) -> Path | None:
    """None for the shipped default model; else a shipped config name or a .toml path."""
    if name == "default":
        return None
    return resolve_config(name)


@dataclass
class Row:
    model: str
    engine: str
    batch: int
    context: int
    tok_per_s: float
    ms_per_step: float
    roofline_tok_per_s: float = 0.0
    frac_roofline: float = 0.0
    vs_hf_static: float | None = None
    vs_hf_dynamic: float | None = None
    peak_mem_gb: float | None = None
    budget_mem_gb: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy (read + write), 1 GiB on GPU, 256 MiB on CPU."""
    n = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * n * reps / (time.perf_counter() - t0)


def weight_read_bandwidth(nbytes: int, device: torch.device) -> float:
    """Bytes/s of reading `nbytes` of fp32 with all threads (torch.sum, a streaming reduction),
    the buffer read over and over so that it sits where a decode step's weights sit: the fastest
    of 7 rounds of at least ~50 ms each, after a warm-up. A ceiling is the best the machine did:
    on a shared machine a round whose threads lost a core waits at torch.sum's barrier for a
    time slice, and a median of such rounds put the roofline below the decode it bounds."""
    buffer = torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=device).uniform_()
    for _ in range(3):
        buffer.sum()
    sync(device)
    t0 = time.perf_counter()
    buffer.sum()
    sync(device)
    reps = max(1, int(0.05 / max(time.perf_counter() - t0, 1e-6)))
    rounds = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            buffer.sum()
        sync(device)
        rounds.append((time.perf_counter() - t0) / reps)
    return buffer.numel() * 4 / min(rounds)


def weight_bytes(model: Transformer, matrices_in_bf16: bool = False) -> int:
    """The bytes of the model's weights, each storage once; `matrices_in_bf16`: every matrix
    counted in bf16 (what the step of bf16_valued_copy's model reads)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * (2 if matrices_in_bf16 and p.dim() == 2 else p.element_size())
    return total


def bf16_valued_copy(model: Transformer) -> Transformer | None:
    """An fp32 CPU model's copy with every weight rounded to bf16 values, as a checkpoint stored
    in bf16 (most are) loads on the CPU, whose decode step then reads the products' weights in
    bf16 (engine/ops/cpu_step.py: half the bytes). None where the model's weights are bf16 values
    already (the shipped model's: its own rows take that path) or it is not fp32 on the CPU."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return None
    head = model.lm_head.weight.detach().contiguous()
    if cpu_step.bf16_if_exact(head) is not head:
        return None
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    return rounded


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(batch)]


REPEATS = 3  # timed runs per measurement; the median is reported


def time_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(decode tokens/s over all rows, ms per decode step): median of REPEATS requests after
    one warm-up request."""
    params = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False)
    engine.generate(prompts, SamplingParams(max_new_tokens=4, stop_at_eos=False))
    runs = sorted((engine.generate(prompts, params).stats for _ in range(REPEATS)),
                  key=lambda st: st.decode_tok_per_s)
    st = runs[len(runs) // 2]
    return st.decode_tok_per_s, st.decode_s / max(st.decode_steps, 1) * 1e3


def time_reference(model: Transformer, prompt: list[int], steps: int) -> tuple[float, float]:
    """The no-cache reference: a full forward over the growing sequence per token."""
    ids = list(prompt)
    reference_logits(model, ids)
    sync(model.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        ids.append(int(reference_logits(model, ids)[-1].argmax()))
    sync(model.device)
    dt = time.perf_counter() - t0
    return steps / dt, dt / steps * 1e3


def hf_model(model: Transformer, source_dir: Path | None):
    """The same shape (and, from a checkpoint directory, the same weights) in transformers."""
    import transformers

    from toyllm.models.config import config_to_hf

    if source_dir is not None:
        hf = transformers.LlamaForCausalLM.from_pretrained(source_dir, dtype=model.dtype)
    else:
        cfg = transformers.LlamaConfig(**config_to_hf(model.config))
        with torch.device(model.device):
            hf = transformers.LlamaForCausalLM(cfg).to(model.dtype)
    return hf.to(model.device).eval()


def time_hf(hf, prompts: list[list[int]], new_tokens: int, static: bool) -> tuple[float, float]:
    ids = torch.tensor(prompts, device=hf.device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    with torch.inference_mode():
        hf.generate(ids, **kw)  # warm-up (and, for the static cache, compilation)
        hf.generate(ids, **kw)
        times = []
        for _ in range(REPEATS):
            sync(hf.device)
            t0 = time.perf_counter()
            hf.generate(ids, **kw)
            sync(hf.device)
            times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    # generate() also runs the prefill; subtract one prefill forward for a decode rate
    with torch.inference_mode():
        sync(hf.device)
        t1 = time.perf_counter()
        hf(ids, logits_to_keep=1)
        sync(hf.device)
    decode = max(dt - (time.perf_counter() - t1), 1e-9)
    steps = new_tokens - 1
    return steps * len(prompts) / decode, decode / steps * 1e3


def time_prefill(engine: Engine, hf, length: int, vocab: int) -> dict[str, float]:
    (prompt,) = random_prompts(1, length, vocab, seed=7)
    cache = engine.prepare_cache(1, length)
    out = {}
    for _ in range(2):
        cache.reset()
        sync(engine.device)
        t0 = time.perf_counter()
        engine.prefill(cache, 0, prompt)
        sync(engine.device)
        out["toyllm"] = length / (time.perf_counter() - t0)
    if hf is not None:
        ids = torch.tensor([prompt], device=engine.device)
        with torch.inference_mode():
            for _ in range(2):
                sync(engine.device)
                t0 = time.perf_counter()
                hf(ids, logits_to_keep=1)
                sync(engine.device)
                out["transformers"] = length / (time.perf_counter() - t0)
    return out


def bench_model(
    name: str, device: torch.device, dtype: torch.dtype, bandwidth: float, args: argparse.Namespace
) -> tuple[list[Row], dict]:
    """The rows of one model; `bandwidth` is the copy bandwidth, the roofline's on CUDA (the CPU
    measures the weight-read bandwidth of this model's size here)."""
    if name == "default":
        loaded = load_model(None, device, dtype)
        model, source = loaded.model, DEFAULT_MODEL_DIR
    else:
        model, source = (
            build_model(load_config(model_config_path(name)), device=device, dtype=dtype),
            None,
        )
    config = model.config
    wbytes = weight_bytes(model)
    kv_token = config.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())
    rows: list[Row] = []
    extras: dict = {"weight_bytes": wbytes, "kv_bytes_per_token": kv_token}
    if device.type == "cpu":  # the roofline: read the weight bytes where they sit (docstring)
        bandwidth = weight_read_bandwidth(wbytes, device)
        extras["roofline"] = (f"weight-read bandwidth {bandwidth / 1e9:.1f} GB/s (torch.sum "
                              "over a resident buffer of the weights' size)")
    else:
        extras["roofline"] = f"copy bandwidth {bandwidth / 1e9:.0f} GB/s"
    extras["roofline_bandwidth_gbs"] = bandwidth / 1e9
    hf = None
    if args.hf:
        try:
            hf = hf_model(model, source)
        except Exception as exc:  # noqa: BLE001 - transformers missing or incompatible
            extras["hf_error"] = repr(exc)
    on_gpu = device.type == "cuda"
    settings = Settings.from_env()
    engines = {"toyllm eager": dict(cuda_graph=False)}
    if on_gpu:
        engines["toyllm graph"] = dict(cuda_graph=True)
        # the same graph with masked SDPA instead of the decode-attention kernel (where the
        # engine takes the kernel: decode_kernel_max_rows)
        engines["toyllm graph, SDPA"] = dict(
            cuda_graph=True, settings=replace(settings, decode_attention="sdpa"))
        # the same graph with the extension's kernels launched in plain stream order (no
        # programmatic dependent launch: csrc/common/programmatic_launch.cuh)
        engines["toyllm graph, no PDL"] = dict(
            cuda_graph=True, settings=replace(settings, programmatic_launch=False))
    rounded = bf16_valued_copy(model)
    if rounded is not None:
        # the same shape with bf16-valued weights: how far its logits lie from the fp32 model's
        # (the prompt of the shortest context, every position), then its decode rows below
        engines["toyllm eager, bf16-valued weights"] = dict(cuda_graph=False, model=rounded)
        ids = random_prompts(1, min(args.contexts), config.vocab_size)[0]
        with torch.inference_mode():
            want, got = reference_logits(model, ids), reference_logits(rounded, ids)
        extras["bf16_valued_logits_rel"] = float((got - want).norm() / want.norm())
    contexts = [c for c in args.contexts if c + args.new_tokens <= config.max_seq_len]
    for batch in args.batches:
        for ctx in contexts:
            prompts = random_prompts(batch, ctx, config.vocab_size)
            avg_ctx = ctx + args.new_tokens / 2
            roof_steps = bandwidth / (wbytes + batch * avg_ctx * kv_token)
            roof = roof_steps * batch
            budget = (wbytes + batch * (ctx + args.new_tokens) * kv_token) / 1e9
            group: list[Row] = []
            for label, kw in engines.items():
                most = decode_kernel_max_rows(settings, dtype, config.head_dim)
                if label.endswith("SDPA") and most is not None and batch > most:
                    continue
                kw = dict(kw)
                timed = kw.pop("model", model)
                engine = Engine(timed, **{"settings": settings, **kw})
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                try:
                    tps, ms = time_engine(engine, prompts, args.new_tokens)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    group.append(Row(name, label, batch, ctx, 0.0, 0.0, note=repr(exc)[:120]))
                    continue
                row_roof = roof  # the bf16-valued row's step reads the matrices in bf16
                if timed is not model:
                    step_bytes = (weight_bytes(timed, matrices_in_bf16=True)
                                  + batch * avg_ctx * kv_token)
                    row_roof = bandwidth / step_bytes * batch
                row = Row(name, label, batch, ctx, tps, ms, row_roof, tps / row_roof)
                if on_gpu:
                    peak = torch.cuda.max_memory_allocated(device)
                    # weights were allocated before; peak counts them once
                    row.peak_mem_gb = (peak - base + wbytes) / 1e9
                    row.budget_mem_gb = budget
                group.append(row)
                del engine
                gc.collect()
            if batch == 1 and ctx == min(contexts) and args.reference:
                tps, ms = time_reference(model, prompts[0], min(16, args.new_tokens))
                group.append(Row(name, "no-cache reference", 1, ctx, tps, ms, roof, tps / roof))
            if hf is not None:
                for static in (False, True):
                    label = "HF static" if static else "HF dynamic"
                    # the static cache compiles a graph per shape (about a minute each): by
                    # default only where its target is (batch 1, shortest context)
                    if static and not (on_gpu and (args.hf_static_all or (
                            batch == 1 and ctx == min(contexts)))):
                        continue
                    try:
                        tps, ms = time_hf(hf, prompts, args.new_tokens, static)
                        group.append(Row(name, label, batch, ctx, tps, ms, roof, tps / roof))
                    except Exception as exc:  # noqa: BLE001
                        group.append(Row(name, label, batch, ctx, 0, 0, note=repr(exc)[:120]))
            hf_rates = {r.engine: r.tok_per_s for r in group if r.engine.startswith("HF")}
            for r in group:
                if r.engine.startswith("toyllm"):
                    if hf_rates.get("HF static"):
                        r.vs_hf_static = r.tok_per_s / hf_rates["HF static"]
                    if hf_rates.get("HF dynamic"):
                        r.vs_hf_dynamic = r.tok_per_s / hf_rates["HF dynamic"]
            rows += group
    # decode cost vs position: graph path (or eager on CPU), batch 1
    best = "toyllm graph" if on_gpu else "toyllm eager"
    kw = engines[best]
    position_ms = {}
    for pos in args.positions:
        if pos + 32 > config.max_seq_len:
            continue
        engine = Engine(model, **kw)
        _, ms = time_engine(engine, random_prompts(1, pos, config.vocab_size), 32)
        position_ms[pos] = ms
        del engine
    extras["ms_per_token_at_position"] = position_ms
    prefill = {}
    for length in args.prefill:
        if length <= config.max_seq_len:
            prefill[length] = time_prefill(
                Engine(model, cuda_graph=False), hf, length, config.vocab_size
            )
    extras["prefill_tok_per_s"] = prefill
    del hf, model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return rows, extras


def print_table(rows: list[Row], extras: dict, bandwidth: float, device_name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    t = Table(title=f"decode on {device_name}; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    for col in (
        "model",
        "engine",
        "batch",
        "ctx",
        "tok/s",
        "ms/step",
        "roofline tok/s",
        "% roofline",
        "x HF static",
        "x HF dynamic",
        "peak GB",
        "budget GB",
        "note",
    ):
        t.add_column(col, justify="left" if col in ("model", "engine", "note") else "right")
    f = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        t.add_row(
            r.model,
            r.engine,
            str(r.batch),
            str(r.context),
            f(r.tok_per_s, ".1f"),
            f(r.ms_per_step, ".3f"),
            f(r.roofline_tok_per_s, ".0f"),
            f(r.frac_roofline * 100, ".1f"),
            f(r.vs_hf_static, ".2f"),
            f(r.vs_hf_dynamic, ".2f"),
            f(r.peak_mem_gb, ".2f"),
            f(r.budget_mem_gb, ".2f"),
            r.note,
        )
    console.print(t)
    for model, ex in extras.items():
        console.print(
            f"[bold]{model}[/]: weights {ex['weight_bytes'] / 1e9:.3f} GB, "
            f"KV {ex['kv_bytes_per_token']} B/token"
        )
        console.print(f"  roofline: {ex['roofline']}")
        console.print(f"  ms/token at position: {ex['ms_per_token_at_position']}")
        console.print(f"  prefill tok/s: {ex['prefill_tok_per_s']}")
        if "bf16_valued_logits_rel" in ex:
            console.print("  bf16-valued weights: the weights rounded to bf16 values (a bf16 "
                          "checkpoint on the CPU), the matrices read in bf16; logits "
                          f"||a-b||/||b|| from the fp32 model's {ex['bf16_valued_logits_rel']:.2e}"
                          "; roofline over the bf16 bytes")
        if "hf_error" in ex:
            console.print(f"  transformers unavailable: {ex['hf_error']}")


def options(device: str = "auto", dtype: str = "auto", models: str | None = None,
            batches: str | None = None, contexts: str | None = None,
            new_tokens: int | None = None, positions: str = "100,3000",
            prefill: str | None = None, hf: bool = True, reference: bool = True,
            hf_static_all: bool = False, json: Path | None = None) -> argparse.Namespace:
    """Every option parsed, range-checked and defaulted for the device, and every model's
    config read, before anything is measured (BenchError, ConfigError, DeviceError)."""
    from toyllm.engine import cli_numbers as num
    from toyllm.engine.device import resolve_device, resolve_dtype

    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    args = argparse.Namespace(device=dev, dtype=resolve_dtype(dtype, dev), hf=hf,
                              reference=reference, hf_static_all=hf_static_all, json=json)
    names = [m.strip() for m in (("default,llama-1b" if gpu else "stories15m")
                                 if models is None else models).split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise BenchError(f"--models: expected a comma-separated list of distinct names, got "
                         f"{models!r}")
    args.models = names
    args.batches = num.int_list(
        "--batches", ("1,16" if gpu else "1") if batches is None else batches, 1, 4096)
    args.contexts = num.int_list(
        "--contexts", ("128,4096" if gpu else "32") if contexts is None else contexts)
    args.new_tokens = num.integer("--new-tokens", 128 if gpu and new_tokens is None else
                                  64 if new_tokens is None else new_tokens, minimum=2)
    # checked on every device, used on CUDA only
    args.positions = num.int_list("--positions", positions, allow_empty=True)
    args.positions = args.positions if gpu else []
    args.prefill = num.int_list("--prefill", prefill if prefill is not None else
                                ("512,2048" if gpu else ""), allow_empty=True)
    if json is not None:
        num.output_file("--json", Path(json))
    for name in names:  # a config that cannot load, or no context that fits: refused now
        path = model_config_path(name)
        config = load_config(DEFAULT_MODEL_DIR / "config.json" if path is None else path)
        if not any(c + args.new_tokens <= config.max_seq_len for c in args.contexts):
            raise BenchError(
                f"--contexts {','.join(map(str, args.contexts))} + --new-tokens "
                f"{args.new_tokens}: no context fits model {name}'s max_seq_len "
                f"{config.max_seq_len}")
    return args


def run(args: argparse.Namespace) -> int:
    """Measure every model of the validated options (options()); print and write JSON."""
    from toyllm.engine.device import dtype_name

    device, dtype = args.device, args.dtype
    gpu = device.type == "cuda"
    torch.manual_seed(0)
    if not gpu:
        torch.set_num_threads(torch.get_num_threads())
    bandwidth = copy_bandwidth(device)
    device_name = torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu"
    rows, extras = [], {}
    for name in args.models:
        r, ex = bench_model(name, device, dtype, bandwidth, args)
        rows += r
        extras[name] = ex
        # after each model, so a run cut short still leaves what it measured
        print_table(r, {name: ex}, bandwidth, device_name)
        if args.json:
            write_json(args.json, rows, extras, device_name, dtype_name(dtype), bandwidth)
    if len(args.models) > 1:
        print_table(rows, extras, bandwidth, device_name)
    return 0


def main(argv: list[str] | None = None) -> int:
    """scripts/bench_decode.py's entry: the same options as `toyllm bench` (engine/cli.py)."""
    ap = argparse.ArgumentParser(prog="bench_decode.py", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--models", default=None,
                    help="comma list: default and/or config names (GPU: default,llama-1b; CPU: "
                    "stories15m)")
    ap.add_argument("--batches", default=None)
    ap.add_argument("--contexts", default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--positions", default="100,3000")
    ap.add_argument("--prefill", default=None)
    ap.add_argument("--no-hf", dest="hf", action="store_false")
    ap.add_argument("--no-reference", dest="reference", action="store_false")
    ap.add_argument("--hf-static-all", action="store_true",
                    help="HF static cache at every batch and context (default: batch 1, "
                    "shortest context)")
    ap.add_argument("--json", type=Path, default=None)
    return run(options(**vars(ap.parse_args(argv))))


def write_json(path: Path, rows: list[Row], extras: dict, device_name: str, dtype: str,
               bandwidth: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": device_name,
        "dtype": dtype,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "rows": [asdict(r) for r in rows],
        "models": extras,
    }
    path.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
