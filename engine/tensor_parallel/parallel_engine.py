"""`TensorParallelEngine`: the Python face of a tensor-parallel run, used like `Engine`.

    from toyllm.engine.tensor_parallel.parallel_engine import TensorParallelEngine

    with TensorParallelEngine(None, tensor_parallel=2, device="cpu") as engine:
        result = engine.generate(["def fib(n):"], SamplingParams(max_new_tokens=8))

It checks that the model splits into the ranks (from its config alone: one clear error before
any weight is read), starts the ranks (engine/tensor_parallel/launch.py), each of which loads its
own shard (load.py); rank 0 owns the tokenizer, sampling and the text (rank_engine.py), which
this process relays: streamed pieces to `on_text`, the `GenerationResult` back. A request the
engine refuses (an empty prompt, one longer than the context) raises here as it would from
`Engine`, and the ranks serve on; a rank that fails ends every rank and raises `RankFailure`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from toyllm.engine.device import DeviceError, resolve_device, resolve_dtype
from toyllm.engine.generate import GenerationResult, Prompt, TextCallback
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.tensor_parallel.launch import RankFailure, RankProcesses, World
from toyllm.engine.tensor_parallel.load import model_config_of
from toyllm.engine.tensor_parallel.plan import TensorParallelError, check_ranks
from toyllm.engine.tensor_parallel.rank_engine import ShardSpec, serve_ranks
from toyllm.models.config import ModelConfig

#: seconds a collective may wait for the other ranks before its rank fails (and so every rank)
DEFAULT_TIMEOUT_S = 300.0


def tensor_parallel_device(device: str | torch.device) -> torch.device:
    """'auto' (CUDA when present), 'cpu' or 'cuda': ranks take cuda:0..N-1 themselves, so a
    device index is refused."""
    if str(device) not in ("auto", "cpu", "cuda"):
        raise TensorParallelError(f"--device {device} with --tensor-parallel: expected auto, cpu "
                                  "or cuda (rank r runs on cuda:r)")
    try:
        return resolve_device(device)
    except DeviceError as exc:
        raise TensorParallelError(str(exc)) from None


class TensorParallelEngine:
    """generate(prompts, params, on_text) on `tensor_parallel` ranks; close() (or `with`)
    ends them. with_tokenizer=False: token-id prompts only (a random-weight shape whose
    vocabulary no tokenizer has, as the benchmarks run)."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        tensor_parallel: int,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = "auto",
        random_weights: bool = False,
        seed: int = 0,
        tokenizer: str | Path | None = None,
        with_tokenizer: bool = True,
        prefill_chunk: int | None = None,
        cuda_graph: bool | None = None,
        max_seq_len: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) \
                or tensor_parallel < 1:
            raise TensorParallelError(
                f"--tensor-parallel: expected a positive integer, got {tensor_parallel!r}")
        dev = tensor_parallel_device(device)
        dt = resolve_dtype(dtype, dev)
        self.config: ModelConfig = model_config_of(model, random_weights)  # no weight read
        check_ranks(self.config, tensor_parallel)
        world = World(tensor_parallel, dev.type, timeout_s)
        world.check()
        options = dict(prefill_chunk=prefill_chunk, max_seq_len=max_seq_len,
                       cuda_graph=(dev.type == "cuda") if cuda_graph is None else cuda_graph)
        spec = ShardSpec(None if model is None else str(model), dt, random_weights, seed,
                         None if tokenizer is None else str(tokenizer), options, with_tokenizer)
        self.device, self.dtype, self.ranks = dev, dt, tensor_parallel
        self._procs = RankProcesses.start(world, serve_ranks, spec)
        kind, info = self._procs.receive(0)
        if kind != "ready":
            self.close()
            raise RankFailure(f"rank 0 sent {kind!r} before it was ready")
        self.source: str = info["source"]
        self.load_s: float = info["load_s"]
        self.has_tokenizer: bool = info["tokenizer"]

    def generate(self, prompts: Sequence[Prompt] | str, params: SamplingParams | None = None,
                 on_text: TextCallback | None = None, *, chat: bool = False,
                 system: str | None = None) -> GenerationResult:
        """As Engine.generate; chat=True renders each prompt as a user turn (after an optional
        system message) through the model's chat template, on rank 0."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        for r in range(1, self.ranks):
            self._procs.send(r, "follow")
        self._procs.send(0, "generate", prompts, params or SamplingParams(),
                         on_text is not None, chat, system)
        while True:
            msg = self._procs.receive(0)
            if msg[0] == "result":
                return msg[1]
            if msg[0] == "error":  # refused before any step: the ranks serve on
                raise msg[1]
            if msg[0] != "text":
                self._procs.stop()
                raise RankFailure(f"unexpected message from rank 0: {msg[0]!r}; every rank "
                                  "was stopped")
            try:
                on_text(msg[1], msg[2])
            except BaseException:
                # the ranks are mid-request and cannot be told to drop it: end them all
                self._procs.stop()
                raise

    def abort(self) -> None:
        """End every rank now, whatever it is doing (after an interrupt or a failure)."""
        self._procs.stop()

    def close(self) -> None:
        """Tell the ranks to finish and wait for them (stopping any that hang)."""
        procs = self._procs
        if procs.closed:
            return
        for r in range(self.ranks):
            try:
                procs.send(r, "stop")
            except RankFailure:
                return
        procs.join()

    def __enter__(self) -> TensorParallelEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.abort()
