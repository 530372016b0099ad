"""The modules of one rank's shard, as nano-vllm's layers/ names them: each carries the
collective that makes its output whole, so the shard's own plain-torch forward
(`Transformer.forward`) gives the whole model's logits too. The engine's forward
(engine/forward.py) reads only their weights and calls the collectives itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toyllm.engine.tensor_parallel.collectives import RankGroup


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, end) of the embedding: a token's vector comes from the one rank that holds
    its row, zeros from the others, summed over the ranks (exact: x + 0 = x)."""

    def __init__(self, start: int, end: int, hidden: int, ranks: RankGroup) -> None:
        super().__init__(end - start, hidden, _weight=torch.empty(end - start, hidden))
        self.start, self.end, self.ranks = start, end, ranks

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens int64 [B, T] (whole-vocabulary ids) -> [B, T, hidden] on every rank."""
        mine = (tokens >= self.start) & (tokens < self.end)
        local = torch.where(mine, tokens - self.start, 0)
        x = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.ranks.all_reduce(x.contiguous())


class RowParallelLinear(nn.Linear):
    """The columns of o_proj or down_proj that take this rank's heads or MLP units: a partial
    product, summed over the ranks."""

    def __init__(self, in_features: int, out_features: int, ranks: RankGroup) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.ranks = ranks

    def forward(self, x: Tensor) -> Tensor:
        return self.ranks.all_reduce(F.linear(x, self.weight).contiguous())


class VocabParallelHead(nn.Linear):
    """Vocabulary rows [start, end) of the output head; the logits are gathered."""

    def __init__(self, hidden: int, rows: int, ranks: RankGroup) -> None:
        super().__init__(hidden, rows, bias=False)
        self.ranks = ranks

    def forward(self, x: Tensor) -> Tensor:
        return self.ranks.gather_vocab(F.linear(x, self.weight))
