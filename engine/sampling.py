"""Token sampling: greedy, repetition penalty, temperature, top-k, top-p (nucleus) and min-p,
seeded and repeatable, with parameters of their own for every row of a batch.

The steps, in vLLM's and transformers' order: the repetition penalty on the raw logits (greedy
rows too), then temperature, then top-k, top-p and min-p on the scaled logits, then one draw.
Every parameter is a per-row tensor, so a batch whose requests ask for different things is
filtered in one pass (`sample_rows`); `sample` is the same code with one SamplingParams for
every row (the static Engine and chat).

Everything stays on the logits' device, so a decode step never waits for the host to pick a
token; the engine reads tokens back once per step to stream text and check stops. The per-row
numbers (and the seen tokens of the repetition penalty) reach the device by a copy that does
not wait for it.

Seeds are per request: every row draws from its own generator, seeded with the request's seed,
and every step a row takes is computed from that row alone (no sum whose order depends on the
batch), so prompt i with seed s gives the same tokens alone or in a batch of any size, next to
any other prompts with any other parameters (the rule vLLM gives its per-request seeds). A row
whose logits hold NaN or inf gets the token NONFINITE instead of a sample; the engine stops that
request with an error naming the step and the row (the flag rides on the tokens, so it costs no
extra host sync).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import torch
from torch import Tensor

from toyllm.engine.ops.argmax import argmax


class SamplingError(ValueError):
    """Sampling or stopping parameters out of range."""


# Temperatures below this are greedy: the limit of softmax(logits / T) as T -> 0 is the argmax,
# and dividing by a temperature such as 1e-300 overflows every logit to inf (vLLM: the same rule).
MIN_TEMPERATURE = 1e-5
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
MAX_LOGPROBS = 20  # most alternatives a token's log-probabilities list (OpenAI's top_logprobs)
NONFINITE = -1  # the token of a row whose logits are not all finite (toyllm::argmax's flag)

# The CLI's sampling for an option the user does not give and the model's
# generation_config.json does not set (models/generation_config.py)
CLI_SAMPLING_DEFAULTS: dict[str, float | int] = {
    "temperature": 0.7, "top_k": 0, "top_p": 0.95, "min_p": 0.0, "repetition_penalty": 1.0}


def sampling_fields(given: dict[str, float | int | None],
                    model_defaults: dict[str, float | int]) -> dict[str, float | int]:
    """The sampling fields of a CLI run: what the user gave (None: not given), else the
    model's generation_config.json, else CLI_SAMPLING_DEFAULTS.

    >>> sampling_fields({"temperature": None, "top_k": 5}, {"temperature": 0.6, "top_k": 20})
    {'temperature': 0.6, 'top_k': 5, 'top_p': 0.95, 'min_p': 0.0, 'repetition_penalty': 1.0}
    """
    chosen = {k: v for k, v in given.items() if v is not None}
    return {k: chosen.get(k, model_defaults.get(k, v)) for k, v in CLI_SAMPLING_DEFAULTS.items()}


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    min_p: float = 0.0  # keep tokens with p >= min_p * (the top token's p); 0.0: no filter
    repetition_penalty: float = 1.0  # seen tokens' logits: > 0 divided by it, < 0 times it
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_at_eos: bool = True
    # None: no log-probabilities; k: each output token's, and its k most likely alternatives'
    logprobs: int | None = None

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
        if isinstance(self.min_p, bool) or not isinstance(self.min_p, (int, float)) or \
                not 0 <= self.min_p <= 1:
            raise SamplingError(f"min_p: expected a number in [0, 1], got {self.min_p!r}")
        if isinstance(self.repetition_penalty, bool) or not isinstance(
                self.repetition_penalty, (int, float)) or not 0 < self.repetition_penalty \
                < math.inf:
            raise SamplingError("repetition_penalty: expected a finite number > 0, got "
                                f"{self.repetition_penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(
                self.seed, int) or not 0 <= self.seed <= MAX_SEED):
            raise SamplingError(f"seed: expected an integer in [0, 2**64 - 1], got {self.seed!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingError(f"stop: expected non-empty strings, got {s!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(
                self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise SamplingError(f"logprobs: expected None or an integer in [0, {MAX_LOGPROBS}], "
                                f"got {self.logprobs!r}")

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


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (log_softmax of its raw logits: before
    the repetition penalty, temperature and filters, as OpenAI reports them), and the most likely
    tokens with theirs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: Tensor, tokens: Sequence[int],
                   top: Sequence[int]) -> list[TokenLogprob]:
    """logits [rows, V] (any float dtype), the token sampled from each row, and how many
    alternatives each row wants (<= MAX_LOGPROBS): one TokenLogprob per row, one host sync."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [rows, V]
    index = torch.tensor(tokens, dtype=torch.int64, device=lp.device).clamp_min(0)
    chosen = lp.gather(1, index[:, None])[:, 0]  # [rows]
    k = max(top, default=0)
    values, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())  # [rows, k]
    chosen_l, values_l, ids_l = chosen.tolist(), values.tolist(), ids.tolist()
    return [TokenLogprob(int(t), chosen_l[r], tuple(zip(ids_l[r][:top[r]], values_l[r][:top[r]],
                                                         strict=True)))
            for r, t in enumerate(tokens)]


