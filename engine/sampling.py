"""Token sampling: greedy, temperature, top-k and top-p (nucleus), seeded and repeatable.

Everything stays on the logits' device, so a decode step never waits for the host to pick a
token; the engine reads tokens back once per step to stream text and check stops.

Seeds are per request: every row draws from its own generator, seeded with the request's seed,
so prompt i with seed s gives the same tokens alone or in a batch of any size, next to any
other prompts (the rule vLLM gives its per-request seeds). A row whose logits hold NaN or inf
gets the token NONFINITE instead of a sample; the engine stops that request with an error
naming the step and the row (the flag rides on the tokens, so it costs no extra host sync).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from toyllm.engine.ops.argmax import argmax


class SamplingError(ValueError):
    """Sampling or stopping parameters out of range."""


# Temperatures below this are greedy: the limit of softmax(logits / T) as T -> 0 is the argmax,
# and dividing by a temperature such as 1e-300 overflows every logit to inf (vLLM: the same rule).
MIN_TEMPERATURE = 1e-5
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
NONFINITE = -1  # the token of a row whose logits are not all finite (toyllm::argmax's flag)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens <= 0:
            raise SamplingError(
                f"max_new_tokens: expected a positive integer, got {self.max_new_tokens!r}"
            )
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature >= 0 or \
                self.temperature == float("inf"):
            raise SamplingError(
                f"temperature: expected a finite number >= 0, got {self.temperature!r}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k: expected an integer >= 0, got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or \
                not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(
                self.seed, int) or not 0 <= self.seed <= MAX_SEED):
            raise SamplingError(f"seed: expected an integer in [0, 2**64 - 1], got {self.seed!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingError(f"stop: expected non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator seeded from params.seed (None: nondeterministic, from torch's global RNG)."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def make_generators(params: SamplingParams, device: torch.device,
                    rows: int) -> list[torch.Generator] | None:
    """One generator per request row, each seeded with params.seed (the request's own seed,
    not its position in the batch); None for greedy."""
    if params.greedy:
        return None
    return [make_generator(params, device) for _ in range(rows)]


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set logits outside the top-k / top-p set to -inf. logits: [B, V] float32."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked before it already reach top_p
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        # the most likely token always stays: a top_p below fp32's range (1e-300) compares
        # as 0 here and would otherwise drop every token
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: Tensor, params: SamplingParams,
           generator: torch.Generator | Sequence[torch.Generator] | None,
           cuda_argmax: bool = True) -> Tensor:
    """logits [B, V] (any float dtype; sampling widens them to fp32) -> token ids int64 [B].
    Greedy is torch.argmax's answer, on CUDA from the toyllm::argmax kernel (engine/ops/argmax.py;
    `cuda_argmax` False: torch.argmax).
    generator: one for the batch, or one per row (make_generators: rows beyond the list are
    padding and get token 0). A row with a NaN or inf logit gets NONFINITE."""
    if params.greedy:
        # the argmax pass flags the rows: no reduction of its own (on CUDA, one kernel in all)
        return argmax(logits, kernel=cuda_argmax, flag_nonfinite=True)
    # one reduction, accumulated in fp32 (an fp16 sum of finite logits could overflow): its
    # total is finite exactly when every logit of the row is (barring a 1e38 total)
    finite = torch.isfinite(torch.sum(logits, dim=-1, dtype=torch.float32))  # [B]
    scaled = logits.float().masked_fill(~finite.unsqueeze(-1), 0.0) / params.temperature
    scaled = filter_logits(scaled, params.top_k, params.top_p)
    probs = scaled.softmax(dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        # each row draws from its own stream, so its tokens ignore its neighbours
        picks = [torch.multinomial(probs[row : row + 1], 1, generator=gen)
                 for row, gen in enumerate(generator)]
        padding = probs.shape[0] - len(picks)
        if padding:
            picks.append(torch.zeros(padding, 1, dtype=torch.int64, device=probs.device))
        tokens = torch.cat(picks).squeeze(-1)
    return tokens.masked_fill(~finite, NONFINITE)
