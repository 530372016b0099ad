"""The engine's settings: which of the extension's kernels a forward pass may take.

One frozen dataclass, built once when an `Engine` is constructed (from its arguments, or from
the environment through `Settings.from_env`, the one reader of ``TOYLLM_*`` variables in the
package). engine/forward.py is the one place that reads it to choose kernels. Every setting
only chooses between implementations of the same math: the fused CUDA paths give the same bits
as the kernels they replace, the MKL and cuBLAS products do not (docs/ENGINE.md, "Settings").

Example::

    >>> from toyllm.engine.settings import Fusion, Settings
    >>> Settings.from_env({"TOYLLM_FUSION": "rope_kv", "TOYLLM_CUDA_GEMV": "0"})
    Settings(fusion=<Fusion.ROPE_KV: 2>, cpu_gemv=True, cuda_gemv=False, cuda_gemv_max_mib=128, \
cuda_argmax=True, decode_attention='kernel', decode_kernel_max_rows=None, \
programmatic_launch=True)
    >>> Settings.from_env({"TOYLLM_FUSION": "most"})
    Traceback (most recent call last):
    ...
    toyllm.engine.settings.SettingsError: TOYLLM_FUSION: expected one of none, elementwise, \
rope_kv, silu_gemv, full, got 'most'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import IntEnum

__all__ = ["ENV_PREFIX", "Fusion", "Settings", "SettingsError"]

ENV_PREFIX = "TOYLLM_"


class SettingsError(ValueError):
    """A setting (argument or environment variable) that names no valid choice."""


class Fusion(IntEnum):
    """How much of a layer runs fused. Each level adds to the one below it."""

    NONE = 0  # the torch code of models/ (still through the KV cache and the GEMVs)
    ELEMENTWISE = 1  # one-kernel RMSNorm (with the residual add), RoPE, silu*up; CPU fp32 loops
    ROPE_KV = 2  # decode: RoPE on q and k and the K/V write in one op
    SILU_GEMV = 3  # one CUDA row: silu(gate) * up inside the down product
    FULL = 4  # one CUDA row: the residual add + RMSNorm inside the product that reads them,
    #           with silu*up (gate/up) or RoPE + the K/V write (q/k/v) in its epilogue


_DECODE_ATTENTION = ("kernel", "sdpa")


@dataclass(frozen=True)
class Settings:
    """Kernel choices of one engine. Defaults are the fastest measured paths."""

    fusion: Fusion = Fusion.FULL
    cpu_gemv: bool = True  # CPU decode products: the extension's AVX2 GEMV (False: MKL)
    cuda_gemv: bool = True  # one-row CUDA products: the extension's GEMV (False: cuBLAS)
    cuda_gemv_max_mib: int = 128  # ... for weights up to this size; larger go to cuBLAS
    cuda_argmax: bool = True  # greedy pick: toyllm::argmax on CUDA (False: torch.argmax)
    decode_attention: str = "kernel"  # "kernel": toyllm::decode_attention; "sdpa": masked SDPA
    # rows above which a decode step's attention takes SDPA; None: 8 where the CUDA kernel runs
    # on CUDA cores (and on the CPU), any number where it runs on tensor cores
    decode_kernel_max_rows: int | None = None
    programmatic_launch: bool = True  # Hopper: kernels launch before their predecessor ends

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "fusion", Fusion(self.fusion))
        except ValueError:
            raise SettingsError(
                f"fusion: expected one of {_names(Fusion)} (or 0-4), got {self.fusion!r}"
            ) from None
        for name in ("cpu_gemv", "cuda_gemv", "cuda_argmax", "programmatic_launch"):
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(f"{name}: expected True or False, got "
                                    f"{getattr(self, name)!r}")
        if self.decode_attention not in _DECODE_ATTENTION:
            raise SettingsError(f"decode_attention: expected 'kernel' or 'sdpa', got "
                                f"{self.decode_attention!r}")
        _check_count("cuda_gemv_max_mib", self.cuda_gemv_max_mib, minimum=0)
        if self.decode_kernel_max_rows is not None:
            _check_count("decode_kernel_max_rows", self.decode_kernel_max_rows, minimum=0)

    @property
    def cuda_gemv_max_bytes(self) -> int:
        return self.cuda_gemv_max_mib * 2**20

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``TOYLLM_<FIELD>`` variables (``TOYLLM_PDL`` for programmatic_launch),
        then `overrides`. Booleans are 1/0/true/false; unknown ``TOYLLM_`` names of the old
        switches are refused with the setting that replaced them."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            var = _env_name(f.name)
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = _parse(var, f.name, raw.strip())
        for var, instead in _REPLACED.items():
            if env.get(var) is not None:
                raise SettingsError(f"{var} is no longer read: use {instead}")
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def _env_name(field_name: str) -> str:
    return ENV_PREFIX + ("PDL" if field_name == "programmatic_launch" else field_name.upper())


# the switches of earlier versions, and what took their place
_REPLACED = {
    "TOYLLM_FUSED_OPS": "TOYLLM_FUSION=none",
    "TOYLLM_FUSED_ROPE_KV": "TOYLLM_FUSION=elementwise",
    "TOYLLM_FUSED_SILU_GEMV": "TOYLLM_FUSION=rope_kv",
    "TOYLLM_FUSED_NORM_GEMV": "TOYLLM_FUSION=silu_gemv",
    "TOYLLM_FUSED_NORM_SILU": "TOYLLM_FUSION=silu_gemv",
    "TOYLLM_FUSED_NORM_ROPE": "TOYLLM_FUSION=silu_gemv",
    "TOYLLM_CPU_DECODE_ATTENTION": "TOYLLM_DECODE_ATTENTION=sdpa",
    "TOYLLM_DECODE_MMA": "the tensor_cores argument of toyllm::decode_attention",
    "TOYLLM_DECODE_TILE": "the tile argument of toyllm::decode_attention",
    "TOYLLM_DECODE_REVERSE": "the reverse argument of toyllm::decode_attention",
    "TOYLLM_STAGED_WARPS": "the warps argument of the toyllm::gemv_add_rms_norm operators",
}


def _names(enum: type[IntEnum]) -> str:
    return ", ".join(m.name.lower() for m in enum)


def _parse(var: str, name: str, raw: str) -> object:
    if name == "fusion":
        if raw.isdigit() and int(raw) in {m.value for m in Fusion}:
            return Fusion(int(raw))
        try:
            return Fusion[raw.upper()]
        except KeyError:
            raise SettingsError(f"{var}: expected one of {_names(Fusion)}, got {raw!r}") from None
    if name in ("cpu_gemv", "cuda_gemv", "cuda_argmax", "programmatic_launch"):
        low = raw.lower()
        if low in ("1", "true"):
            return True
        if low in ("0", "false"):
            return False
        raise SettingsError(f"{var}: expected 1, 0, true or false, got {raw!r}")
    if name == "decode_attention":
        if raw not in _DECODE_ATTENTION:
            raise SettingsError(f"{var}: expected kernel or sdpa, got {raw!r}")
        return raw
    # cuda_gemv_max_mib, decode_kernel_max_rows: whole numbers
    if not raw.isdigit() or len(raw) > 12:
        raise SettingsError(f"{var}: expected a whole number, got {raw!r}")
    return int(raw)


def _check_count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingsError(f"{name}: expected a whole number >= {minimum}, got {value!r}")
