"""Turning the user's --device / --dtype words into torch objects, with clear errors."""

from __future__ import annotations

import torch

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


class DeviceError(ValueError):
    """An unknown or unavailable device or dtype."""


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(
            f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"unsupported device {name!r}; expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but no CUDA GPU is available here")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"device {name!r} asked for, but only {count} CUDA GPU(s) exist")
    return torch.device("cuda", device.index if device.index is not None else 0)


def cuda_kernels_missing() -> str | None:
    """Why toyllm's CUDA kernels cannot run here (no CUDA GPU, the extension not built, or built
    without CUDA), or None when they can: the one guard of the CUDA-only scripts."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False); nothing run"
    try:
        from toyllm.engine.ops import WITH_CUDA
    except ImportError as exc:
        return str(exc)
    if not WITH_CUDA:
        return ("toyllm.engine.ops._C was built without CUDA; rebuild it on this machine with "
                "pip install --no-build-isolation -e .")
    return None


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' (bf16 on CUDA, fp32 on CPU), fp32, fp16 or bf16."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise DeviceError(f"unsupported dtype {name}; expected fp32, fp16 or bf16")
        return name
    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise DeviceError(
            f"unknown dtype {name!r}; expected auto, fp32, fp16 or bf16"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
