"""`toyllm`: the command line. Each subcommand lives with the code it drives; this file only
parses arguments, turns user mistakes into one clear line (exit 2, no traceback) and prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="toyllm",
    help="A small, honest LLM generation engine on a C++/CUDA KV cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """toyllm: generate text, check the cache against a no-cache reference, run experiments."""


out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit code 2."""


def fail(message: str) -> typer.Exit:
    """Print one error line (the message is literal text, never rich markup); exit code 2."""
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", markup=True)
    return typer.Exit(code=2)


def user_errors():
    """The exception types that mean 'bad input', not 'bug'."""
    from toyllm.engine.device import DeviceError
    from toyllm.engine.generate import GenerationError
    from toyllm.engine.ops.kv_cache import KVCacheOverflowError
    from toyllm.engine.sampling import SamplingError
    from toyllm.models.chat_template import ChatTemplateError
    from toyllm.models.checkpoint import CheckpointError
    from toyllm.models.config import ConfigError
    from toyllm.models.model_source import ModelSourceError
    from toyllm.models.tokenizer import TokenizerError

    return (UserError, DeviceError, GenerationError, SamplingError, CheckpointError, ConfigError,
            ModelSourceError, TokenizerError, KVCacheOverflowError, ChatTemplateError, OSError)


def read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str]:
    """Prompts from the command line, then from a file: .jsonl (a JSON string or an object
    with "prompt" per line) or plain text (one prompt per line, blank lines skipped)."""
    result = list(prompts)
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise UserError(f"prompts file not found: {prompts_file}")
        try:
            lines = prompts_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise UserError(f"{prompts_file}: expected UTF-8 text ({exc.reason} at byte "
                            f"{exc.start})") from None
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if prompts_file.suffix == ".jsonl":
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{prompts_file}:{n}: not valid JSON ({exc})") from None
                if isinstance(item, dict):
                    item = item.get("prompt")
                if not isinstance(item, str):
                    raise UserError(
                        f"{prompts_file}:{n}: expected a JSON string or {{\"prompt\": ...}}"
                    )
                result.append(item)
            else:
                result.append(line)
    if not result:
        raise UserError("no prompt given: pass PROMPT arguments or --prompts-file")
    for i, p in enumerate(result):
        if not p.strip():
            raise UserError(f"prompt {i} is empty: expected some text")
    return result


@app.command()
def generate(
    prompts: Annotated[list[str] | None, typer.Argument(help="Prompt text (several allowed).")]
    = None,
    model: Annotated[str | None, typer.Option(
        help="Checkpoint directory (Hugging Face layout), config .toml or shipped config name "
             "(llama-1b, stories15m, ...); default: the shipped model.")] = None,
    random_weights: Annotated[bool, typer.Option(
        help="With a config .toml: random weights (experiments).")] = False,
    tokenizer: Annotated[Path | None, typer.Option(
        help="tokenizer.json, sentencepiece tokenizer.model, or a directory holding one.")]
    = None,
    chat: Annotated[bool, typer.Option(
        help="Apply the model's chat template to each prompt (a user turn).")] = False,
    system: Annotated[str | None, typer.Option(help="With --chat: a system message.")] = None,
    prompts_file: Annotated[Path | None, typer.Option(
        help="More prompts: .jsonl or one per line.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_k: Annotated[int, typer.Option(help="0 = off.")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus mass in (0, 1].")] = 0.95,
    seed: Annotated[int | None, typer.Option(help="Makes sampling repeatable.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, fp32, fp16, bf16")] = "auto",
    prefill_chunk: Annotated[int | None, typer.Option(
        help="Prefill in chunks of this many tokens.")] = None,
    max_context: Annotated[int | None, typer.Option(
        help="Cap the KV cache at this many positions.")] = None,
    cuda_graph: Annotated[bool, typer.Option(
        help="Capture decode steps in CUDA graphs (GPU only).")] = True,
    stats: Annotated[bool, typer.Option(help="Print prefill ms, decode tok/s, cache bytes.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output for scripts.")] = False,
) -> None:
    """Generate text from a model: the shipped default or your own checkpoint."""
    try:
        _generate(**locals())
    except user_errors() as exc:
        raise fail(str(exc)) from None


