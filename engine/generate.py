"""The generation loop: prefill each prompt into the extension's KV cache, then decode one
token per step for the whole batch until every sequence has finished.

    >>> import torch
    >>> from toyllm.engine.generate import Engine
    >>> from toyllm.engine.sampling import SamplingParams
    >>> from toyllm.models.model_source import load_model
    >>> loaded = load_model(None, torch.device("cpu"), torch.float32)  # the shipped model
    >>> engine = Engine(loaded.model, loaded.tokenizer)
    >>> result = engine.generate(["def fib(n):"], SamplingParams(max_new_tokens=8))
    >>> len(result.completions[0].token_ids), result.completions[0].finish_reason
    (8, 'max_new_tokens')

Finish reasons: "eos" (the model ended the text), "stop" (a stop string appeared; the text
ends before it), "max_new_tokens", and "length" (the KV cache is full; never a crash).
Positions advance only after a forward pass succeeded. One engine serves request after
request: the cache is reset between them and reallocated only when a request needs more
rows or positions than it has.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from toyllm.engine.cached_attention import DecodeStep, PrefillStep
from toyllm.engine.cpu_layout import store_weights_input_major
from toyllm.engine.forward import EngineForward
from toyllm.engine.ops import cpu_step
from toyllm.engine.ops.kv_cache import KVCache, set_programmatic_launch
from toyllm.engine.sampling import NONFINITE, SamplingParams, make_generators, sample
from toyllm.engine.settings import Settings
from toyllm.engine.stopping import StopWatcher
from toyllm.models.llama import Transformer
from toyllm.models.rope import rope_table
from toyllm.models.tokenizer import StreamDecoder, Tokenizer

Prompt = str | Sequence[int]
_UNBOUND = object()  # Engine._cpu_decodes: no entry yet for this row count
TextCallback = Callable[[int, str], None]


class GenerationError(ValueError):
    """A request the engine cannot serve (empty prompt, prompt longer than the context...)."""


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenerationStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    cache_bytes: int = 0

    @property
    def prefill_ms(self) -> float:
        return self.prefill_s * 1e3

    @property
    def decode_tok_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class GenerationResult:
    completions: list[Completion]
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass
class _Sequence:
    index: int
    prompt_ids: list[int]
    decoder: StreamDecoder | None
    watcher: StopWatcher
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


def engine_forward(model: Transformer, settings: Settings) -> EngineForward:
    """The model's forward through the extension (engine/forward.py), with the model prepared
    for it: q/k/v and gate/up as one product each (views, no copy)."""
    if model.device.type == "cpu" and not settings.cpu_gemv:
        # same values, 3x faster decode GEMVs on MKL. The extension's GEMV streams
        # nn.Linear's [out, in] layout fastest (docs/PERF.md), so with it the weights stay.
        store_weights_input_major(model)
    if model.device.type == "cuda":
        # process-wide in the extension: the last engine built sets it
        set_programmatic_launch(settings.programmatic_launch)
    return EngineForward(model, settings)


def encode_prompt(prompt: Prompt, index: int, tokenizer: Tokenizer | None, vocab_size: int,
                  max_seq_len: int) -> list[int]:
    """Token ids of prompt number `index` (text through the tokenizer, with BOS), checked:
    not empty, ids in [0, vocab_size), at most max_seq_len tokens (GenerationError)."""
    if isinstance(prompt, str):
        if not prompt:
            raise GenerationError(f"prompt {index} is empty: expected some text")
        if tokenizer is None:
            raise GenerationError("text prompts need a tokenizer; this engine has none")
        ids = tokenizer.encode(prompt, bos=True)
    else:
        try:
            ids = [int(t) for t in prompt]
        except (TypeError, ValueError):
            raise GenerationError(f"prompt {index}: expected a string or a list of token ids, "
                                  f"got {type(prompt).__name__}") from None
        if not ids:
            raise GenerationError(f"prompt {index} is empty: expected at least one token")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(
                f"prompt {index}: token ids must be in [0, {vocab_size}), got {bad[:5]}"
            )
    if len(ids) > max_seq_len:
        raise GenerationError(
            f"prompt {index} is {len(ids)} tokens long; the model's context holds {max_seq_len}"
        )
    return ids


class Engine:
    """Serves generation requests for one model on one device.

    `settings` chooses kernels (engine/settings.py); None reads them from the environment once,
    here (`Settings.from_env`). Build the engine after the model has its final device and dtype.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        *,
        prefill_chunk: int | None = None,
        cuda_graph: bool | None = None,
        max_seq_len: int | None = None,
        settings: Settings | None = None,
    ) -> None:
        if prefill_chunk is not None and prefill_chunk <= 0:
            raise GenerationError(
                f"prefill_chunk: expected a positive integer, got {prefill_chunk}"
            )
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        # ids that end a sequence: the config's eos and every one the tokenizer names (a
        # checkpoint's generation_config may list several, as Llama 3's does)
        self.eos_ids = frozenset((self.config.eos_id, *getattr(tokenizer, "eos_ids", ())))
        self.device = model.device
        self.dtype = model.dtype
        self.prefill_chunk = prefill_chunk
        self.settings = settings = Settings.from_env() if settings is None else settings
        self.max_seq_len = min(max_seq_len or self.config.max_seq_len, self.config.max_seq_len)
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise GenerationError("CUDA graphs need a CUDA device; use cuda_graph=False on CPU")
        self.forward = engine_forward(model, settings)
        self.cache: KVCache | None = None
        self._graphs = None  # engine.cuda_graph.DecodeGraphs, built on first use
        self._views: dict[int, tuple[list[Tensor], list[Tensor], Tensor]] = {}
        # per row count: the whole CPU decode step bound to those views, or None where the
        # forward does not take it (EngineForward.cpu_decode); reset with the views
        self._cpu_decodes: dict[int, Callable[[Tensor], Tensor] | None] = {}
        self._rope_table: Tensor | None = None  # _rope_table_for
        self.decode_forward = self._make_decode_forward()

    def _make_decode_forward(self) -> Callable[..., Tensor]:
        """The decode step as a function of tensors only (tokens [rows, 1], positions
        int32 [rows], per-layer cache views), so a CUDA graph can capture it.

        NOTE: not compiled with torch.compile: compiled, decode ran 20x slower than eager on
        the CPU (docs/PERF.md; the functionalised in-place cache update is the first suspect)."""
        forward = self.forward

        def decode_forward(tokens: Tensor, positions: Tensor, k_caches: list[Tensor],
                           v_caches: list[Tensor], span: int | None = None) -> Tensor:
            step = DecodeStep(k_caches, v_caches, positions, forward.decode_kernel(len(positions)),
                              span, self._rope_table_for(k_caches[0].shape[1]))
            # the step gives RoPE's cos/sin (its table) or the positions they come from
            return forward(tokens, None, step)[:, -1]

        return decode_forward

    def _rope_table_for(self, max_seq_len: int) -> Tensor | None:
        """On CUDA, the model's RoPE cos/sin by position (models/rope.py's rope_table) for
        positions 0..max_seq_len-1 at least, made once per cache size: a decode step gathers
        its rows (one kernel) instead of computing them (seven). Made on the first step, which
        for a graph is a warm-up run outside the capture. None on the CPU, where the seven ops
        cost little and torch's vectorised cos of a long row may round an element differently
        from the scalar code that takes a short one."""
        if self.device.type != "cuda":
            return None
        table = self._rope_table
        if table is None or table.shape[0] < max_seq_len:
            with torch.inference_mode(False):  # a normal tensor, usable inside and outside
                table = rope_table(self.model.inv_freq, max_seq_len, self.dtype)
            self._rope_table = table
        return table

    def cache_views(self, rows: int) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Per-layer K/V views of rows [0, rows) and their device positions (made once)."""
        if rows not in self._views:
            c = self.cache
            self._views[rows] = (
                [c.keys(i)[:rows] for i in range(c.num_layers)],
                [c.values(i)[:rows] for i in range(c.num_layers)],
                c.device_positions()[:rows],
            )
        return self._views[rows]

    # request handling ---------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise GenerationError("no prompts given: expected at least one")
        return [encode_prompt(p, i, self.tokenizer, self.config.vocab_size, self.max_seq_len)
                for i, p in enumerate(prompts)]

    def prepare_cache(self, rows: int, seq_len: int) -> KVCache:
        """A reset cache with at least `rows` rows and `seq_len` positions. It only grows
        (rows beyond a request's own are inactive), so request after request reuses it."""
        c = self.cache
        if c is None or c.batch_size < rows or c.max_seq_len < seq_len:
            if c is not None:
                rows, seq_len = max(rows, c.batch_size), max(seq_len, c.max_seq_len)
            self.cache = c = None
            self._graphs = None  # graphs and views hold addresses of the old cache
            self._views = {}
            self._cpu_decodes = {}
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            # a normal tensor even when the caller is in inference mode, so the cache can be
            # reset and written both inside and outside it
            with torch.inference_mode(False):
                c = KVCache(
                    num_layers=self.config.num_layers, max_seq_len=seq_len,
                    num_kv_heads=self.config.num_kv_heads, head_dim=self.config.head_dim,
                    dtype=self.dtype, device=self.device, batch_size=rows,
                )
            self.cache = c
        else:
            c.reset()
        return c

    def _rows_for(self, n: int) -> int:
        if not self.cuda_graph:
            return n
        from toyllm.engine.cuda_graph import bucket_for

        return bucket_for(n)

    @torch.inference_mode()
    def prefill(self, cache: KVCache, row: int, ids: Sequence[int]) -> Tensor:
        """Write one prompt into cache row `row` (whole or in chunks); logits of its last
        token [vocab]. Positions advance chunk by chunk, each after its forward succeeded."""
        chunk = self.prefill_chunk or len(ids)
        logits = None
        for s in range(0, len(ids), chunk):
            piece = ids[s : s + chunk]
            start = cache.sequence_position(row)
            tokens = torch.tensor([piece], device=self.device)
            positions = torch.arange(start, start + len(piece), device=self.device).unsqueeze(0)
            logits = self.forward(tokens, positions, PrefillStep(cache, start, seq=row),
                                  last_only=True)
            cache.advance_sequence(row, len(piece))
        return logits[0, -1]

    @torch.inference_mode()
    def decode_step(self, cache: KVCache, rows: int, tokens: Tensor) -> Tensor:
        """One token for each active row of [0, rows): logits [rows, vocab]. Advances the
        active rows by one after the forward pass."""
        ks, vs, positions = self.cache_views(rows)
        if self.cuda_graph:
            if self._graphs is None:
                from toyllm.engine.cuda_graph import DecodeGraphs

                self._graphs = DecodeGraphs(self.decode_forward, self.cache_views)
            logits = self._graphs.run(rows, tokens)
        else:
            tokens = tokens.view(rows, 1)
            cpu_decode = self._cpu_decodes.get(rows, _UNBOUND)
            if cpu_decode is _UNBOUND:
                cpu_decode = self._cpu_decodes[rows] = self.forward.cpu_decode(ks, vs, positions)
            if cpu_decode is not None and cpu_step.applies(tokens):
                # the forward's own choice for this step, its arguments bound once
                logits = cpu_decode(tokens)
            else:
                # eager: read only as far as the longest row
                span = min(max(cache.positions()[:rows]) + 1, cache.max_seq_len)
                logits = self.decode_forward(tokens, positions, ks, vs, span)
        cache.advance_position(1)
        return logits

    def generate(
        self,
        prompts: Sequence[Prompt] | str,
        params: SamplingParams | None = None,
        on_text: TextCallback | None = None,
    ) -> GenerationResult:
        """Generate a completion for each prompt. on_text(index, piece) streams text."""
        params = params or SamplingParams()
        prompt_ids = self.encode_prompts(prompts)
        n = len(prompt_ids)
        rows = self._rows_for(n)
        need = max(len(p) for p in prompt_ids) + params.max_new_tokens
        cache = self.prepare_cache(rows, min(need, self.max_seq_len))
        for r in range(n, cache.batch_size):
            cache.set_active(r, False)  # rows beyond this request are never written
        if params.stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer; this engine has none")
        seqs = [
            _Sequence(i, ids, StreamDecoder(self.tokenizer) if self.tokenizer else None,
                      StopWatcher(params.stop))
            for i, ids in enumerate(prompt_ids)
        ]
        gen = make_generators(params, self.device, n)  # one per request row: its own seed
        stats = GenerationStats(cache_bytes=cache.bytes_allocated())

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        last = torch.stack([self.prefill(cache, s.index, s.prompt_ids) for s in seqs])
        if rows > n:
            last = torch.cat([last, last.new_zeros(rows - n, last.shape[-1])])
        tokens = sample(last, params, gen, self.settings.cuda_argmax,
                        _seen(seqs, rows, params))
        sync()
        stats.prefill_s = time.perf_counter() - t0
        stats.prefill_tokens = sum(len(p) for p in prompt_ids)

        t1 = time.perf_counter()
        self._accept(cache, seqs, tokens, params, on_text, step=0)
        while any(s.finish_reason is None for s in seqs):
            logits = self.decode_step(cache, rows, tokens)
            tokens = sample(logits, params, gen, self.settings.cuda_argmax,
                            _seen(seqs, rows, params))
            stats.decode_steps += 1
            stats.decode_tokens += self._accept(cache, seqs, tokens, params, on_text,
                                                step=stats.decode_steps)
        stats.decode_s = time.perf_counter() - t1
        completions = [
            Completion(s.index, s.text, s.token_ids, len(s.prompt_ids), s.finish_reason or "")
            for s in seqs
        ]
        return GenerationResult(completions, stats)

    def _accept(self, cache: KVCache, seqs: list[_Sequence], tokens: Tensor,
                params: SamplingParams, on_text: TextCallback | None, step: int = 0) -> int:
        """Take the sampled token of every running sequence; finish those that are done.
        step: 0 for the token sampled after prefill, then the decode step's number."""
        ids = tokens.tolist()  # the one host sync of a decode step
        taken = 0
        for s in seqs:
            if s.finish_reason is not None:
                continue
            tok = ids[s.index]
            if tok == NONFINITE:
                raise GenerationError(
                    f"the model's logits hold NaN or inf at step {step} "
                    f"({'prefill' if step == 0 else 'decode'}), row {s.index} (prompt "
                    f"{s.index}); the weights or activations overflowed (try --dtype fp32)")
            taken += 1
            s.token_ids.append(tok)
            piece = ""
            if params.stop_at_eos and tok in self.eos_ids:
                s.token_ids.pop()
                s.finish_reason = "eos"
            else:
                if s.decoder is not None:
                    piece = s.watcher.feed(s.decoder.feed(tok))
                if s.watcher.stopped:
                    s.finish_reason = "stop"
                elif len(s.token_ids) >= params.max_new_tokens:
                    s.finish_reason = "max_new_tokens"
                elif cache.sequence_position(s.index) >= cache.max_seq_len:
                    s.finish_reason = "length"  # no room left to write this token's K/V
            if s.finish_reason is not None:
                if s.decoder is not None and s.finish_reason != "stop":
                    piece += s.watcher.feed(s.decoder.flush()) + s.watcher.flush()
                cache.set_active(s.index, False)
            if piece:
                s.text += piece
                if on_text is not None:
                    on_text(s.index, piece)
        return taken


def _seen(seqs: list[_Sequence], rows: int, params: SamplingParams) -> list[list[int]] | None:
    """Each row's prompt and output ids so far, for the repetition penalty (None without one);
    padding rows have seen nothing."""
    if params.repetition_penalty == 1:
        return None
    return [s.prompt_ids + s.token_ids for s in seqs] + [[] for _ in range(rows - len(seqs))]
