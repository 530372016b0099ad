"""`ModelConfig`: the shape of a Llama-style model, loaded from TOML or a Hugging Face config.json.

Every size is checked when the config is built, so a bad file fails with a message that names
the field, what was expected and what was given, before any weight is allocated.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from toyllm.models import validate


class ConfigError(ValueError):
    """A model config that is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3-style RoPE frequency scaling (`rope_type = "llama3"`) or plain linear scaling."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("llama3", "linear"):
            raise ConfigError(
                f"rope_scaling.rope_type: expected 'llama3' or 'linear', got {self.rope_type!r}"
            )
        _check_positive("rope_scaling.factor", self.factor, float)
        if self.rope_type == "llama3":
            _check_positive("rope_scaling.low_freq_factor", self.low_freq_factor, float)
            _check_positive("rope_scaling.high_freq_factor", self.high_freq_factor, float)
            _check_positive(
                "rope_scaling.original_max_position_embeddings",
                self.original_max_position_embeddings,
                int,
            )
            if self.high_freq_factor <= self.low_freq_factor:
                raise ConfigError(
                    "rope_scaling: expected high_freq_factor > low_freq_factor, got "
                    f"{self.high_freq_factor} <= {self.low_freq_factor}"
                )


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-style decoder. `head_dim` defaults to hidden_size // num_heads."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0 means hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    bos_id: int = 1
    eos_id: int = 2
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_seq_len"):
            _check_positive(name, getattr(self, name), int)
        if not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or \
                self.head_dim < 0:
            raise ConfigError(f"head_dim: expected a positive integer, got {self.head_dim!r}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                    f"({self.num_heads}) unless head_dim is given"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim: RoPE needs an even head_dim, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        _check_positive("rope_theta", self.rope_theta, float)
        _check_positive("norm_eps", self.norm_eps, float)
        for name in ("bos_id", "eos_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not \
                    0 <= value < self.vocab_size:
                raise ConfigError(
                    f"{name}: expected an integer in [0, {self.vocab_size}), got {value!r}"
                )
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(
                f"tie_embeddings: expected true or false, got {self.tie_embeddings!r}"
            )

    # Derived sizes -------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads that share one K/V head (1 = MHA, num_heads = MQA)."""
        return self.num_heads // self.num_kv_heads

    def param_counts(self) -> dict[str, int]:
        """Parameters by part of the model."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * d * self.intermediate_size
        norms = 2 * d
        return {
            "embedding": self.vocab_size * d,
            "attention": self.num_layers * attn,
            "mlp": self.num_layers * mlp,
            "norms": self.num_layers * norms + d,
            "lm_head": 0 if self.tie_embeddings else self.vocab_size * d,
        }

    def num_params(self) -> int:
        return sum(self.param_counts().values())

    def kv_bytes_per_token(self, element_size: int) -> int:
        """Bytes of K and V cache one token takes across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size

    def with_overrides(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.rope_scaling is None:
            del data["rope_scaling"]
        return data


def _check_positive(name: str, value: Any, kind: type) -> None:
    if kind is float:
        validate.positive_number(name, value, ConfigError)
        return
    if not validate.is_int(value) or value <= 0:
        raise ConfigError(f"{name}: expected a positive integer, got {validate.describe(value)}")
    if value > validate.MAX_SIZE:
        raise ConfigError(f"{name}: expected a positive integer of at most 2**31 - 1, got "
                          f"{value}")


_FIELDS = {f.name for f in fields(ModelConfig)}
_SCALING_FIELDS = {f.name for f in fields(RopeScaling)}


def config_from_dict(data: dict[str, Any], source: str = "config") -> ModelConfig:
    """Build a ModelConfig from the TOML schema (keys are ModelConfig field names)."""
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {unknown}; expected some of {sorted(_FIELDS)}"
        )
    missing = [name for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                 "num_kv_heads", "intermediate_size") if name not in data]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {missing}")
    data = dict(data)
    scaling = data.pop("rope_scaling", None)
    if "name" in data:
        validate.string(f"{source}: name", data["name"], ConfigError)
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise ConfigError(f"{source}: rope_scaling must be a table, got {scaling!r}")
        bad = sorted(set(scaling) - _SCALING_FIELDS)
        if bad:
            raise ConfigError(
                f"{source}: unknown rope_scaling key(s) {bad}; expected some of "
                f"{sorted(_SCALING_FIELDS)}"
            )
        data["rope_scaling"] = RopeScaling(**scaling)
    try:
        return ModelConfig(**data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except TypeError as exc:  # wrong value types that dataclass itself rejects
        raise ConfigError(f"{source}: {exc}") from None


def config_from_hf(data: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Map a Hugging Face LlamaConfig dict (old `rope_theta`/`rope_scaling` keys or the newer
    `rope_parameters`) onto ModelConfig. Types are checked, not coerced: "false" is not a
    bool and "1e-5" is not a number."""

    def where(key: str) -> str:
        return f"{source}: {key}"

    model_type = data.get("model_type", "llama")
    if model_type not in ("llama", "mistral"):
        raise ConfigError(f"{source}: expected model_type 'llama', got {model_type!r}")
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: expected hidden_act 'silu' (SwiGLU), got {act!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if data.get(flag) is not None and validate.boolean(where(flag), data[flag], ConfigError):
            raise ConfigError(f"{source}: {flag}=true is not supported (Llama has no biases)")
    if data.get("sliding_window"):
        raise ConfigError(f"{source}: sliding-window attention is not supported")
    try:
        num_heads = data["num_attention_heads"]
        base = {
            "vocab_size": data["vocab_size"],
            "hidden_size": data["hidden_size"],
            "num_layers": data["num_hidden_layers"],
            "num_heads": num_heads,
            "num_kv_heads": num_heads if data.get("num_key_value_heads") is None
            else data["num_key_value_heads"],
            "intermediate_size": data["intermediate_size"],
        }
    except KeyError as exc:
        raise ConfigError(f"{source}: missing required key {exc.args[0]!r}") from None

    rope = data.get("rope_parameters")
    if rope is not None:
        validate.table(where("rope_parameters"), rope, ConfigError)
        if isinstance(rope.get("full_attention"), dict):
            rope = rope["full_attention"]
    else:
        scaling_table = data.get("rope_scaling")
        rope = {} if scaling_table is None else dict(
            validate.table(where("rope_scaling"), scaling_table, ConfigError))
        if "rope_theta" in data:
            rope["rope_theta"] = data["rope_theta"]
    rope = dict(rope)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if not isinstance(rope_type, str):
        raise ConfigError(f"{where('rope_type')}: expected a string, got "
                          f"{validate.describe(rope_type)}")
    theta = validate.positive_number(
        where("rope_theta"), rope.get("rope_theta", data.get("rope_theta", 10000.0)), ConfigError)
    scaling = None
    if rope_type in ("llama3", "linear"):
        kwargs = {"rope_type": rope_type, "factor": rope.get("factor")}
        if rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in rope:
                    raise ConfigError(f"{source}: llama3 rope scaling is missing {key!r}")
                kwargs[key] = rope[key]
        try:
            scaling = RopeScaling(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    elif rope_type != "default":
        raise ConfigError(
            f"{source}: unsupported rope type {rope_type!r}; expected default, linear or llama3"
        )
    head_dim = data.get("head_dim") or 0
    config = dict(
        base,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=validate.positive_number(
            where("rms_norm_eps"), data.get("rms_norm_eps", 1e-6), ConfigError),
        max_seq_len=data.get("max_position_embeddings", 2048),
        tie_embeddings=validate.boolean(
            where("tie_word_embeddings"), data.get("tie_word_embeddings", False), ConfigError),
        bos_id=_token_id(source, "bos_token_id", data.get("bos_token_id"), 1),
        eos_id=_token_id(source, "eos_token_id", data.get("eos_token_id"), 2),
    )
    try:
        return ModelConfig(**config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _token_id(source: str, key: str, value: Any, default: int) -> int:
    """bos/eos ids: an integer, null (the default), or a non-empty list of integers (the
    first one is used: Llama 3 lists several end-of-turn ids)."""
    if value is None:
        return default
    if isinstance(value, list):
        if not value or not all(validate.is_int(v) for v in value):
            raise ConfigError(f"{source}: {key}: expected an integer or a non-empty list of "
                              f"integers, got {validate.describe(value)}")
        return value[0]
    if not validate.is_int(value):
        raise ConfigError(f"{source}: {key}: expected an integer or a non-empty list of "
                          f"integers, got {validate.describe(value)}")
    return value


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The Hugging Face config.json for this shape (LlamaForCausalLM, old-style rope keys,
    which both old and new transformers read)."""
    data: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": config.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": config.bos_id,
        "eos_token_id": config.eos_id,
    }
    if config.rope_scaling is not None:
        s = config.rope_scaling
        scaling: dict[str, Any] = {"rope_type": s.rope_type, "factor": s.factor}
        if s.rope_type == "llama3":
            scaling.update(
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings,
            )
        data["rope_scaling"] = scaling
    return data


def load_config(path: str | Path) -> ModelConfig:
    """Load a config from a TOML file, a Hugging Face config.json, or a checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix not in (".toml", ".json"):
        raise ConfigError(
            f"{path}: expected a .toml config or a config.json, got {path.suffix!r}")
    text = validate.read_text(path, "config file", ConfigError)
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except (ValueError, RecursionError) as exc:  # TOMLDecodeError is a ValueError
            raise ConfigError(f"{path}: not valid TOML ({_first_line(exc)})") from None
        name = data.pop("name", path.stem)
        return config_from_dict(dict(data, name=name), source=str(path))
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{path}: not valid JSON ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return replace(config_from_hf(data, source=str(path)), name=path.parent.name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