# Prefix sums of the top-p filter run over chunks of this many positions (see _mass_before).
PREFIX_CHUNK = 256

# On the CPU, top-p first looks among a row's this many most likely tokens (_top_p_drop_row).
TOP_P_CANDIDATES = 256


def _to_device(values: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on `device`, copied without waiting for the device: from pinned memory
    on CUDA (torch's host allocator keeps the buffer until the copy has run)."""
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def seen_mask(seen: Sequence[Sequence[int]], rows: Sequence[int], vocab: int,
              device: torch.device) -> Tensor:
    """[len(seen), vocab] bool: True where row r has seen the token (rows not listed in `rows`
    stay all False). seen: each row's prompt and output token ids so far."""
    ids = torch.tensor(list(chain.from_iterable(seen[r] for r in rows)))
    if not ids.numel():
        ids = ids.long()
    elif ids.dtype != torch.int64:  # floats or bools among the ids: refused, never truncated
        raise SamplingError(f"seen: expected integer token ids, got {ids.dtype} values")
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)][0].item()
        raise SamplingError(f"seen: expected token ids in [0, {vocab}), got {bad}")
    counts = torch.tensor([len(seen[r]) for r in rows], dtype=torch.int64)
    row_ids = torch.repeat_interleave(torch.tensor(list(rows), dtype=torch.int64), counts)
    index = _to_device(torch.stack([row_ids, ids]), device)  # [2, seen tokens]
    mask = torch.zeros(len(seen), vocab, dtype=torch.bool, device=device)
    mask[index[0], index[1]] = True
    return mask


def apply_repetition_penalty(logits: Tensor, penalty: Tensor, seen: Tensor) -> Tensor:
    """The repetition penalty of transformers and vLLM: a seen token's logit is divided by the
    penalty where it is > 0 and multiplied by it where it is < 0 (so a penalty > 1 always makes
    it less likely). logits [rows, V] fp32, penalty [rows] fp32, seen [rows, V] bool."""
    pen = penalty.unsqueeze(-1)
    return torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)


def _mass_before(probs: Tensor) -> Tensor:
    """probs [rows, V] -> [rows, V]: the sum of each row's probabilities before each position,
    computed from that row alone. On the CPU torch's cumsum along the last dim is one sequential
    loop per row (accumulated in double); on CUDA its algorithm, and so its rounding, depends on
    the number of rows too, which would let a row's top-p set depend on its neighbours: there
    the sums come from _chunked_mass_before."""
    if probs.device.type == "cpu":
        rows = probs.shape[0]
        return torch.cat([probs.new_zeros(rows, 1), torch.cumsum(probs, dim=-1)[:, :-1]], dim=1)
    return _chunked_mass_before(probs)


