"""The one Python face of the C++/CUDA extension (`_C`, built from csrc/).

Importing this package loads the extension, which registers the ``toyllm::`` operators with
PyTorch and defines the `KVCache` and `PagedKVCache` classes; an extension that is missing or
older than this code stops the import here, once, with the command that rebuilds it. The modules
beside this file wrap the operators by subsystem (kv_cache, paged_cache, elementwise, rope_kv,
gemv, gemv_norm, argmax, cpu_step): each wrapper says where its operator applies;
engine/forward.py decides which one runs. `fakes`, registered here with the extension, gives
every operator's output shapes for fake and meta tensors (FakeTensorMode, opcheck,
torch.compile); the operators check their arguments once, in C++, with the messages users see.
"""

from __future__ import annotations

import torch

_REBUILD = "pip install --no-build-isolation -e . (from the repository root)"

try:
    from toyllm.engine.ops import _C
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "toyllm's C++ extension toyllm.engine.ops._C is not built (or does not match the "
        f"installed torch): {exc}. Build it with: {_REBUILD}"
    ) from exc

#: Every operator the Python side calls; a stale build lacks some.
OPERATORS = (
    "kv_update", "decode_attention", "rms_norm", "add_rms_norm", "rope", "silu_mul",
    "rope_kv_update", "gemv", "gemv_silu_mul", "gemv_add_rms_norm", "gemv_add_rms_norm_silu_mul",
    "gemv_add_rms_norm_rope_kv", "argmax", "paged_kv_write", "paged_decode_attention",
    "cpu_decode_step",
)
_missing = [op for op in OPERATORS if not hasattr(torch.ops.toyllm, op)]
if _missing:
    raise ImportError(
        f"toyllm.engine.ops._C predates the operators toyllm::{', '.join(_missing)}: rebuild it "
        f"with: {_REBUILD}"
    )

# Every operator's fake (its output shapes), registered once, whichever wrapper is imported.
from toyllm.engine.ops import fakes  # noqa: E402, F401

#: The extension was built with its CUDA kernels.
WITH_CUDA: bool = bool(_C.with_cuda)
#: The dtypes every operator takes on CUDA (the CPU loops take float32).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def no_autograd(*tensors: torch.Tensor) -> bool:
    """Nothing here records autograd: the operators have no backward."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
