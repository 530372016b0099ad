"""What the server's engine is built from. `EngineOptions`: the engine's load arguments as
`toyllm serve` takes them, each declared once with its default (launch.py's ServeOptions adds
the server's own). `ServingSpec`: those options checked, with the device resolved and the
pool's size parsed (`ServingSpec.from_options`, the one place that does it), as a small
picklable object, so that the engine can be built where it runs: in the engine process
(engine/server/engine_process.py: no model object crosses a process boundary, CUDA is never
forked) or in the server's own process for the engine thread (engine/server/engine_loop.py).

    spec = ServingSpec.from_options(EngineOptions(device="cpu", dtype="fp32", kv_memory="16MiB"))
    engine, info = spec.build()     # the ServingEngine, and what the HTTP side needs of it

`EngineInfo` is what the HTTP side needs of the engine and its model besides the engine itself:
the tokenizer (prompts are encoded and chat templates rendered in the handlers), the context
length, the vocabulary, the checkpoint's sampling defaults, and names for the first line. It
pickles (the tokenizer too), so the engine process sends it once when it is ready.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol


class ServeError(ValueError):
    """A `toyllm serve` option that cannot work (exit 2, one line)."""


@dataclass
class EngineInfo:
    tokenizer: Any  # Tokenizer | HFTokenizer
    source: str  # the model's path (its name is the served model's default name)
    vocab_size: int
    max_seq_len: int  # the engine's context (after --max-context)
    max_running: int
    device: str
    dtype: str  # fp32, fp16, bf16
    sampling_defaults: dict[str, float | int] = field(default_factory=dict)


class EngineSpec(Protocol):
    """Anything that builds an engine with ServingEngine's serving face (add_request, abort,
    step, has_unfinished, stats, prefix, device, max_running) and says what it is."""

    def build(self) -> tuple[Any, EngineInfo]: ...


@dataclass
class EngineOptions:
    model: str | None = None
    random_weights: bool = False  # with a config .toml: random weights (benchmarks)
    tokenizer: Path | None = None
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # auto, fp32, fp16, bf16
    block_size: int = 16
    # --kv-memory: a size (16MiB, or bytes) or a fraction of free memory (0.9); in a
    # ServingSpec, parsed: bytes (int) or the fraction (float), as cli_numbers.memory_amount says
    kv_memory: str | int | float = "0.9"
    max_running: int = 64
    token_budget: int = 8192
    prefix_caching: bool = True
    max_context: int | None = None
    cuda_graph: bool = True
    overlap: bool = True  # ServingEngine's overlap where it applies (CUDA); False: off


@dataclass
class ServingSpec(EngineOptions):
    """A ServingEngine on a model loaded as `toyllm serve` loads it: EngineOptions whose
    numbers are checked, whose device is resolved (cpu, cuda, cuda:N) and whose kv_memory is
    parsed. Build one with `from_options`."""

    @classmethod
    def from_options(cls, o: EngineOptions) -> ServingSpec:
        """The engine fields of `o` (a ServeOptions too: only these are taken), checked and
        resolved; NumberError or DeviceError (one line, exit 2 on the CLI) for a bad one."""
        from toyllm.engine import cli_numbers
        from toyllm.engine.device import resolve_device, resolve_dtype

        cli_numbers.integer("--block-size", o.block_size)
        cli_numbers.integer("--max-running", o.max_running)
        cli_numbers.integer("--token-budget", o.token_budget)
        if o.max_context is not None:
            cli_numbers.integer("--max-context", o.max_context)
        pool = cli_numbers.memory_amount("--kv-memory", str(o.kv_memory))
        dev = resolve_device(o.device)
        resolve_dtype(o.dtype, dev)  # checked here, resolved where the model loads
        given = {f.name: getattr(o, f.name) for f in fields(EngineOptions)}
        return cls(**{**given, "device": str(dev), "kv_memory": pool})

    def build(self) -> tuple[Any, EngineInfo]:
        import torch

        from toyllm.engine.device import dtype_name, resolve_dtype
        from toyllm.engine.serving import ServingEngine
        from toyllm.models.model_source import load_model

        dev = torch.device(self.device)
        dt = resolve_dtype(self.dtype, dev)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # the current device is per thread (and per process)
        loaded = load_model(self.model, dev, dt, random_weights=self.random_weights,
                            tokenizer_path=self.tokenizer)
        if loaded.tokenizer is None:
            raise ServeError(f"{loaded.source}: no tokenizer found (tokenizer.json or "
                             "tokenizer.model); pass --tokenizer")
        engine = ServingEngine(
            loaded.model, loaded.tokenizer, block_size=self.block_size,
            kv_memory=self.kv_memory, max_running=self.max_running,
            token_budget=self.token_budget, prefix_caching=self.prefix_caching,
            cuda_graph=self.cuda_graph and dev.type == "cuda", max_seq_len=self.max_context,
            overlap=None if self.overlap else False)
        return engine, EngineInfo(loaded.tokenizer, loaded.source, loaded.config.vocab_size,
                                  engine.max_seq_len, self.max_running, str(dev),
                                  dtype_name(dt), dict(loaded.sampling_defaults))
