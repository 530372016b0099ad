"""The no-cache reference: every step runs the plain causal forward over the whole sequence.

Slow on purpose (quadratic in length) and obviously right: it never touches a KV cache, so
it is the witness the cached engine is checked against (tests, `toyllm check`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from toyllm.models.llama import Transformer


@torch.inference_mode()
def reference_logits(model: Transformer, ids: Sequence[int]) -> Tensor:
    """Logits [T, vocab] for every position of `ids`, from one causal forward."""
    tokens = torch.tensor([list(ids)], device=model.device)
    positions = torch.arange(len(ids), device=model.device).unsqueeze(0)
    return model(tokens, positions)[0]


@torch.inference_mode()
def reference_greedy(
    model: Transformer, ids: Sequence[int], max_new_tokens: int, eos_id: int | None = None,
    max_seq_len: int | None = None,
) -> tuple[list[int], list[Tensor]]:
    """Greedy continuation without a cache: (new token ids, the logits each was taken from).
    Stops at eos_id (not included), after max_new_tokens, or when the sequence would no
    longer fit max_seq_len (the same rule as the cached engine's "length")."""
    seq = list(ids)
    limit = max_seq_len or model.config.max_seq_len
    out: list[int] = []
    step_logits: list[Tensor] = []
    while len(out) < max_new_tokens:
        logits = reference_logits(model, seq)[-1]
        tok = int(logits.argmax())
        step_logits.append(logits)
        if eos_id is not None and tok == eos_id:
            break
        out.append(tok)
        if len(seq) >= limit:
            break
        seq.append(tok)
    return out, step_logits
