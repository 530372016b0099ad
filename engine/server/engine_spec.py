"""What the server's engine is built from: the load arguments `toyllm serve` was given, as a
small picklable object, so that the engine can be built where it runs: in the engine process
(engine/server/engine_process.py: no model object crosses a process boundary, CUDA is never
forked) or in the server's own process for the engine thread (engine/server/engine_loop.py).

    spec = ServingSpec(model=None, device="cpu", dtype="fp32", kv_memory=2**24)
    engine, info = spec.build()     # the ServingEngine, and what the HTTP side needs of it

`EngineInfo` is what the HTTP side needs of the engine and its model besides the engine itself:
the tokenizer (prompts are encoded and chat templates rendered in the handlers), the context
length, the vocabulary, the checkpoint's sampling defaults, and names for the first line. It
pickles (the tokenizer too), so the engine process sends it once when it is ready.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class ServingSpec:
    """A ServingEngine on a model loaded as `toyllm serve` loads it."""

    model: str | None
    device: str  # resolved: cpu, cuda, cuda:N
    dtype: str  # auto, fp32, fp16, bf16
    kv_memory: int | float  # bytes, or a fraction of free memory (cli_numbers.memory_amount)
    random_weights: bool = False
    tokenizer: Path | None = None
    block_size: int = 16
    max_running: int = 64
    token_budget: int = 8192
    prefix_caching: bool = True
    max_context: int | None = None
    cuda_graph: bool = True
    overlap: bool = True  # ServingEngine's overlap where it applies (CUDA); False: off

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