def _chunked_mass_before(probs: Tensor) -> Tensor:
    """_mass_before summed in an order that V alone fixes, on any device: sequentially within
    chunks of PREFIX_CHUNK positions, and the chunks' totals sequentially before them. A cumsum
    along a dim that is not the last is one sequential loop per column on every device, which is
    what this uses (never with a single column: torch hands that case to another algorithm)."""
    rows, vocab = probs.shape
    chunks = max(2, -(-vocab // PREFIX_CHUNK))
    padded = torch.nn.functional.pad(probs, (0, chunks * PREFIX_CHUNK - vocab))
    within = padded.view(rows, chunks, PREFIX_CHUNK).transpose(1, 2)  # [rows, CHUNK, chunks]
    within = torch.cumsum(within, dim=1)
    totals = within[:, -1, :]  # [rows, chunks]
    paired = torch.stack([totals, torch.zeros_like(totals)], dim=-1)  # [rows, chunks, 2]
    through = torch.cumsum(paired, dim=1)[..., 0]  # [rows, chunks]: totals up to each chunk
    carry = torch.cat([through.new_zeros(rows, 1), through[:, :-1]], dim=1)  # before each chunk
    before = torch.cat([within.new_zeros(rows, 1, chunks), within[:, :-1, :]], dim=1)
    mass = (before + carry.unsqueeze(1)).transpose(1, 2).reshape(rows, -1)
    return mass[:, :vocab]


def _row_numbers(params: Sequence[SamplingParams], vocab: int,
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each row's temperature, top-k, top-p and min-p as [rows] tensors on `device` (fp32,
    int64, fp32, fp32), in one copy. Greedy rows get numbers that filter nothing; a top-k of
    the vocab or more is no filter."""
    numbers = torch.tensor(
        [[1.0, 0.0, 1.0, 0.0] if p.greedy else
         [p.temperature, p.top_k if p.top_k < vocab else 0, p.top_p, p.min_p] for p in params],
        dtype=torch.float64)  # [rows, 4]; float64 holds every top_k below a vocab exactly
    numbers = _to_device(numbers.T.contiguous(), device)
    return numbers[0].float(), numbers[1].long(), numbers[2].float(), numbers[3].float()


def filtered_logits(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """logits [rows, V] fp32, finite -> [rows, V] fp32: each row divided by its temperature,
    then its logits outside its top-k, top-p and min-p sets set to -inf (in that order). A row
    whose filters are off (and every greedy row: temperature 1, no filter) comes back bit for
    bit the same whatever its neighbours ask; which filters run is decided on the host, from
    `params`, so nothing waits for the device."""
    rows, vocab = logits.shape
    temperature, top_k, top_p, min_p = _row_numbers(params, vocab, logits.device)
    # a small temperature or repetition penalty can push a finite logit past fp32's range: such
    # a logit stays the largest (or smallest) one instead of turning the softmax into NaN
    big = torch.finfo(torch.float32).max
    scaled = (logits / temperature.unsqueeze(-1)).clamp(-big, big)
    sampled = [p for p in params if not p.greedy]
    drop = None  # [rows, V] bool: tokens filtered out
    k_max = max((p.top_k for p in sampled if p.top_k < vocab), default=0)
    if k_max:
        # top-k: keep the logits >= the row's k-th largest (ties at the k-th all stay)
        kth = torch.topk(scaled, k_max, dim=-1).values.gather(
            -1, (top_k - 1).clamp(min=0).unsqueeze(-1))  # [rows, 1]
        kth = kth.masked_fill((top_k == 0).unsqueeze(-1), -math.inf)
        drop = scaled < kth
    if any(p.top_p < 1 for p in sampled):
        # top-p: in order of probability (after top-k), drop a token when the tokens before it
        # already hold top_p of the mass
        kept = scaled if drop is None else scaled.masked_fill(drop, -math.inf)
        if kept.device.type == "cpu":  # row by row, most rows without sorting the vocabulary
            drop_p = torch.stack([_top_p_drop_row(kept[r], float(top_p[r]))
                                  for r in range(rows)])
        else:
            drop_p = _top_p_drop(kept, top_p)
        drop = drop_p if drop is None else drop | drop_p
    if any(p.min_p > 0 for p in sampled):
        # min-p: keep p >= min_p * p_max, i.e. exp(logit - max logit) >= min_p (the softmax's
        # normaliser cancels, so the test is exact and needs no sum; top-k and top-p keep the
        # top token and rescale all others alike, so it is the same before or after them).
        # The differences are raised to log(min_p) - 1 first: exp of that is min_p / e, still
        # below min_p, so no decision changes, and exp never underflows: torch.exp on the CPU
        # takes ~40x longer on values whose exp underflows (each a microcode assist; a row far
        # below its top logit, after a low temperature). Rows without min-p are raised to 0 and
        # keep everything.
        floor = torch.where(min_p > 0, min_p.log() - 1, 0.0).unsqueeze(-1)
        ratio = (scaled - scaled.amax(dim=-1, keepdim=True)).clamp(min=floor).exp()
        drop_m = ratio < min_p.unsqueeze(-1)
        drop = drop_m if drop is None else drop | drop_m
    return scaled if drop is None else scaled.masked_fill(drop, -math.inf)


def _top_p_drop(kept: Tensor, top_p: Tensor) -> Tensor:
    """kept [rows, V] (-inf where an earlier filter dropped), top_p [rows] -> [rows, V] bool:
    the tokens top-p drops, from the whole of each row in order of probability (a stable sort,
    descending), each token's probability the row's softmax (so the same numbers whatever the
    order they are summed in: _top_p_drop_row's). Rows with top_p 1 drop nothing."""
    order = torch.sort(kept, dim=-1, descending=True, stable=True).indices
    probs = kept.softmax(dim=-1).gather(-1, order)
    drop_sorted = _mass_before(probs) >= top_p.unsqueeze(-1)
    # the most likely token always stays: a top_p below fp32's range (1e-300) is 0 here
    drop_sorted[:, 0] = False
    drop_sorted &= (top_p < 1).unsqueeze(-1)
    return torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)


def _top_p_drop_row(kept: Tensor, top_p: float) -> Tensor:
    """_top_p_drop of one CPU row [V] without sorting all of it where it need not: torch sorts
    a row on the CPU at ~60 ns a token (2 ms a token for a 32k vocabulary, more than a small
    model's decode step). The row's TOP_P_CANDIDATES most likely tokens (and every token tied
    with the last of them) are sorted as the whole row would order them (stable, descending);
    where they hold top_p of the mass, every other token comes after them and is dropped, and
    those sorted first are decided as the whole sort decides them (the same probabilities,
    summed in the same order: the same bits). Otherwise, the whole row is sorted. Depends on
    the row alone."""
    vocab = kept.shape[0]
    if top_p >= 1:
        return torch.zeros(vocab, dtype=torch.bool)
    if vocab <= TOP_P_CANDIDATES:
        return _top_p_drop(kept.unsqueeze(0), torch.tensor([top_p]))[0]
    kth = torch.topk(kept, TOP_P_CANDIDATES).values[-1]
    # in token order, so that ties keep the whole sort's order; not those an earlier filter
    # dropped (-inf: probability 0, dropped already)
    candidates = torch.nonzero((kept >= kth) & (kept > -math.inf)).squeeze(1)
    order = torch.sort(kept[candidates], descending=True, stable=True).indices
    ranked = candidates[order]
    probs = kept.softmax(dim=-1)[ranked]
    # the mass before each candidate, and (one position further) before every other token
    before = _mass_before(torch.cat([probs, probs.new_zeros(1)]).unsqueeze(0))[0]
    if float(before[-1]) < top_p:  # the rest of the row is needed
        return _top_p_drop(kept.unsqueeze(0), torch.tensor([top_p]))[0]
    drop = torch.ones(vocab, dtype=torch.bool)
    ranked_drop = before[:-1] >= top_p
    ranked_drop[0] = False  # the most likely token always stays
    drop[ranked] = ranked_drop
    return drop


def _check_logits(logits: Tensor) -> None:
    if logits.dim() != 2 or not logits.is_floating_point() or logits.shape[1] < 1:
        raise SamplingError("logits: expected a float tensor [rows, vocab] with vocab >= 1, "
                            f"got {logits.dtype} of shape {list(logits.shape)}")


def _check_rows(logits: Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None],
                seen: Sequence[Sequence[int]] | None) -> None:
    _check_logits(logits)
    rows = logits.shape[0]
    for name, given in (("params", params), ("generators", generators), ("seen", seen)):
        if given is not None and len(given) != rows:
            raise SamplingError(f"{name}: expected one per row ({rows}), got {len(given)}")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise SamplingError(f"params: expected SamplingParams, got {type(p).__name__}")
    if seen is None and any(p.repetition_penalty != 1 for p in params):
        raise SamplingError("seen: expected each row's prompt and output token ids (a row has "
                            "a repetition_penalty), got None")


def sample_rows(logits: Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None],
                seen: Sequence[Sequence[int]] | None = None,
                cuda_argmax: bool = True) -> Tensor:
    """One token per row, each row with its own parameters and generator.

    logits [rows, V] (any float dtype; filters run in fp32) -> token ids int64 [rows].
    params, generators: one per row (a generator None draws from torch's global RNG; greedy
    rows draw nothing). seen: each row's prompt and output token ids so far, needed where a row
    has a repetition_penalty other than 1. Greedy rows are torch.argmax's answer (of the
    penalised logits where a row has a penalty), on CUDA from the toyllm::argmax kernel
    (engine/ops/argmax.py; `cuda_argmax` False: torch.argmax). A row with a NaN or inf logit
    gets NONFINITE."""
    _check_rows(logits, params, generators, seen)
    rows, vocab = logits.shape
    penalised = [r for r, p in enumerate(params) if p.repetition_penalty != 1]
    greedy = [p.greedy for p in params]
    if all(greedy) and not penalised:
        # the argmax pass flags the rows: no reduction of its own (on CUDA, one kernel in all)
        return argmax(logits, kernel=cuda_argmax, flag_nonfinite=True)
    # one reduction, accumulated in fp32 (an fp16 sum of finite logits could overflow): its
    # total is finite exactly when every logit of the row is (barring a 1e38 total)
    finite = torch.isfinite(torch.sum(logits, dim=-1, dtype=torch.float32))  # [rows]
    if penalised:
        assert seen is not None  # _check_rows
        penalty = _to_device(torch.tensor([p.repetition_penalty for p in params],
                                          dtype=torch.float32), logits.device)
        logits = apply_repetition_penalty(logits.float(), penalty,
                                          seen_mask(seen, penalised, vocab, logits.device))
    greedy_tokens = argmax(logits, kernel=cuda_argmax) if any(greedy) else None  # [rows]
    if all(greedy):
        assert greedy_tokens is not None
        return greedy_tokens.masked_fill(~finite, NONFINITE)
    scaled = filtered_logits(logits.float().masked_fill(~finite.unsqueeze(-1), 0.0), params)
    probs = scaled.softmax(dim=-1)  # [rows, V]
    # each row draws from its own stream, so its tokens ignore its neighbours. The draw is
    # torch.multinomial's for one sample (the argmax of p / q, q ~ Exp(1) drawn from the row's
    # generator: the same tokens), without its host-side check of p, a device sync per row that
    # would stall a host launching the next step (ServingEngine's overlap); p is valid here:
    # a softmax of finite logits (non-finite rows were zeroed, and are flagged below)
    drawn = [row for row in range(rows) if not greedy[row]]
    noise = torch.cat([torch.empty_like(probs[row : row + 1]).exponential_(
        1, generator=generators[row]) for row in drawn])  # [drawn rows, V]
    if greedy_tokens is None:
        tokens = (probs / noise).argmax(dim=-1)
    else:
        index = _to_device(torch.tensor(drawn, dtype=torch.int64), logits.device)
        tokens = greedy_tokens.index_copy(
            0, index, (probs.index_select(0, index) / noise).argmax(dim=-1))
    return tokens.masked_fill(~finite, NONFINITE)


