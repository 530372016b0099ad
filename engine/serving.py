"""The serving engine: many requests at once through a paged KV cache, continuously batched.

    >>> import torch
    >>> from toyllm.engine.serving import ServingEngine
    >>> from toyllm.engine.sampling import SamplingParams
    >>> from toyllm.models.model_source import load_model
    >>> loaded = load_model(None, torch.device("cpu"), torch.float32)  # the shipped model
    >>> engine = ServingEngine(loaded.model, loaded.tokenizer, kv_memory=2**22)
    >>> rid = engine.add_request("def fib(n):", SamplingParams(max_new_tokens=4))
    >>> outputs = []
    >>> while engine.has_unfinished():
    ...     outputs += engine.step()
    >>> outputs[-1].finished, outputs[-1].finish_reason, outputs[-1].completion_tokens
    (True, 'max_new_tokens', 4)

Requests are added at any time (`add_request`, checked before anything is queued) and run as
the scheduler allows (engine/scheduler.py): each `step` is one forward pass over the decode
rows of the running requests and chunks of waiting prompts, then one token sampled for every
request whose known tokens are all computed. Each request has its own SamplingParams and seed
(its tokens are the same alone or next to any others). Finish reasons are the static Engine's
(engine/generate.py): "eos", "stop", "max_new_tokens", "length" (its context, or the pool, is
full), plus "abort" (`abort`) and "error" (its logits were not finite; the output says so).

The K/V pool is one PagedKVCache (engine/ops/paged_cache.py) sized by `kv_memory`: bytes, or a
fraction of the device's free memory (CUDA) or available memory (CPU), never more than
max_running full contexts. Full blocks are shared between requests through the prefix cache
(engine/prefix_cache.py). Pure decode steps replay CUDA graphs per batch bucket
(engine/paged_graphs.py) on CUDA, and with `overlap` (on by default on CUDA) they are
pipelined: the host plans and launches each while the one before still runs, then accepts the
earlier one's tokens (step(); docs/SERVING.md).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from toyllm.engine.generate import (
    Completion,
    GenerationError,
    GenerationResult,
    GenerationStats,
    Prompt,
    TextCallback,
    encode_prompt,
    engine_forward,
)
from toyllm.engine.ops.paged_cache import PagedKVCache
from toyllm.engine.paged_step import PackedPrefill, PagedStep, prefill_segment
from toyllm.engine.prefix_cache import PrefixCache
from toyllm.engine.request import ABORT, ERROR, Request, RequestStatus, RequestTimings
from toyllm.engine.sampling import (
    NONFINITE,
    SamplingParams,
    TokenLogprob,
    make_generator,
    sample_rows,
    token_logprobs,
)
from toyllm.engine.scheduler import Chunk, Scheduler, StepPlan, blocks_for
from toyllm.engine.settings import Settings
from toyllm.engine.stopping import StopWatcher
from toyllm.engine.varlen_attention import varlen_causal_attention
from toyllm.models.llama import Transformer
from toyllm.models.rope import rope_table
from toyllm.models.tokenizer import StreamDecoder, Tokenizer

DEFAULT_TOKEN_BUDGET = 8192


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request: its new tokens and text (stop strings held
    back until they can no longer start one), and whether it finished."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # eos, stop, max_new_tokens, length, abort, error
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None  # with finish_reason "error": what went wrong
    timings: RequestTimings | None = None  # when finished: arrival, first token, each token
    # with params.logprobs: one per token of new_token_ids (engine/sampling.py TokenLogprob)
    logprobs: list[TokenLogprob] | None = None


@dataclass
class ServingStats:
    running: int
    waiting: int
    blocks_used: int
    blocks_free: int
    blocks_total: int
    blocks_cached: int  # blocks the prefix cache holds a reference on
    block_size: int
    bytes_per_block: int
    preemptions: int
    prefix_hit_blocks: int  # blocks adopted from the prefix cache
    prefix_evictions: int
    steps: int
    prefill_tokens: int  # tokens computed in chunks of more than one token
    decode_tokens: int  # tokens computed one per request (decode rows)
    finished: int
    # decode steps launched before the previous step's tokens were taken (overlap): rows of
    # requests that those tokens finished are in decode_tokens too
    steps_ahead: int = 0


def check_block_size(block_size: object, max_seq_len: int) -> int:
    """block_size: a positive power of two that divides the context (GenerationError)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 \
            or block_size & (block_size - 1):
        raise GenerationError(f"block_size: expected a positive power of two, got {block_size!r}")
    if max_seq_len % block_size:
        raise GenerationError(f"block_size: expected a divisor of the context length "
                              f"{max_seq_len}, got {block_size}")
    return block_size


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise GenerationError(f"{name}: expected a positive integer, got {value!r}")
    return value


