"""`toyllm info`: what a model shape costs in memory, by arithmetic alone.

For a config (TOML, Hugging Face config.json, checkpoint directory or the shipped default):
parameters by part, weight bytes, and KV-cache bytes per token and at a context length for a
batch size, in each storage dtype. Nothing is allocated and no extension is loaded, so it
answers in a fraction of a second for any shape, Llama-70B included.

    >>> from toyllm.models.config import ModelConfig
    >>> config = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
    ...                      num_kv_heads=2, intermediate_size=176, max_seq_len=256)
    >>> info = describe(config, batch=1, context=256)
    >>> info.total_params, info.dtypes["fp16"].kv_bytes_per_token
    (158016, 256)

The KV cache stores, per layer, K and V for every KV head: one token of one sequence takes
``2 * num_layers * num_kv_heads * head_dim * element_size`` bytes (what `KVCache` allocates
per position and row: its storage is [num_layers, 2, batch, max_seq_len, kv_heads, head_dim]).
The paged cache of the serving engine (`PagedKVCache`) allocates in blocks of `block_size`
tokens: one block takes ``block_size`` tokens' bytes, and a GiB of pool holds
``2**30 // block_bytes`` blocks (`kv_blocks_per_gib`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from toyllm.models.config import ConfigError, ModelConfig, load_config
from toyllm.models.shipped import resolve_config

# Bytes per element of each storage dtype the engine supports.
ELEMENT_SIZES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2}

# The same directory as models.model_source.DEFAULT_MODEL_DIR, named here so that `info` needs
# neither torch nor the extension (engine/tools/ -> the package's models/default).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "default"


@dataclass(frozen=True)
class DtypeCost:
    """Memory of one model shape stored in one dtype."""

    element_size: int
    weight_bytes: int
    kv_bytes_per_token: int  # one token of one sequence, all layers, K and V
    kv_cache_bytes: int  # kv_bytes_per_token * context * batch
    total_bytes: int  # weights + KV cache (activations and workspace not counted)
    kv_block_bytes: int  # one block of the paged cache: kv_bytes_per_token * block_size
    kv_blocks_per_gib: int  # blocks of the paged cache one GiB of pool holds


@dataclass(frozen=True)
class ModelInfo:
    """The memory arithmetic of one config at one batch size and context length."""

    source: str
    config: ModelConfig
    batch: int
    context: int
    block_size: int  # tokens per block of the paged cache
    params: dict[str, int]  # by part: embedding, attention, mlp, norms, lm_head
    dtypes: dict[str, DtypeCost]

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def attention_kind(self) -> str:
        return attention_kind(self.config)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "config": self.config.to_dict(),
            "attention": self.attention_kind,
            "group_size": self.config.group_size,
            "batch": self.batch,
            "context": self.context,
            "block_size": self.block_size,
            "params": dict(self.params, total=self.total_params),
            "dtypes": {name: asdict(cost) for name, cost in self.dtypes.items()},
        }


def attention_kind(config: ModelConfig) -> str:
    """MHA (one KV head per query head), MQA (one KV head) or GQA (groups in between)."""
    if config.num_kv_heads == config.num_heads:
        return "MHA"
    if config.num_kv_heads == 1:
        return "MQA"
    return "GQA"


def dtype_cost(config: ModelConfig, element_size: int, batch: int, context: int,
               block_size: int = 16) -> DtypeCost:
    weights = config.num_params() * element_size
    per_token = config.kv_bytes_per_token(element_size)
    cache = per_token * context * batch
    block = per_token * block_size
    return DtypeCost(element_size, weights, per_token, cache, weights + cache, block,
                     2**30 // block)


def describe(config: ModelConfig, batch: int = 1, context: int | None = None,
             source: str = "", block_size: int = 16) -> ModelInfo:
    """The arithmetic for `config`; context defaults to config.max_seq_len."""
    context = config.max_seq_len if context is None else context
    for name, value in (("batch", batch), ("context", context), ("block-size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
            raise ConfigError(f"--{name}: expected a positive integer (at most 2**31 - 1), "
                              f"got {value!r}")
    if context > config.max_seq_len:
        raise ConfigError(
            f"--context {context} is longer than the model's max_seq_len {config.max_seq_len}"
        )
    if block_size & (block_size - 1) or config.max_seq_len % block_size:
        raise ConfigError(f"--block-size: expected a power of two dividing max_seq_len "
                          f"{config.max_seq_len}, got {block_size}")
    costs = {name: dtype_cost(config, size, batch, context, block_size)
             for name, size in ELEMENT_SIZES.items()}
    return ModelInfo(source or config.name, config, batch, context, block_size,
                     config.param_counts(), costs)


def load_for_info(source: str | Path | None) -> tuple[ModelConfig, str]:
    """A config from a .toml, a config.json, a checkpoint directory or a shipped config's name;
    None: the shipped default model (a clear ConfigError while it has not been trained yet)."""
    if source is None:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise ConfigError(
                f"no shipped default model at {DEFAULT_MODEL_DIR} (config.json missing); pass a "
                "config .toml, a config.json or a checkpoint directory"
            )
        return load_config(DEFAULT_MODEL_DIR), "default model"
    source = resolve_config(source)  # a path that exists, else a shipped config's name
    path = Path(source)
    if not path.exists():
        raise ConfigError(
            f"not found: {path} (expected a config .toml, a config.json or a checkpoint directory)"
        )
    if path.suffix == ".gguf":
        from toyllm.models.gguf_file import read_gguf_config

        try:
            return read_gguf_config(path), str(path)
        except ValueError as exc:  # GGUFError: one line, as a config error
            raise ConfigError(str(exc)) from None
    return load_config(path), str(path)


# rendering ------------------------------------------------------------------------------------
def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units, three significant figures)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_count(n: int) -> str:
    """12_345_678 -> '12.35M'."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def render_info(info: ModelInfo, console: Console) -> None:
    c = info.config
    console.print(
        f"[bold]{info.source}[/]: {c.num_layers} layers, hidden {c.hidden_size}, "
        f"{c.num_heads} query heads / {c.num_kv_heads} KV heads ({info.attention_kind}, "
        f"group {c.group_size}), head_dim {c.head_dim}, MLP {c.intermediate_size}, vocab "
        f"{c.vocab_size}, max_seq_len {c.max_seq_len}"
        + (", tied embeddings" if c.tie_embeddings else "")
    )
    params = Table(title="parameters by part")
    params.add_column("part")
    params.add_column("parameters", justify="right")
    params.add_column("share", justify="right")
    total = info.total_params
    for part, n in info.params.items():
        note = " (tied to embedding)" if part == "lm_head" and c.tie_embeddings else ""
        params.add_row(part + note, f"{n:,}", f"{100 * n / total:.1f}%")
    params.add_row("[bold]total[/]", f"[bold]{total:,}[/]", f"({format_count(total)})")
    console.print(params)
    memory = Table(title=f"memory at batch {info.batch}, context {info.context} "
                         "(weights + KV cache; activations not counted); paged KV blocks of "
                         f"{info.block_size} tokens per GiB")
    for col in ("dtype", "weights", "KV / token", f"KV @ {info.context} x {info.batch}",
                "total", "KV blocks / GiB"):
        memory.add_column(col, justify="left" if col == "dtype" else "right")
    for name, cost in info.dtypes.items():
        memory.add_row(name, format_bytes(cost.weight_bytes), format_bytes(cost.kv_bytes_per_token),
                       format_bytes(cost.kv_cache_bytes), format_bytes(cost.total_bytes),
                       f"{cost.kv_blocks_per_gib:,}")
    console.print(memory)
