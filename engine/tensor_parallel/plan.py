"""Which rows or columns of each weight a tensor-parallel rank holds (Megatron's split).

With N ranks, rank r holds:

    q_proj, k_proj, v_proj  [heads * D, hidden]   its heads' rows (query heads Hq/N, K/V Hkv/N)
    o_proj                  [hidden, Hq * D]      the columns of those query heads
    gate_proj, up_proj      [I, hidden]           rows r*I/N .. (r+1)*I/N
    down_proj               [hidden, I]           the same columns
    embed_tokens, lm_head   [V, hidden]           vocabulary rows r*V/N .. (r+1)*V/N
    norms                   [hidden]              whole (every rank)

so q/k/v, attention and gate/up need nothing from the other ranks; o and down give partial
sums (one all-reduce each per layer); the embedding of a token is nonzero on the one rank that
holds its row (one all-reduce), and the logits are gathered from the ranks' vocabulary slices.
Each rank's model is a `Transformer` of the `shard_config`: Hq/N and Hkv/N heads and I/N
intermediate units, so its KV cache holds only its own K/V heads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from toyllm.models.config import ModelConfig


class TensorParallelError(ValueError):
    """A tensor-parallel request that cannot run: a rank count that does not divide the
    model, too few GPUs, a rank count out of range."""


def check_ranks(config: ModelConfig, ranks: int, where: str = "model") -> None:
    """Every size a rank splits must divide by `ranks`: one error naming all that do not,
    raised before any weight is read."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise TensorParallelError(f"--tensor-parallel: expected a positive integer, got {ranks!r}")
    sizes = (("num_heads", config.num_heads), ("num_kv_heads", config.num_kv_heads),
             ("intermediate_size", config.intermediate_size), ("vocab_size", config.vocab_size))
    bad = [f"{name} {value}" for name, value in sizes if value % ranks]
    if bad:
        raise TensorParallelError(
            f"--tensor-parallel {ranks}: {where} has {', '.join(bad)}, which do(es) not divide "
            f"by {ranks}; every rank must hold whole heads, K/V heads, MLP units and vocabulary "
            f"rows (this model allows: {', '.join(map(str, allowed_ranks(config)))})")


def allowed_ranks(config: ModelConfig) -> list[int]:
    """The rank counts this model splits into."""
    return [n for n in range(1, config.num_kv_heads + 1)
            if not (config.num_heads % n or config.num_kv_heads % n
                    or config.intermediate_size % n or config.vocab_size % n)]


def shard_config(config: ModelConfig, ranks: int) -> ModelConfig:
    """One rank's shape: Hq/N query heads, Hkv/N K/V heads, I/N MLP units (head_dim stays,
    so it is given explicitly); the vocabulary keeps its full size (token ids, bos/eos), the
    rank's embedding and head hold V/N of its rows (plan.vocab_rows)."""
    check_ranks(config, ranks)
    return replace(config, num_heads=config.num_heads // ranks,
                   num_kv_heads=config.num_kv_heads // ranks,
                   intermediate_size=config.intermediate_size // ranks, head_dim=config.head_dim)


@dataclass(frozen=True)
class ShardPlan:
    """The slice of every weight one rank holds."""

    config: ModelConfig  # the whole model's
    rank: int
    ranks: int

    def vocab_rows(self) -> tuple[int, int]:
        """[start, end) of the vocabulary rows this rank's embedding and head hold."""
        per = self.config.vocab_size // self.ranks
        return self.rank * per, (self.rank + 1) * per

    def split(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, end) of parameter `name` that this rank holds; None: the whole."""
        c, r, n = self.config, self.rank, self.ranks
        d = c.head_dim
        leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        if name in ("embed_tokens.weight", "lm_head.weight"):
            return (0, *self.vocab_rows())
        if leaf == "q_proj":
            per = c.num_heads // n * d
            return 0, r * per, (r + 1) * per
        if leaf in ("k_proj", "v_proj"):
            per = c.num_kv_heads // n * d
            return 0, r * per, (r + 1) * per
        if leaf == "o_proj":
            per = c.num_heads // n * d
            return 1, r * per, (r + 1) * per
        if leaf in ("gate_proj", "up_proj"):
            per = c.intermediate_size // n
            return 0, r * per, (r + 1) * per
        if leaf == "down_proj":
            per = c.intermediate_size // n
            return 1, r * per, (r + 1) * per
        return None  # norms

    def shard_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this rank's part of a weight of `shape`."""
        cut = self.split(name)
        if cut is None:
            return shape
        dim, start, end = cut
        return tuple(end - start if i == dim else s for i, s in enumerate(shape))