def _generate(prompts, model, random_weights, tokenizer, chat, system, prompts_file,
              max_new_tokens,
              temperature, top_k, top_p, seed, stop, device, dtype, prefill_chunk,
              max_context, cuda_graph, stats, as_json) -> None:
    from toyllm.engine.device import dtype_name, resolve_device, resolve_dtype
    from toyllm.engine.generate import Engine
    from toyllm.engine.sampling import SamplingParams
    from toyllm.models.model_source import load_model

    texts = read_prompts(prompts or [], prompts_file)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, stop=tuple(stop or ()))
    if prefill_chunk is not None and prefill_chunk <= 0:
        raise UserError(f"--prefill-chunk: expected a positive integer, got {prefill_chunk}")
    if max_context is not None and max_context <= 0:
        raise UserError(f"--max-context: expected a positive integer, got {max_context}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    with err.status("loading model...", spinner="dots"):
        loaded = load_model(model, dev, dt, random_weights=random_weights,
                            tokenizer_path=tokenizer)
    if loaded.tokenizer is None:
        raise UserError(f"{loaded.source}: no tokenizer found (tokenizer.json or "
                        "tokenizer.model); pass --tokenizer")
    if system is not None and not chat:
        raise UserError("--system goes with --chat")
    engine = Engine(loaded.model, loaded.tokenizer, prefill_chunk=prefill_chunk,
                    cuda_graph=cuda_graph and dev.type == "cuda", max_seq_len=max_context)
    inputs = texts
    if chat:  # each prompt is one user turn of its own conversation, rendered by the template
        from toyllm.models.chat_template import chat_prompt_ids

        head = [{"role": "system", "content": system}] if system else []
        inputs = [chat_prompt_ids(loaded.tokenizer, [*head, {"role": "user", "content": t}])
                  for t in texts]
    stream = len(texts) == 1 and not as_json
    if stream:
        out.print(texts[0], style="dim", end="\n" if chat else "")

        def on_text(_: int, piece: str) -> None:
            out.print(piece, end="", markup=False)

        result = engine.generate(inputs, params, on_text=on_text)
        out.print()
    else:
        with err.status(f"generating {len(texts)} completion(s)...", spinner="dots"):
            result = engine.generate(inputs, params)
    st = result.stats
    if as_json:
        payload = {
            "model": loaded.source,
            "device": str(dev),
            "dtype": dtype_name(dt),
            "completions": [
                {"index": c.index, "prompt": texts[c.index], "text": c.text,
                 "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                 "completion_tokens": c.completion_tokens, "token_ids": c.token_ids}
                for c in result.completions
            ],
            "stats": {"prefill_tokens": st.prefill_tokens, "prefill_ms": st.prefill_ms,
                      "decode_tokens": st.decode_tokens, "decode_s": st.decode_s,
                      "decode_tok_per_s": st.decode_tok_per_s, "cache_bytes": st.cache_bytes,
                      "load_s": loaded.load_s},
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    if not stream:
        for c in result.completions:
            out.rule(f"[{c.index}] {c.finish_reason}, {c.completion_tokens} tokens")
            out.print(texts[c.index], style="dim", end="\n" if chat else "")
            out.print(c.text, markup=False)
    if stats:
        sys.stdout.flush()
        reasons = ", ".join(sorted({c.finish_reason for c in result.completions}))
        err.print(
            f"[dim]{loaded.source} on {dev} ({dtype_name(dt)}): load {loaded.load_s * 1e3:.0f} ms,"
            f" prefill {st.prefill_tokens} tok in {st.prefill_ms:.1f} ms, decode "
            f"{st.decode_tokens} tok at {st.decode_tok_per_s:.1f} tok/s, KV cache "
            f"{st.cache_bytes / 2**20:.2f} MiB, finish: {reasons}[/]"
        )


@app.command()
def chat(
    model: Annotated[str | None, typer.Option(
        help="Checkpoint directory, .gguf file or config .toml; default: the shipped model.")]
    = None,
    tokenizer: Annotated[Path | None, typer.Option(
        help="tokenizer.json, tokenizer.model, or a directory holding one.")] = None,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    prompt: Annotated[str | None, typer.Option(
        help="Answer this one message and exit (stdin is read when it is not a terminal).")]
    = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 512,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_k: Annotated[int, typer.Option(help="0 = off.")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus mass in (0, 1].")] = 0.95,
    seed: Annotated[int | None, typer.Option(help="Makes sampling repeatable.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, fp32, fp16, bf16")] = "auto",
    max_context: Annotated[int | None, typer.Option(
        help="Cap the KV cache at this many positions.")] = None,
    cuda_graph: Annotated[bool, typer.Option(
        help="Capture decode steps in CUDA graphs (GPU only).")] = True,
    stats: Annotated[bool, typer.Option(help="Print prefill and decode figures per turn.")]
    = False,
) -> None:
    """Chat with a model through its chat template: /reset, /quit; Ctrl-C stops an answer.
    The conversation stays in the KV cache; each turn prefills only its new tokens."""
    try:
        from toyllm.engine.chat import ChatSession
        from toyllm.engine.chat_cli import run_chat
        from toyllm.engine.device import resolve_device, resolve_dtype
        from toyllm.engine.generate import Engine
        from toyllm.engine.sampling import SamplingParams
        from toyllm.models.model_source import load_model

        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed)
        if max_context is not None and max_context <= 0:
            raise UserError(f"--max-context: expected a positive integer, got {max_context}")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        with err.status("loading model...", spinner="dots"):
            loaded = load_model(model, dev, dt, tokenizer_path=tokenizer)
        if loaded.tokenizer is None:
            raise UserError(f"{loaded.source}: no tokenizer found (tokenizer.json or "
                            "tokenizer.model); pass --tokenizer")
        engine = Engine(loaded.model, loaded.tokenizer, max_seq_len=max_context,
                        cuda_graph=cuda_graph and dev.type == "cuda")
        session = ChatSession(engine, params, system=system)
        code = run_chat(session, prompt, out, err, stats)
    except user_errors() as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)


# --- toyllm bench: decode/prefill benchmark (engine/bench_decode.py) ----------------------------
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Decode and prefill tok/s against transformers and the roofline (`toyllm bench --help`
    lists its options)."""
    from toyllm.engine.tools.bench import main as bench_main

    try:
        code = bench_main(list(ctx.args))
    except user_errors() as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)


# --- toyllm check: the correctness harness (engine/check.py) ---------------------------------
@app.command()
def check(
    configs: Annotated[list[str] | None, typer.Option(
        help="Only cases whose name contains this (repeatable, or comma-separated).")] = None,
    dtypes: Annotated[list[str] | None, typer.Option(
        help="fp32, fp16, bf16 (repeatable, or comma-separated); fp16/bf16 need CUDA. "
             "Default: fp32 on the CPU, all three on CUDA.")] = None,
    device: Annotated[str, typer.Option(
        help="auto (the CPU matrix, plus CUDA when present), cpu or cuda.")] = "auto",
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Write the JSON report (cases, errors, margins, versions) here.")]
    = None,
    hf: Annotated[bool, typer.Option(
        help="Hugging Face transformers as a third witness, when installed.")] = True,
) -> None:
    """Check the cached engine against the no-cache reference (and HF transformers) on a
    matrix of models and requests; exit 1 if any case fails."""
    from toyllm.engine.check.harness import CheckError, run_check

    try:
        code = run_check(configs, dtypes, device, json_path, out, hf=hf)
    except (CheckError, *user_errors()) as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)
# --- end of toyllm check ---------------------------------------------------------------------


# --- toyllm info / toyllm sweep: model-config experiments (engine/model_info.py, sweep.py) ---
@app.command()
def info(
    source: Annotated[str | None, typer.Argument(
        help="Config .toml, config.json, checkpoint directory or shipped config name "
             "(llama-1b, stories15m, ...); default: the shipped model.")]
    = None,
    batch: Annotated[int, typer.Option(help="Sequences whose KV cache is counted.")] = 1,
    context: Annotated[int | None, typer.Option(
        help="Positions per sequence; default: the config's max_seq_len.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output for scripts.")] = False,
) -> None:
    """Parameters by part, weight bytes and KV-cache bytes per dtype (arithmetic only)."""
    from toyllm.engine.tools.info import describe, load_for_info, render_info
    from toyllm.models.config import ConfigError

    try:
        config, where = load_for_info(source)
        result = describe(config, batch=batch, context=context, source=where)
    except (UserError, ConfigError, OSError) as exc:
        raise fail(str(exc)) from None
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    else:
        render_info(result, out)


@app.command()
def sweep(
    experiment: Annotated[Path, typer.Argument(
        help="Experiment .toml (base config + grid) or shipped experiment name "
             "(attention-variants, cpu-smoke, ...).")],
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Output directory; default: runs/sweep-<name>.")] = None,
    device: Annotated[str | None, typer.Option(
        help="auto, cpu, cuda, cuda:N; default: the file's device (or auto).")] = None,
    dry_run: Annotated[bool, typer.Option(
        help="Validate and print the arithmetic columns; measure and write nothing.")] = False,
) -> None:
    """Measure an experiment grid (table, CSV, JSON, PNG plots); exit 1 if a point failed."""
    from toyllm.engine.device import DeviceError
    from toyllm.engine.tools.sweep import ExperimentError, run_experiment
    from toyllm.models.config import ConfigError

    try:
        code = run_experiment(experiment, out_dir, device, out, dry_run=dry_run)
    except (UserError, ExperimentError, ConfigError, DeviceError, OSError) as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)
# --- end of toyllm info / toyllm sweep --------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    app()
