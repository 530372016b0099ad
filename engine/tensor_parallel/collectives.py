"""One rank's view of its process group: the collectives a sharded forward pass needs and the
broadcasts that let the other ranks follow rank 0.

gloo on the CPU, NCCL on GPUs (engine/tensor_parallel/launch.py starts the group). Every
collective is a blocking call on the current stream, so a decode step that holds them can be
captured in a CUDA graph (NCCL kernels are captured like any other).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class RankGroup:
    """rank of ranks, on `device`; `group` None is the default process group."""

    rank: int
    ranks: int
    device: torch.device
    group: dist.ProcessGroup | None = None
    # rank 0 only: a forward pass may run only inside a step announced to the other ranks
    # (rank_engine.LeaderEngine counts them); one that is not would pair its collectives with
    # the followers' wait for a command, so it fails at once instead
    guard_steps: bool = False
    announced: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def _check_announced(self) -> None:
        if self.guard_steps and not self.announced:
            raise RuntimeError("rank 0 ran a forward pass the other ranks were not told of (an "
                               "Engine path other than prepare_cache / prefill / decode_step?)")

    def all_reduce(self, partial: Tensor) -> Tensor:
        """Sum over the ranks (in place when partial is contiguous, else on a contiguous copy);
        returns the sum."""
        self._check_announced()
        partial = partial.contiguous()
        dist.all_reduce(partial, group=self.group)
        return partial

    def gather_vocab(self, logits: Tensor) -> Tensor:
        """[..., V/N] slices of the ranks, in rank order -> [..., V] on every rank."""
        self._check_announced()
        logits = logits.contiguous()
        parts = [torch.empty_like(logits) for _ in range(self.ranks)]
        dist.all_gather(parts, logits, group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, tensor: Tensor) -> Tensor:
        """Rank 0's `tensor` on every rank (in place; same shape and dtype everywhere)."""
        dist.broadcast(tensor, src=0, group=self.group)
        return tensor

    def barrier(self) -> None:
        # a tiny all-reduce instead of dist.barrier: NCCL's barrier guesses a device
        dist.all_reduce(torch.zeros(1, device=self.device), group=self.group)
