"""What `toyllm generate --tensor-parallel N` drives: the ranks, seen through the shapes the
one-process command already prints (engine/cli.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toyllm.engine.generate import GenerationResult
from toyllm.engine.tensor_parallel.parallel_engine import TensorParallelEngine


@dataclass
class RanksLoaded:
    """The LoadedModel fields the command prints (the weights stay in the ranks)."""

    source: str
    load_s: float
    tokenizer: bool | None  # None: rank 0 found no tokenizer


class OneRequest:
    """engine.generate(inputs, params, on_text) once, then the ranks end (also on failure)."""

    def __init__(self, engine: TensorParallelEngine, chat: bool, system: str | None) -> None:
        self.engine, self.chat, self.system = engine, chat, system

    def generate(self, inputs: Any, params: Any, on_text: Any = None) -> GenerationResult:
        try:
            result = self.engine.generate(inputs, params, on_text, chat=self.chat,
                                          system=self.system)
        except BaseException:  # a refusal, a failed rank, Ctrl-C: no rank is left running
            self.engine.abort()
            raise
        self.engine.close()
        return result


def start_ranks(model: str | None, ranks: int, device: str, dtype: str, random_weights: bool,
                tokenizer: Path | None, chat: bool, system: str | None,
                **engine_options: Any) -> tuple[OneRequest, RanksLoaded, torch.device,
                                                 torch.dtype]:
    """Start the ranks (every check first: the rank count, the devices, the model's config);
    (the engine for one request, what was loaded, device type, dtype)."""
    if engine_options.get("cuda_graph"):  # the flag's default: on where the device is CUDA
        engine_options["cuda_graph"] = None
    engine = TensorParallelEngine(model, tensor_parallel=ranks, device=device, dtype=dtype,
                                  random_weights=random_weights, tokenizer=tokenizer,
                                  **engine_options)
    if not engine.has_tokenizer:
        engine.close()
    loaded = RanksLoaded(engine.source, engine.load_s, engine.has_tokenizer or None)
    return OneRequest(engine, chat, system), loaded, engine.device, engine.dtype