def sample(logits: Tensor, params: SamplingParams,
           generator: torch.Generator | Sequence[torch.Generator] | None,
           cuda_argmax: bool = True, seen: Sequence[Sequence[int]] | None = None) -> Tensor:
    """sample_rows with the same params for every row. logits [B, V] -> token ids int64 [B].
    generator: one for the batch (rows draw from it in turn), or one per row (make_generators:
    rows beyond the list are padding and get token 0). seen: as sample_rows, one per row of
    logits (needed with a repetition_penalty)."""
    rows = logits.shape[0]
    if generator is None or isinstance(generator, torch.Generator):
        generators: list[torch.Generator | None] = [generator] * rows
    else:
        generators = list(generator)
    real = len(generators)
    if real > rows:
        raise SamplingError(f"generator: expected at most one per row ({rows}), got {real}")
    if seen is not None and len(seen) != rows:
        raise SamplingError(f"seen: expected one per row ({rows}), got {len(seen)}")
    if (isinstance(params, SamplingParams) and params.greedy
            and params.repetition_penalty == 1):
        # every row greedy with nothing to penalise: sample_rows' answer (its first branch)
        # without its per-row lists, which a decode step would otherwise build every token
        _check_logits(logits)
        tokens = argmax(logits[:real] if real < rows else logits, kernel=cuda_argmax,
                        flag_nonfinite=True)
    else:
        tokens = sample_rows(logits[:real], [params] * real, generators,
                             None if seen is None else seen[:real], cuda_argmax)
    if real < rows:
        tokens = torch.cat([tokens, tokens.new_zeros(rows - real)])
    return tokens
