"""What the tests of the fused operators need to run the engine's forward (engine/forward.py)
without an Engine: a step that attends as the reference model does without a cache, so that
EngineForward's logits compare with Transformer.forward's on the same tokens; and the garbage
collection that tests building several CUDA-graph engines need."""

from __future__ import annotations

import gc

from torch import Tensor

from toyllm.engine.forward import EngineForward
from toyllm.engine.settings import Settings
from toyllm.models.llama import Transformer, causal_attention


class NoCache:
    """The `step` of an EngineForward call that attends as Transformer.forward without `attend`
    does: the T tokens causally to each other only, nothing stored. Not a DecodeStep, so the
    decode-only fusions (rope_kv_update, gemv_add_rms_norm_rope_kv) never run through it."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return causal_attention(q, k, v)


def engine_logits(model: Transformer, tokens: Tensor, positions: Tensor,
                  settings: Settings | None = None, last_only: bool = False) -> Tensor:
    """EngineForward(model, settings)'s logits of tokens [B, T] at positions [B, T], without a
    cache (settings None: the defaults, Settings(), whatever the environment says)."""
    forward = EngineForward(model, Settings() if settings is None else settings)
    return forward(tokens, positions, NoCache(), last_only=last_only)


def collect_dead_graphs() -> None:
    """gc.collect(), before building an engine that captures CUDA graphs (and after a test that
    built some). An Engine is a reference cycle (its decode_forward closes over it), so a dropped
    engine's captured graphs are destroyed by the cyclic collector, whenever it happens to run;
    torch.cuda.graph no longer collects before a capture, and a graph destroyed during another
    capture invalidates it ("operation not permitted when stream is capturing (function
    reset)", seen on an H200 when one test's second engine captured)."""
    gc.collect()