def available_memory(device: torch.device) -> int:
    """Bytes free for the pool: CUDA's free device memory, or the CPU's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not on this platform: 1 GiB
        return 2**30


def pool_bytes(kv_memory: object, device: torch.device) -> int:
    """kv_memory as bytes: an int is bytes, a float in (0, 1] a fraction of available_memory."""
    if isinstance(kv_memory, bool) or not isinstance(kv_memory, int | float):
        raise GenerationError(f"kv_memory: expected bytes (a positive int) or a fraction of free "
                              f"memory in (0, 1], got {kv_memory!r}")
    if isinstance(kv_memory, int):
        if kv_memory <= 0:
            raise GenerationError(f"kv_memory: expected a positive number of bytes, "
                                  f"got {kv_memory}")
        return kv_memory
    if not 0 < kv_memory <= 1:
        raise GenerationError(f"kv_memory: expected a fraction of free memory in (0, 1], "
                              f"got {kv_memory}")
    return int(available_memory(device) * kv_memory)


# The packed prefill: all of a step's prefill chunks in one FlashAttention varlen call per layer
# (engine/varlen_attention.py), where forward.py says it applies (CUDA, fp16/bf16). The
# alternative, one SDPA call per chunk, lets cuDNN build a plan for each new chunk shape: on the
# serving workload that host time dominated every prefill-carrying step (docs/PERF.md).
PACKED_PREFILL = True


@dataclass(slots=True)
class _InFlight:
    """A pure decode step launched and not taken yet (ServingEngine.step's overlap): its plan
    (one sampling row per request), its sampled tokens on the device (the inputs of a step
    planned ahead), their copy on the host, and the event after which that copy is there
    (None off CUDA: it is there already)."""

    plan: StepPlan
    tokens: Tensor  # int64 [rows] on the device
    host: Tensor  # int64 [rows] on the host: pinned on CUDA, written by a copy in flight
    ready: torch.cuda.Event | None


class ServingEngine:
    """Continuous batching over a paged KV cache for one model on one device.

    One thread drives it (a server's engine loop); it is not thread-safe. Build it after the
    model has its final device and dtype."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        *,
        block_size: int = 16,
        kv_memory: int | float = 0.9,
        max_running: int = 256,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        prefix_caching: bool = True,
        cuda_graph: bool | None = None,
        max_seq_len: int | None = None,
        settings: Settings | None = None,
        packed_prefill: bool | None = None,
        overlap: bool | None = None,
    ) -> None:
        config = model.config
        if max_seq_len is not None:
            _positive_int("max_seq_len", max_seq_len)
        self.max_seq_len = min(max_seq_len or config.max_seq_len, config.max_seq_len)
        self.block_size = check_block_size(block_size, self.max_seq_len)
        self.max_running = _positive_int("max_running", max_running)
        self.token_budget = _positive_int("token_budget", token_budget)
        if packed_prefill is None:
            packed_prefill = PACKED_PREFILL
        for flag, value in (("prefix_caching", prefix_caching),
                            ("packed_prefill", packed_prefill)):
            if not isinstance(value, bool):
                raise GenerationError(f"{flag}: expected True or False, got {value!r}")
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.eos_ids = frozenset((config.eos_id, *getattr(tokenizer, "eos_ids", ())))
        self.device, self.dtype = model.device, model.dtype
        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise GenerationError(f"cuda_graph: expected True, False or None, got "
                                  f"{cuda_graph!r}")
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise GenerationError("CUDA graphs need a CUDA device; use cuda_graph=False on CPU")
        if overlap is not None and not isinstance(overlap, bool):
            raise GenerationError(f"overlap: expected True, False or None, got {overlap!r}")
        # pure decode steps planned and launched ahead of the previous step's tokens (see
        # step()); None: on CUDA. On the CPU the device is the host, so nothing overlaps:
        # overlap=True there runs the same logic (for tests)
        self.overlap = (self.device.type == "cuda") if overlap is None else overlap
        self.settings = Settings.from_env() if settings is None else settings

        blocks_per_seq = self.max_seq_len // self.block_size
        block_bytes = PagedKVCache.block_bytes(config.num_layers, self.block_size,
                                               config.num_kv_heads, config.head_dim, self.dtype)
        budget = pool_bytes(kv_memory, self.device)
        num_blocks = min(budget // block_bytes, self.max_running * blocks_per_seq)
        if num_blocks < 1:
            raise GenerationError(f"kv_memory: {budget} bytes hold no KV block of "
                                  f"{block_bytes} bytes (block_size {self.block_size})")
        self.forward = engine_forward(model, self.settings)
        # the prefill chunks of a step in one varlen attention where it applies (CUDA
        # fp16/bf16; forward.py); packed_prefill=False: one SDPA per chunk; None: PACKED_PREFILL
        self._prefill_varlen = packed_prefill and self.forward.paged_prefill_varlen()
        with torch.inference_mode(False):  # a normal tensor, written inside and outside
            self.cache = PagedKVCache(config.num_layers, num_blocks, self.block_size,
                                      config.num_kv_heads, config.head_dim, self.dtype,
                                      self.device, self.max_running, blocks_per_seq)
        self.k_pools = [self.cache.key_pool(i) for i in range(config.num_layers)]
        self.v_pools = [self.cache.value_pool(i) for i in range(config.num_layers)]
        self.prefix = PrefixCache(self.cache) if prefix_caching else None
        self.scheduler = Scheduler(self.cache, self.prefix, max_running=self.max_running,
                                   token_budget=self.token_budget)
        self._requests: dict[str, Request] = {}  # in flight: waiting or running
        self._ready: list[RequestOutput] = []  # reported by the next step (aborts)
        self._ahead: _InFlight | None = None  # the decode step launched, its tokens not taken
        self._order = itertools.count()
        self._graphs = None  # engine.paged_graphs.PagedDecodeGraphs, built on first use
        self._rope_table: Tensor | None = None
        self._steps = self._prefill_tokens = self._decode_tokens = self._finished = 0
        self._steps_ahead = 0

    # requests ---------------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, params: SamplingParams,
                    request_id: str | None = None) -> str:
        """Queue a request; its id. Everything is checked first: a bad request raises
        GenerationError with nothing queued or written, and the others go on."""
        request = self._make_request(prompt, params, request_id, 0)
        self._queue(request)
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks; the next step reports it (finish_reason
        "abort"). An id that is not in flight (finished, or never added) is ignored."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        # its row may be in the step in flight: that row's token is dropped when the step is
        # taken, and its blocks, freed now, are reused only by steps queued after it
        self.scheduler.finish(request, ABORT)
        self._ready.append(self._output(request))
        step = self._ahead
        if step is not None and all(c.request.finished for c in step.plan.chunks):
            # nothing of it is wanted: drop it unread (its buffers are freed in stream order)
            self._ahead = None

    def fork(self, request_id: str, params: SamplingParams | None = None,
             new_id: str | None = None) -> str:
        """A new request continuing a running request's text with its own params (default:
        the parent's), sharing every block the parent has so far (copied on write): the
        parent must have finished its prompt and not be done. Its output starts with the
        parent's output so far."""
        parent = self._requests.get(request_id)
        # a row of the parent in the step in flight computes the K/V of its last known token:
        # the child computes that token itself (it samples its own next token from it)
        computed = 0 if parent is None else parent.num_computed - self._in_flight(parent)
        if parent is None or parent.status is not RequestStatus.RUNNING \
                or len(parent.token_ids) - computed != 1:
            raise GenerationError(f"fork: {request_id!r} is not a running request past its "
                                  f"prompt")
        params = parent.params if params is None else params
        child = self._make_request(parent.prompt_ids, params, new_id, 0)
        child.token_ids = list(parent.token_ids)
        child.text = parent.text
        if child.decoder is not None:  # the child's stream goes on from the parent's tokens
            for tok in parent.output_ids:
                child.watcher.feed(child.decoder.feed(tok))
        try:
            self.scheduler.fork(parent, child, computed)
        except ValueError as exc:
            raise GenerationError(str(exc)) from None
        self._requests[child.request_id] = child
        return child.request_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._ready)

    def stats(self) -> ServingStats:
        c = self.cache
        return ServingStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            blocks_used=c.num_used_blocks(), blocks_free=c.num_free_blocks(),
            blocks_total=c.num_blocks, blocks_cached=len(self.prefix) if self.prefix else 0,
            block_size=self.block_size, bytes_per_block=c.bytes_per_block(),
            preemptions=self.scheduler.preemptions,
            prefix_hit_blocks=self.scheduler.prefix_hit_blocks,
            prefix_evictions=self.prefix.evictions if self.prefix else 0,
            steps=self._steps, prefill_tokens=self._prefill_tokens,
            decode_tokens=self._decode_tokens, finished=self._finished,
            steps_ahead=self._steps_ahead,
        )

    # one step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler step: a forward pass over the planned chunks, a token for every
        request that completed its known tokens. Outputs of the requests that changed: the
        tokens of one forward pass.

        With `overlap`, pure decode steps are pipelined: a step's tokens stay on the device
        while the host plans the next decode step (every row continues but those known to
        end: max_new_tokens, the context) and launches it, its input tokens gathered on the
        device; only then does the host wait for the first step's tokens and accept them
        (stop strings, EOS, streams, finishing), while the device runs the second. A request
        that the taken tokens finish (EOS, a stop string) had its row computed once more in
        the step in flight: that row's token is dropped when the step is taken. Anything else
        (requests waiting while a running slot frees up, prefill chunks, preemption or
        eviction, a shared last block, a repetition penalty or logprobs) ends the pipeline:
        the call takes the step in flight, and the next one plans with the scheduler as without
        overlap. An aborted request's row in the step in flight is dropped when the step is
        taken; a fork (a running request that the step in flight does not hold) ends the
        pipeline too."""
        outputs, self._ready = self._ready, []
        if self._ahead is not None:
            current = self._ahead
            self._ahead = self._launch_ahead(current)
            taken = self._take(current)
            if taken or self._ahead is not None:
                return outputs + taken
            # every row of that step had finished already: go on with a scheduler step
        plan = self.scheduler.schedule()
        for request in plan.finished:  # no room even alone: "length"
            outputs.append(self._finish_output(request))
        if not plan.chunks:
            return outputs
        if self._overlaps(plan):
            current = self._launch(plan)
            self._ahead = self._launch_ahead(current)
            return outputs + self._take(current)
        with torch.inference_mode():
            logits = self._forward(plan)  # [sampling chunks, vocab]
            self.scheduler.complete(plan)
            sampling = [c for c in plan.chunks if c.samples]
            tokens = self._sample(sampling, logits)
            logprobs = self._logprobs(sampling, logits, tokens)
        self._steps += 1
        for c in plan.chunks:
            if c.num_tokens == 1:
                self._decode_tokens += 1
            else:
                self._prefill_tokens += c.num_tokens
        now = time.perf_counter()
        for chunk, tok, lp in zip(sampling, tokens, logprobs, strict=True):
            outputs.append(self._accept(chunk.request, tok, now, lp))
        return outputs

    # the overlapped decode steps ------------------------------------------------------------
    def _overlaps(self, plan: StepPlan) -> bool:
        """Whether a plan of schedule() may start a pipeline: overlap on, pure decode over every
        running request (each chunk its request's last known token), none waiting but for a
        running slot (all taken), and no row whose sampling needs host state its step in
        flight would not have (the tokens so far for a repetition penalty; logprobs read the
        logits, which the next replay overwrites)."""
        scheduler = self.scheduler
        return (self.overlap and plan.pure_decode
                and (not scheduler.waiting or len(scheduler.running) >= scheduler.max_running)
                and len(plan.chunks) == len(scheduler.running)
                and all(c.samples and c.request.params.repetition_penalty == 1
                        and c.request.params.logprobs is None for c in plan.chunks))

    def _launch_ahead(self, step: _InFlight) -> _InFlight | None:
        """Plan and launch the decode step after `step` (Scheduler.schedule_ahead), or None."""
        ahead = self.scheduler.schedule_ahead(step.plan.chunks, self.max_seq_len)
        if ahead is None:
            return None
        plan, sources = ahead
        return self._launch(plan, (step.tokens, sources))

    def _in_flight(self, request: Request) -> int:
        """1 when the step in flight has a row of `request`, else 0."""
        step = self._ahead
        return int(step is not None and any(c.request is request for c in step.plan.chunks))

    def _launch(self, plan: StepPlan, ahead: tuple[Tensor, list[int]] | None = None,
                ) -> _InFlight:
        """Launch a pure decode step and the copy of its sampled tokens to the host, without
        waiting for the device. ahead (a plan of schedule_ahead): its tokens are on the device,
        (the step in flight's sampled tokens int64 [M], each row's index in them); None: they
        are known (a plan of schedule)."""
        with torch.inference_mode():
            logits = self._forward(plan, ahead)  # [rows, vocab]
            # sequences advance now (the next plan's positions); blocks are named when the
            # tokens are known (_take)
            self.scheduler.complete(plan, register=False)
            tokens = self._sample_tokens(plan.chunks, logits)  # [rows] on the device
            ready = None
            host = tokens
            if tokens.is_cuda:
                host = torch.empty(tokens.shape, dtype=torch.int64, pin_memory=True)
                host.copy_(tokens, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
        self._steps += 1
        self._steps_ahead += ahead is not None
        self._decode_tokens += len(plan.chunks)
        return _InFlight(plan, tokens, host, ready)

    def _take(self, step: _InFlight) -> list[RequestOutput]:
        """Wait for a launched step's tokens and accept them, as a synchronous step does after
        its forward: name the newly full blocks, then each row's token. Rows of requests that
        finished since it was launched (by the tokens of the step before, or aborted) are
        dropped."""
        if step.ready is not None:
            step.ready.synchronize()
        tokens = step.host.tolist()
        now = time.perf_counter()  # when the host has the tokens: the requests' timings
        live = [(c, tok) for c, tok in zip(step.plan.chunks, tokens, strict=True)
                if c.request.status is not RequestStatus.FINISHED]
        if self.prefix is not None:
            size, register = self.block_size, self.scheduler.register
            for c, _ in live:
                if (c.start + 1) // size > c.request.num_registered_blocks:  # a block filled
                    register(c.request, c.start + 1)
        return [self._accept(c.request, tok, now, computed=c.start + 1) for c, tok in live]

    def _forward(self, plan: StepPlan, ahead: tuple[Tensor, list[int]] | None = None) -> Tensor:
        """logits [sampling chunks, vocab] of a plan. ahead: the plan's tokens are on the
        device (a step's sampled tokens int64 [M], each row's index in them)."""
        self.cache.sync_device()
        if plan.pure_decode and self.cuda_graph:
            if self._graphs is None:
                from toyllm.engine.paged_graphs import PagedDecodeGraphs

                self._graphs = PagedDecodeGraphs(self)
            return self._graphs.run(plan, ahead)
        tokens, positions, step, select = self.build_step(plan, ahead)
        return self.forward(tokens, positions, step, select=select)[0]

    def build_step(self, plan: StepPlan, ahead: tuple[Tensor, list[int]] | None = None,
                   ) -> tuple[Tensor, Tensor, PagedStep, Tensor]:
        """The eager step of a plan: tokens and positions int64 [1, N], the PagedStep, and
        the indices [K] of the tokens whose logits sample (each sampling chunk's last).

        Every index the step needs is built on the host in one int64 tensor and copied to the
        device once: tokens, positions and slots [N], the sampled tokens [K], the decode
        rows' sequences [nd], and for a packed prefill the chunks' bounds and key slots.
        ahead (a pure decode plan of schedule_ahead): the tokens are gathered on the device
        from a step's sampled tokens [M] at each row's index (copied with the others)."""
        nd = plan.num_decode  # plan order: the decode rows first
        packed = self._prefill_varlen and nd < len(plan.chunks)
        prefix = packed and any(c.start > 0 for c in plan.chunks[nd:])
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        select: list[int] = []
        seqs: list[int] = []
        cu_q, cu_k, key_slots = [0], [0], []
        max_q = max_k = 0
        for i, c in enumerate(plan.chunks):
            r, end = c.request, c.start + c.num_tokens
            ids += r.token_ids[c.start:end] if ahead is None else (0,)
            positions += range(c.start, end)
            if i < nd:
                seqs.append(r.seq)
            if prefix and i >= nd:  # a chunk's keys 0..end-1; its own slots are their tail
                mine = self.cache.slot_mapping(r.seq, 0, end)
                key_slots += mine
                slots += mine[c.start:]
            else:
                slots += self.cache.slot_mapping(r.seq, c.start, c.num_tokens)
            if packed and i >= nd:
                cu_q.append(cu_q[-1] + c.num_tokens)
                cu_k.append(cu_k[-1] + end)
                max_q, max_k = max(max_q, c.num_tokens), max(max_k, end)
            if c.samples:
                select.append(len(ids) - 1)
        n, k = len(ids), len(select)
        bounds = (cu_q + cu_k) if packed else []
        source = ahead[1] if ahead is not None else []
        host = torch.tensor(ids + positions + slots + select + seqs + bounds + key_slots
                            + source, dtype=torch.int64)
        if self.device.type == "cuda":  # pinned: the copy does not wait for the device
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True)  # one copy
        tokens, pos, slot = dev[:n], dev[n:2 * n], dev[2 * n:3 * n]
        if ahead is not None:  # clamped: a row whose logits were not finite sampled -1
            tokens = ahead[0].index_select(0, dev[len(host) - n:]).clamp_(min=0)
        at = 3 * n
        select_t, seqs_t = dev[at:at + k], dev[at + k:at + k + nd]
        at += k + nd
        tables = lens = None
        if nd:
            tables = self.cache.block_tables().index_select(0, seqs_t)
            lens = (pos[:nd] + 1).to(torch.int32)  # keys 0..position
        segments = []
        packed_prefill = None
        if packed:
            s = len(cu_q)
            bounds_t = dev[at:at + 2 * s].to(torch.int32)
            packed_prefill = PackedPrefill(bounds_t[:s], bounds_t[s:], max_q, max_k,
                                           dev[at + 2 * s:at + 2 * s + len(key_slots)]
                                           if prefix else None,
                                           varlen_causal_attention)
        else:
            offset = nd
            device_tables = self.cache.block_tables()
            for c in plan.chunks[nd:]:
                blocks = device_tables[c.request.seq, :blocks_for(c.start + c.num_tokens,
                                                                  self.block_size)]
                segments.append(prefill_segment(offset, c.start, c.num_tokens, blocks))
                offset += c.num_tokens
        step = PagedStep(self.k_pools, self.v_pools, slot, nd, tables, lens, segments,
                         packed=packed_prefill)
        return tokens.unsqueeze(0), pos.unsqueeze(0), step, select_t

    def rope_table(self) -> Tensor | None:
        """On CUDA, RoPE's cos/sin for every position of the context (models/rope.py), for the
        graph-captured decode steps; None on the CPU (see Engine._rope_table_for)."""
        if self.device.type != "cuda":
            return None
        if self._rope_table is None:
            with torch.inference_mode(False):
                self._rope_table = rope_table(self.model.inv_freq, self.max_seq_len, self.dtype)
        return self._rope_table

    def _sample(self, chunks: list[Chunk], logits: Tensor) -> list[int]:
        """_sample_tokens on the host: one host sync."""
        if not chunks:
            return []
        return self._sample_tokens(chunks, logits).tolist()

    def _sample_tokens(self, chunks: list[Chunk], logits: Tensor) -> Tensor:
        """One token per sampling chunk (logits [K, vocab] in the same order), each row with
        its request's params and generator (engine/sampling.py's sample_rows): int64 [K] on
        the device, nothing waited for."""
        requests = [c.request for c in chunks]
        params = [r.params for r in requests]
        seen = None
        if any(p.repetition_penalty != 1 for p in params):
            seen = [r.token_ids for r in requests]  # prompt and output so far
        return sample_rows(logits, params, [r.generator for r in requests], seen,
                           self.settings.cuda_argmax)

    def _logprobs(self, chunks: list[Chunk], logits: Tensor,
                  tokens: list[int]) -> list[TokenLogprob | None]:
        """The sampled tokens' log-probabilities for the rows whose request asks for them
        (logits [K, vocab] in the chunks' order); None for the others."""
        rows = [i for i, c in enumerate(chunks) if c.request.params.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(chunks)
        if rows:
            picked = token_logprobs(logits[rows], [tokens[i] for i in rows],
                                    [chunks[i].request.params.logprobs for i in rows])
            for i, lp in zip(rows, picked, strict=True):
                out[i] = lp
        return out

    # finishing --------------------------------------------------------------------------------
    def _accept(self, request: Request, tok: int, now: float,
                logprob: TokenLogprob | None = None, computed: int | None = None,
                ) -> RequestOutput:
        """Take a sampled token: stream its text, finish the request when it is done.
        computed: tokens whose K/V its step left computed (default num_computed; a step
        launched ahead has advanced num_computed past it)."""
        params = request.params
        if tok == NONFINITE:
            request.error = (f"the model's logits hold NaN or inf at output token "
                             f"{request.num_output_tokens} of request {request.request_id!r}; "
                             f"the weights or activations overflowed (try --dtype fp32)")
            return self._finish_output(request, ERROR)
        request.record_token(now)
        reason = None
        piece = ""
        if params.stop_at_eos and tok in self.eos_ids:
            reason = "eos"
        else:
            request.token_ids.append(tok)
            request.new_token_ids.append(tok)
            if logprob is not None:
                request.new_logprobs.append(logprob)
            if request.decoder is not None:
                piece = request.watcher.feed(request.decoder.feed(tok))
            if request.watcher.stopped:
                reason = "stop"
            elif len(request.token_ids) - len(request.prompt_ids) >= params.max_new_tokens:
                reason = "max_new_tokens"
            elif (request.num_computed if computed is None else computed) >= self.max_seq_len:
                reason = "length"  # no room left to write this token's K/V
        request.text += piece
        request.new_text += piece
        if reason is not None:
            return self._finish_output(request, reason)
        return self._output(request)

    def _finish_output(self, request: Request, reason: str | None = None) -> RequestOutput:
        """Finish a request (unless the scheduler did), flush its held-back text, free its
        blocks, and report it."""
        if not request.finished:
            self.scheduler.finish(request, reason)
        if request.decoder is not None and request.finish_reason not in ("stop", ERROR):
            piece = request.watcher.feed(request.decoder.flush()) + request.watcher.flush()
            request.text += piece
            request.new_text += piece
        self._requests.pop(request.request_id, None)
        return self._output(request)

    def _output(self, request: Request) -> RequestOutput:
        # every request, every step: Request's properties inlined (this runs per row)
        done = request.status is RequestStatus.FINISHED
        if done:
            self._finished += 1
        prompt = len(request.prompt_ids)
        out = RequestOutput(request.request_id, request.new_token_ids, request.new_text, done,
                            request.finish_reason, prompt, len(request.token_ids) - prompt,
                            request.error, request.timings if done else None,
                            request.new_logprobs if request.params.logprobs is not None
                            else None)
        request.new_token_ids, request.new_text, request.new_logprobs = [], "", []
        return out

    # checking and queueing --------------------------------------------------------------------
    def _make_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None,
                      index: int) -> Request:
        if not isinstance(params, SamplingParams):
            raise GenerationError(f"params: expected SamplingParams, got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer; this engine has none")
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise GenerationError(f"request_id: expected a non-empty string, got {request_id!r}")
        if request_id is not None and request_id in self._requests:
            raise GenerationError(f"request_id: {request_id!r} is already in flight")
        ids = encode_prompt(prompt, index, self.tokenizer, self.config.vocab_size,
                            self.max_seq_len)
        need = blocks_for(len(ids), self.block_size)
        if need > self.cache.num_blocks:
            raise GenerationError(
                f"prompt {index} is {len(ids)} tokens long: it needs {need} KV blocks of "
                f"{self.block_size} tokens, the pool has {self.cache.num_blocks} (raise "
                f"kv_memory)")
        order = next(self._order)
        rid = request_id if request_id is not None else f"req-{order}"
        while request_id is None and rid in self._requests:  # a caller took this name
            order = next(self._order)
            rid = f"req-{order}"
        return Request(
            request_id=rid, order=order, prompt_ids=ids, params=params,
            generator=make_generator(params, self.device),
            decoder=StreamDecoder(self.tokenizer) if self.tokenizer is not None else None,
            watcher=StopWatcher(params.stop), timings=RequestTimings(time.perf_counter()))

    def _queue(self, request: Request) -> None:
        self._requests[request.request_id] = request
        self.scheduler.add(request)

    # the batch face -----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt] | str,
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 on_text: TextCallback | None = None, progress: bool = False,
                 ) -> GenerationResult:
        """Generate a completion for each prompt (each with its own params when a list is
        given), running steps until all are done. on_text(index, piece) streams text;
        `progress` shows a progress bar on stderr. Every prompt and params is checked before
        any is queued. Completions come back in prompt order. Refused while requests added
        with add_request are in flight (their outputs would be consumed here)."""
        if self.has_unfinished():  # their outputs would be consumed here and lost
            raise GenerationError(
                f"generate: {len(self._requests)} request(s) added with add_request are in "
                f"flight; drive them with step() until has_unfinished() is False first")
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise GenerationError("no prompts given: expected at least one")
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            per_prompt = [params] * len(prompts)
        else:
            per_prompt = list(params)
            if len(per_prompt) != len(prompts):
                raise GenerationError(f"params: expected one SamplingParams per prompt "
                                      f"({len(prompts)}), got {len(per_prompt)}")
        requests = []
        names: set[str] = set()
        for i, (p, sp) in enumerate(zip(prompts, per_prompt, strict=True)):
            request = self._make_request(p, sp, None, i)
            while request.request_id in names:  # ids are unique among these too
                request.request_id = f"{request.request_id}-{i}"
            names.add(request.request_id)
            requests.append(request)
        for request in requests:
            self._queue(request)
        index = {r.request_id: i for i, r in enumerate(requests)}
        stats = GenerationStats(cache_bytes=self.cache.bytes_allocated())
        left = len(requests)
        bar = _ProgressBar(len(requests)) if progress else None
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        try:
            while left:
                if self._ahead is None:  # never while a step is in flight: that is the overlap
                    sync()
                t0 = time.perf_counter()
                # a step in flight is a decode step, and this call takes its tokens
                decode_only = self._ahead is not None or (not self.scheduler.waiting and all(
                    r.num_pending == 1 for r in self.scheduler.running))
                steps = self._steps
                outputs = self.step()
                if not outputs and self._steps == steps:  # a scheduler bug, never user input
                    raise RuntimeError("serving engine: a step planned nothing while requests "
                                       "wait")
                if self._ahead is None:
                    sync()
                dt = time.perf_counter() - t0
                sampled = 0
                for out in outputs:
                    i = index.get(out.request_id)
                    if i is None:
                        continue
                    sampled += len(out.new_token_ids)
                    if on_text is not None and out.new_text:
                        on_text(i, out.new_text)
                    if out.finished:
                        left -= 1
                        if out.finish_reason == ERROR:
                            for r in requests:
                                self.abort(r.request_id)
                            raise GenerationError(out.error)
                if decode_only:
                    stats.decode_steps += 1
                    stats.decode_tokens += sampled
                    stats.decode_s += dt
                else:
                    stats.prefill_s += dt
                if bar is not None:
                    bar.advance(len(requests) - left)
        finally:
            if bar is not None:
                bar.close()
        stats.prefill_tokens = sum(r.num_prompt_tokens - r.cached_tokens for r in requests)
        completions = [Completion(i, r.text, r.output_ids, r.num_prompt_tokens,
                                  r.finish_reason or "") for i, r in enumerate(requests)]
        return GenerationResult(completions, stats)


class _ProgressBar:
    """rich's progress bar on stderr: requests finished of all."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._progress = Progress("generating", BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=Console(stderr=True),
                                  transient=True)
        self._task = self._progress.add_task("requests", total=total)
        self._progress.start()

    def advance(self, done: int) -> None:
        self._progress.update(self._task, completed=done)

    def close(self) -> None:
        self._progress.stop()

