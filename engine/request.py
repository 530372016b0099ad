"""One request of the serving engine (engine/serving.py): its tokens, how far its K/V are
computed, its sampling state, its stream and its timings.

A request's tokens are `token_ids` = prompt then output. `num_computed` counts the leading
tokens whose K/V are in the paged cache (prefix-cache hits included). Every scheduler step gives
a request one chunk of its not-yet-computed tokens, [num_computed, num_computed + n); when the
chunk reaches the last known token, its logits sample the next one. A decode step is the chunk
of one token (the token sampled last); a prefill is a longer chunk; a preempted request drops
its cache (num_computed = 0) and later recomputes prompt and output the same way, so its tokens
never change: its generator advances only when it samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from toyllm.engine.sampling import SamplingParams, TokenLogprob
from toyllm.engine.stopping import StopWatcher
from toyllm.models.tokenizer import StreamDecoder

#: finish_reason of a request stopped by ServingEngine.abort
ABORT = "abort"
#: finish_reason of a request whose logits were not finite (its RequestOutput names the error)
ERROR = "error"


class RequestStatus(Enum):
    WAITING = "waiting"  # queued (new, or preempted: its cache dropped, to be recomputed)
    RUNNING = "running"  # holds a cache slot and blocks; scheduled every step
    FINISHED = "finished"


@dataclass
class RequestTimings:
    """perf_counter seconds: when the request arrived, when its first token was sampled, and
    when each of its tokens was sampled (the first included)."""

    arrival: float
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    def inter_token_latencies(self) -> list[float]:
        """Seconds between consecutive tokens."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


@dataclass(eq=False)
class Request:
    request_id: str
    order: int  # arrival number: the scheduler preempts the highest first (the newest)
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None  # its own seeded stream (None: greedy)
    decoder: StreamDecoder | None  # None without a tokenizer (no text, ids only)
    watcher: StopWatcher
    timings: RequestTimings
    token_ids: list[int] = field(default_factory=list)  # prompt, then output
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    seq: int | None = None  # its slot in the paged cache while running
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    error: str | None = None  # why it finished with ERROR
    text: str = ""  # output text so far (stop strings held back, as StopWatcher releases it)
    # what the next RequestOutput reports: tokens and text since the last one
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[TokenLogprob] = field(default_factory=list)  # params.logprobs set
    # prefix cache bookkeeping (engine/prefix_cache.py): chained hashes of its full blocks,
    # and how many of its leading blocks are registered in (or adopted from) the cache
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    # the block the next token lands in may be shared (adopted whole, or a fork's): copy it
    # before writing (PagedKVCache.copy_on_write)
    tail_may_be_shared: bool = False
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache at first admission
    preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V are still to compute (>= 1 while the request is unfinished)."""
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def record_token(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self.timings.first_token is None:
            self.timings.first_token = now
        self.timings.token_times.append(now)
