"""`toyllm`: the command line. Each subcommand lives with the code it drives; this file only
parses arguments, turns user mistakes into one clear line (exit 2, no traceback) and prints."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

# click's exception classes as this typer uses them (recent typer vendors its own click), found
# through the public typer.BadParameter: ClickException -> UsageError -> BadParameter
_CLICK_ERRORS = {c.__name__: c for c in typer.BadParameter.__mro__}
ClickException, UsageError = _CLICK_ERRORS["ClickException"], _CLICK_ERRORS["UsageError"]


class _OneLineErrors(TyperGroup):
    """The root command: a usage mistake click catches (a malformed number, an unknown
    option) is one line and exit code 2, like every other refusal, instead of click's box."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `toyllm`: the help itself
                sys.stdout.write(exc.format_message() + "\n")
                sys.exit(2)
            hint = f" (see {exc.ctx.command_path} -h)" if exc.ctx is not None else ""
            _print_error(exc.format_message() + hint)
            sys.exit(2)
        except ClickException as exc:  # a file option that cannot be opened
            _print_error(exc.format_message())
            sys.exit(2)
        except typer.Abort:
            _print_error("aborted")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="toyllm",
    help="A small, honest LLM generation engine on a C++/CUDA KV cache.",
    cls=_OneLineErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: flags read `--stats / --no-stats`, with no value label
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("toyllm")
    except PackageNotFoundError:  # run from a source tree (the .pth layout): pyproject says
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
        except (OSError, ValueError, KeyError):
            return "unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"toyllm {_version()} (Python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_show_version, is_eager=True,
        help="Print the version and exit.")] = False,
) -> None:
    """toyllm: generate text, check the cache against a no-cache reference, run experiments."""


out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit code 2."""


def _print_error(message: str) -> None:
    """One line on stderr: `error: ...` (literal text, never rich markup)."""
    from rich.markup import escape

    line = " ".join(str(message).split()) or "unknown error"
    err.print(f"[bold red]error:[/] {escape(line)}", markup=True)


def fail(message: str) -> typer.Exit:
    """Print one error line; exit code 2."""
    _print_error(message)
    return typer.Exit(code=2)


# Error classes that mean 'bad input', not 'bug', by module. Each module is imported on its
# own and skipped if it cannot be: the handler must never fail the way the command did (a
# module that raises at import, e.g. on a bad TOYLLM_* value, would otherwise raise again here).
_ERROR_CLASSES = (
    ("toyllm.engine.device", "DeviceError"),
    ("toyllm.engine.generate", "GenerationError"),
    ("toyllm.engine.ops.kv_cache", "KVCacheOverflowError"),
    ("toyllm.engine.sampling", "SamplingError"),
    ("toyllm.engine.settings", "SettingsError"),
    ("toyllm.engine.cli_numbers", "NumberError"),
    ("toyllm.models.chat_template", "ChatTemplateError"),
    ("toyllm.models.checkpoint", "CheckpointError"),
    ("toyllm.models.config", "ConfigError"),
    ("toyllm.models.model_source", "ModelSourceError"),
    ("toyllm.models.tokenizer", "TokenizerError"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean 'bad input', not 'bug' (those whose modules import)."""
    import importlib

    found: list[type[BaseException]] = [UserError, OSError]
    for module, name in _ERROR_CLASSES:
        mod = sys.modules.get(module)
        if mod is None:
            try:
                mod = importlib.import_module(module)
            except Exception:  # noqa: BLE001 - see above: never fail in the handler
                continue
        cls = getattr(mod, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def is_user_error(exc: BaseException) -> bool:
    """Bad input: one of user_errors(), or any ValueError that toyllm itself defines (every
    toyllm error class is one), found without importing anything."""
    if isinstance(exc, user_errors()):
        return True
    return any(isinstance(exc, ValueError) and cls.__module__.startswith("toyllm.")
               for cls in type(exc).__mro__ if cls is not ValueError)


def _given_sampling(temperature: float | None, top_k: int | None, top_p: float | None,
                    min_p: float | None, repetition_penalty: float | None,
                    ) -> dict[str, float | int | None]:
    """The sampling options as given on the command line (None: not given), the two that
    SamplingParams names by field checked here under their flag names."""
    from toyllm.engine import cli_numbers

    return {"temperature": temperature, "top_k": top_k, "top_p": top_p,
            "min_p": None if min_p is None else cli_numbers.number("--min-p", min_p, 0.0, 1.0),
            "repetition_penalty": None if repetition_penalty is None
            else cli_numbers.positive("--repetition-penalty", repetition_penalty)}


def _run(body: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a command's body: bad input is one line and exit code 2, never a traceback."""
    try:
        return body(*args, **kwargs)
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as exc:
        if is_user_error(exc):
            raise fail(str(exc)) from None
        if _out_of_memory(exc):
            raise fail("out of memory: " + str(exc).split("DefaultCPUAllocator: ")[-1]) from None
        if type(exc).__name__ == "RankFailure":  # a tensor-parallel rank failed: all were ended
            _print_error(str(exc))
            raise typer.Exit(code=2 if getattr(exc, "user_error", False) else 1) from None
        raise


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation the machine cannot make (a shape too large for it) is the user's to fix,
    not a bug: torch's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str]:
    """Prompts from the command line, then from a file: .jsonl (a JSON string or an object
    with "prompt" per line) or plain text (one prompt per line, blank lines skipped)."""
    result = list(prompts)
    if prompts_file is not None:
        from toyllm.models.validate import read_text

        if not prompts_file.exists() and not prompts_file.is_symlink():
            raise UserError(f"prompts file not found: {prompts_file}")
        lines = read_text(prompts_file, "prompts file", UserError).splitlines()
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if prompts_file.suffix == ".jsonl":
                try:
                    item = json.loads(line)
                except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
                    raise UserError(f"{prompts_file}:{n}: not valid JSON "
                                    f"({str(exc)[:200] or type(exc).__name__})") from None
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


# Options that several commands take, each declared once: its type and help text.
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")]
DtypeOption = Annotated[str, typer.Option(help="auto, fp32, fp16, bf16")]
# the sampling options default to None: the model's generation_config.json, else the CLI's
TopKOption = Annotated[int | None, typer.Option(help="0 = off.")]
TopPOption = Annotated[float | None, typer.Option(help="Nucleus mass in (0, 1].")]
MinPOption = Annotated[float | None, typer.Option(
    help="Min-p: keep only tokens at least this fraction as likely as the most likely one, "
         "in [0, 1]; 0 = off.")]
RepetitionPenaltyOption = Annotated[float | None, typer.Option(
    help="Repetition penalty: tokens already in the prompt or output get their logit "
         "divided by it (if > 0) or multiplied by it (if < 0); > 0, above 1 repeats less, "
         "1 = off.")]
MaxContextOption = Annotated[int | None, typer.Option(
    help="Cap the KV cache at this many positions.")]
CudaGraphOption = Annotated[bool, typer.Option(
    help="Capture decode steps in CUDA graphs (GPU only).")]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON output for scripts.")]


@app.command()
def generate(
    prompts: Annotated[list[str] | None, typer.Argument(
        metavar="PROMPT", help="Prompt text (several allowed).")] = None,
    model: Annotated[str | None, typer.Option(
        help="Checkpoint directory (Hugging Face layout), config .toml or shipped config name "
             "(llama-1b, stories15m, ...); default: the shipped model.")] = None,
    random_weights: Annotated[bool, typer.Option(
        help="With a config .toml: random weights (experiments). The config's vocab_size "
             "must equal the tokenizer's (the shipped one has 4096 pieces).")] = False,
    tokenizer: Annotated[Path | None, typer.Option(
        help="tokenizer.json, sentencepiece tokenizer.model, or a directory holding one.")]
    = None,
    chat: Annotated[bool, typer.Option(
        help="Apply the model's chat template to each prompt (a user turn).")] = False,
    system: Annotated[str | None, typer.Option(help="With --chat: a system message.")] = None,
    prompts_file: Annotated[Path | None, typer.Option(
        help="More prompts: .jsonl or one per line.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 64,
    temperature: Annotated[float | None, typer.Option(
        help="0 (or below 1e-5) = greedy. Default for this and the next four options: the "
             "model's generation_config.json, else 0.7 / 0 / 0.95 / 0 / 1.")] = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    min_p: MinPOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    seed: Annotated[int | None, typer.Option(
        help="0 to 2**64-1: makes sampling repeatable. Every prompt samples with this seed "
             "on its own, so its tokens are the same alone or in any batch.")] = None,
    stop: Annotated[list[str] | None, typer.Option(
        metavar="TEXT", help="Stop string (repeatable).")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    prefill_chunk: Annotated[int | None, typer.Option(
        help="Prefill in chunks of this many tokens.")] = None,
    max_context: MaxContextOption = None,
    cuda_graph: CudaGraphOption = True,
    block_size: Annotated[int, typer.Option(
        help="With --prompts-file: tokens per block of the paged KV cache.")] = 16,
    kv_memory: Annotated[str, typer.Option(
        help="With --prompts-file: the paged KV pool, a fraction of free memory (0.9) or a "
             "size (4GiB).")] = "0.9",
    token_budget: Annotated[int, typer.Option(
        help="With --prompts-file: most tokens computed per step (prefill chunks + decode "
             "rows).")] = 8192,
    prefix_caching: Annotated[bool, typer.Option(
        help="With --prompts-file: share the KV blocks of common prompt prefixes.")] = True,
    stats: Annotated[bool, typer.Option(help="Print prefill ms, decode tok/s, cache bytes.")]
    = False,
    as_json: JsonOption = False,
    tensor_parallel: Annotated[int, typer.Option(
        help="Split the model over this many ranks (processes; GPUs cuda:0..N-1 on CUDA, gloo "
             "on the CPU): heads, K/V heads, MLP units and vocabulary must divide by it.")] = 1,
) -> None:
    """Generate text from a model: the shipped default or your own checkpoint. Prompts from
    --prompts-file run through the serving engine (continuous batching over a paged KV cache
    with prefix caching); prompts given as arguments through the static engine."""
    _run(_generate, **locals())


def _generate(prompts, model, random_weights, tokenizer, chat, system, prompts_file,
              max_new_tokens,
              temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, device, dtype,
              prefill_chunk, max_context, cuda_graph, block_size, kv_memory, token_budget,
              prefix_caching, stats, as_json, tensor_parallel) -> None:
    from toyllm.engine import cli_numbers
    from toyllm.engine.device import dtype_name, resolve_device, resolve_dtype
    from toyllm.engine.generate import Engine
    from toyllm.engine.sampling import SamplingParams, sampling_fields
    from toyllm.models.generation_config import read_sampling_defaults
    from toyllm.models.model_source import DEFAULT_MODEL_DIR, load_model

    texts = read_prompts(prompts or [], prompts_file)
    given = _given_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    # checked now, before the model loads; the model's generation_config.json fills the rest
    params = SamplingParams(max_new_tokens=max_new_tokens, seed=seed, stop=tuple(stop or ()),
                            **sampling_fields(given, {}))
    if prefill_chunk is not None and prefill_chunk <= 0:
        raise UserError(f"--prefill-chunk: expected a positive integer, got {prefill_chunk}")
    if max_context is not None and max_context <= 0:
        raise UserError(f"--max-context: expected a positive integer, got {max_context}")
    serving = prompts_file is not None
    if serving:
        if prefill_chunk is not None:
            raise UserError("--prefill-chunk applies to prompts given as arguments; with "
                            "--prompts-file the scheduler chunks prompts within --token-budget")
        if tensor_parallel != 1:
            raise UserError("--tensor-parallel runs prompts given as arguments; the serving "
                            "engine of --prompts-file runs on one device")
        cli_numbers.integer("--block-size", block_size)
        cli_numbers.integer("--token-budget", token_budget)
        pool = cli_numbers.memory_amount("--kv-memory", kv_memory)
    if system is not None and not chat:
        raise UserError("--system goes with --chat")
    if tensor_parallel != 1:  # rank 0 of N renders the chat turns, samples and sends the text
        from toyllm.engine.tensor_parallel.cli_generate import start_ranks

        with err.status(f"starting {tensor_parallel} ranks...", spinner="dots"):
            engine, loaded, dev, dt = start_ranks(
                model, tensor_parallel, device, dtype, random_weights, tokenizer, chat, system,
                prefill_chunk=prefill_chunk, cuda_graph=cuda_graph, max_seq_len=max_context)
        checkpoint = Path(model) if model is not None else DEFAULT_MODEL_DIR
        if checkpoint.is_dir():  # the ranks loaded it: its generation_config.json is readable
            params = replace(params, **sampling_fields(given, read_sampling_defaults(checkpoint)))
        chat = False
    else:
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        with err.status("loading model...", spinner="dots"):
            loaded = load_model(model, dev, dt, random_weights=random_weights,
                                tokenizer_path=tokenizer)
        if loaded.tokenizer is None:
            raise UserError(f"{loaded.source}: no tokenizer found (tokenizer.json or "
                            "tokenizer.model); pass --tokenizer")
        params = replace(params, **sampling_fields(given, loaded.sampling_defaults))
        if serving:
            from toyllm.engine.serving import ServingEngine

            engine = ServingEngine(
                loaded.model, loaded.tokenizer, block_size=block_size, kv_memory=pool,
                max_running=min(256, len(texts)), token_budget=token_budget,
                prefix_caching=prefix_caching, cuda_graph=cuda_graph and dev.type == "cuda",
                max_seq_len=max_context)
        else:
            engine = Engine(loaded.model, loaded.tokenizer, prefill_chunk=prefill_chunk,
                            cuda_graph=cuda_graph and dev.type == "cuda",
                            max_seq_len=max_context)
    inputs = texts
    if chat:  # each prompt is one user turn of its own conversation, rendered by the template
        from toyllm.models.chat_template import chat_prompt_ids

        head = [{"role": "system", "content": system}] if system else []
        inputs = [chat_prompt_ids(loaded.tokenizer, [*head, {"role": "user", "content": t}])
                  for t in texts]
    stream = len(texts) == 1 and not as_json
    if stream:
        out.print(texts[0], style="dim", end="\n" if chat else "")

        from toyllm.engine.chat_cli import write_piece

        def on_text(_: int, piece: str) -> None:
            write_piece(out, piece)

        result = engine.generate(inputs, params, on_text=on_text)
        out.print()
    elif serving:
        # a progress bar where someone watches; a pipe gets no redraws
        result = engine.generate(inputs, params, progress=err.is_terminal)
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
        if serving:
            sv = engine.stats()
            payload["serving"] = {"preemptions": sv.preemptions,
                                  "prefix_hit_blocks": sv.prefix_hit_blocks,
                                  "block_size": sv.block_size, "blocks_total": sv.blocks_total,
                                  "steps": sv.steps}
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
        if serving:
            sv = engine.stats()
            err.print(f"[dim]serving: {sv.steps} steps, {sv.blocks_total} blocks of "
                      f"{sv.block_size} tokens, {sv.prefix_hit_blocks} prefix-cache hits, "
                      f"{sv.preemptions} preemptions[/]")


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
    temperature: Annotated[float | None, typer.Option(
        help="0 = greedy. Default for this and the next four options: the "
             "model's generation_config.json, else 0.7 / 0 / 0.95 / 0 / 1.")] = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    min_p: MinPOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    seed: Annotated[int | None, typer.Option(help="Makes sampling repeatable.")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    max_context: MaxContextOption = None,
    cuda_graph: CudaGraphOption = True,
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
        from toyllm.engine.sampling import SamplingParams, sampling_fields
        from toyllm.models.model_source import load_model

        given = _given_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
        params = SamplingParams(max_new_tokens=max_new_tokens, seed=seed,
                                **sampling_fields(given, {}))
        if max_context is not None and max_context <= 0:
            raise UserError(f"--max-context: expected a positive integer, got {max_context}")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        with err.status("loading model...", spinner="dots"):
            loaded = load_model(model, dev, dt, tokenizer_path=tokenizer)
        if loaded.tokenizer is None:
            raise UserError(f"{loaded.source}: no tokenizer found (tokenizer.json or "
                            "tokenizer.model); pass --tokenizer")
        params = replace(params, **sampling_fields(given, loaded.sampling_defaults))
        engine = Engine(loaded.model, loaded.tokenizer, max_seq_len=max_context,
                        cuda_graph=cuda_graph and dev.type == "cuda")
        session = ChatSession(engine, params, system=system)
        code = run_chat(session, prompt, out, err, stats)
    except user_errors() as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)


# --- toyllm serve: the OpenAI-compatible HTTP server (engine/server/) -------------------------
@app.command()
def serve(
    model: Annotated[str | None, typer.Option(
        help="Checkpoint directory, .gguf file or config .toml; default: the shipped model.")]
    = None,
    random_weights: Annotated[bool, typer.Option(
        help="With a config .toml: random weights (benchmarks); its vocab_size must equal the "
             "tokenizer's.")] = False,
    tokenizer: Annotated[Path | None, typer.Option(
        help="tokenizer.json, tokenizer.model, or a directory holding one.")] = None,
    host: Annotated[str, typer.Option(
        help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0 = any free port (printed).")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        help="Every request must send 'Authorization: Bearer KEY' (else 401).")] = None,
    api_key_file: Annotated[Path | None, typer.Option(
        help="As --api-key, the key read from this file's first line (not in `ps`).")] = None,
    served_model_name: Annotated[str | None, typer.Option(
        help="The model id clients send; default: the model directory's (or file's) name.")]
    = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, fp32, fp16, bf16")] = "auto",
    block_size: Annotated[int, typer.Option(help="Tokens per block of the paged KV cache.")]
    = 16,
    kv_memory: Annotated[str, typer.Option(
        help="The paged KV pool: a fraction of free memory (0.9) or a size (4GiB).")] = "0.9",
    max_running: Annotated[int, typer.Option(
        help="Most requests decoding at once (each holds a cache slot).")] = 64,
    max_waiting: Annotated[int, typer.Option(
        help="Most requests waiting beyond those running; more get 503 with Retry-After.")]
    = 256,
    token_budget: Annotated[int, typer.Option(
        help="Most tokens computed per step (prefill chunks + decode rows).")] = 8192,
    prefix_caching: Annotated[bool, typer.Option(
        help="Share the KV blocks of common prompt prefixes.")] = True,
    max_context: Annotated[int | None, typer.Option(
        help="Cap each request's context at this many positions.")] = None,
    cuda_graph: Annotated[bool, typer.Option(
        help="Replay pure decode steps from CUDA graphs (GPU only).")] = True,
    overlap: Annotated[bool, typer.Option(
        help="Plan and launch each decode step while the one before runs (GPU only; "
             "docs/SERVING.md).")] = True,
    shutdown_timeout: Annotated[float, typer.Option(
        help="On SIGTERM: seconds running requests may finish before they are aborted.")]
    = 30.0,
    access_log: Annotated[bool, typer.Option(help="Log every HTTP request (uvicorn).")]
    = False,
    stream_interval: Annotated[int, typer.Option(
        help="Wake a stream every N tokens (its first token and its end at once): fewer writes "
             "under many streams, tokens in bursts of N. Each token keeps its own chunk.")]
    = 1,
    engine: Annotated[str, typer.Option(
        help="Where the engine runs: 'process' (its own process, which loads the model: the "
             "HTTP side and the engine do not share a GIL) or 'thread' (a thread of the "
             "server's process).")] = "process",
) -> None:
    """Serve the model over HTTP with the OpenAI API: /v1/completions, /v1/chat/completions
    (streamed or not), /v1/models, /health, /metrics (docs/SERVER.md). SIGTERM stops
    gracefully (exit 0)."""
    def body() -> int:
        from toyllm.engine.server.launch import ServeOptions
        from toyllm.engine.server.launch import serve as run_server

        return run_server(ServeOptions(
            model=model, random_weights=random_weights, tokenizer=tokenizer, host=host,
            port=port, api_key=api_key, api_key_file=api_key_file,
            served_model_name=served_model_name, device=device,
            dtype=dtype, block_size=block_size, kv_memory=kv_memory, max_running=max_running,
            max_waiting=max_waiting, token_budget=token_budget, prefix_caching=prefix_caching,
            max_context=max_context, cuda_graph=cuda_graph, overlap=overlap,
            shutdown_timeout=shutdown_timeout,
            access_log=access_log, stream_interval=stream_interval, engine=engine))

    raise typer.Exit(_run(body))


# --- toyllm bench: decode/prefill benchmark (engine/tools/bench.py) ----------------------------
@app.command()
def bench(
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    models: Annotated[str | None, typer.Option(
        metavar="NAME,...", help="default (the shipped model) and/or config names under "
        "configs/ or .toml paths; default: default,llama-1b on CUDA, stories15m on the CPU.")]
    = None,
    batches: Annotated[str | None, typer.Option(
        metavar="N,...", help="Batch sizes, 1 to 4096; default: 1,16 on CUDA, 1 on the CPU.")]
    = None,
    contexts: Annotated[str | None, typer.Option(
        metavar="N,...", help="Prompt lengths; default: 128,4096 on CUDA, 32 on the CPU.")]
    = None,
    new_tokens: Annotated[int | None, typer.Option(
        help="Tokens decoded per timed run, at least 2; default: 128 on CUDA, 64 on the "
             "CPU.")] = None,
    positions: Annotated[str, typer.Option(
        metavar="N,...", help="CUDA only: ms per token at these positions (empty: none).")]
    = "100,3000",
    prefill: Annotated[str | None, typer.Option(
        metavar="N,...", help="Prefill lengths to time (empty: none); default: 512,2048 on "
        "CUDA, none on the CPU.")] = None,
    hf: Annotated[bool, typer.Option(help="Time transformers on the same shape.")] = True,
    reference: Annotated[bool, typer.Option(help="Time the no-cache reference.")] = True,
    hf_static_all: Annotated[bool, typer.Option(
        help="HF static cache at every batch and context (default: batch 1, shortest "
             "context).")] = False,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Write the rows here too (after each model).")] = None,
    workload: Annotated[str, typer.Option(
        help="decode: the decode/prefill table; random: 256 requests of 100-1024 prompt and "
             "output tokens through the serving engine, the static batch and transformers' "
             "continuous batching; shared-prefix: 64 requests sharing a 1,000-token prompt, "
             "prefix caching on and off (docs/SERVING.md).")] = "decode",
    hf_requests: Annotated[int | None, typer.Option(
        help="With --workload random: transformers on the first N requests only.")] = None,
    kv_memory: Annotated[str, typer.Option(
        help="With --workload: the KV pool, a fraction of free memory or a size (4GiB).")]
    = "0.5",
    block_size: Annotated[int, typer.Option(
        help="With --workload: tokens per KV block.")] = 16,
) -> None:
    """Decode and prefill tok/s against transformers and the roofline, measured in one run;
    or a serving workload (--workload). Every option is checked before anything is measured."""

    def body() -> int:
        if workload != "decode":
            from toyllm.engine.tools import serving_bench

            return serving_bench.run_cli(
                workload, models or "llama-1b", device, dtype, hf=hf, hf_requests=hf_requests,
                static=True, kv_memory=kv_memory, block_size=block_size, json_path=json_path)
        from toyllm.engine.tools import bench as tool

        return tool.run(tool.options(
            device=device, dtype=dtype, models=models, batches=batches, contexts=contexts,
            new_tokens=new_tokens, positions=positions, prefill=prefill, hf=hf,
            reference=reference, hf_static_all=hf_static_all, json=json_path))

    raise typer.Exit(_run(body))


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
    tensor_parallel: Annotated[int, typer.Option(
        help="Check the model split over this many ranks against one process and the "
             "reference (the cases that split; gloo on the CPU, NCCL on CUDA).")] = 1,
) -> None:
    """Check the cached engine against the no-cache reference (and HF transformers) on a
    matrix of models and requests; exit 1 if any case fails."""
    def body() -> int:
        if tensor_parallel != 1:
            from toyllm.engine.tensor_parallel.check import run_tensor_parallel_check

            return run_tensor_parallel_check(tensor_parallel, configs, dtypes, device,
                                             json_path, out)
        from toyllm.engine.check.harness import run_check

        return run_check(configs, dtypes, device, json_path, out, hf=hf)

    raise typer.Exit(_run(body))
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
    block_size: Annotated[int, typer.Option(
        help="Tokens per block of the serving engine's paged cache.")] = 16,
    as_json: JsonOption = False,
) -> None:
    """Parameters by part, weight bytes, KV-cache bytes and paged KV blocks per GiB, per
    dtype (arithmetic only)."""
    def body() -> Any:
        from toyllm.engine.tools.info import describe, load_for_info

        config, where = load_for_info(source)
        return describe(config, batch=batch, context=context, source=where,
                        block_size=block_size)

    result = _run(body)
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    else:
        from toyllm.engine.tools.info import render_info

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
    def body() -> int:
        from toyllm.engine.tools.sweep import run_experiment

        return run_experiment(experiment, out_dir, device, out, dry_run=dry_run)

    raise typer.Exit(_run(body))
# --- end of toyllm info / toyllm sweep --------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    app()
