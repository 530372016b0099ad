"""Weight storage that makes CPU decode fast: every projection stored input-major.

A decode step is a chain of matrix-vector products. With PyTorch's nn.Linear layout
(weight [out, in], row-major), MKL's sgemv walks the matrix in its slow transposed mode,
about 3x slower than on the same numbers stored as a contiguous [in, out] matrix (docs/PERF.md,
"CPU decode"). So on the CPU each weight is re-stored as W.t().contiguous()
and the parameter becomes its transposed *view*: same shape, same values, same
state_dict, no extra memory; F.linear(x, W) then hands MKL a contiguous [in, out] matrix.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def store_weights_input_major(model: nn.Module) -> nn.Module:
    """Re-store every 2-D weight of `model` as a transposed view of an [in, out] contiguous
    tensor (tied weights stay tied). Values and shapes are unchanged."""
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        w = module.weight
        if w.dim() != 2:
            continue
        key = id(w)
        if key not in done:
            if w.stride(0) == 1 and w.stride(1) >= w.shape[0]:  # already input-major (maybe
                done[key] = w                                      # a view of a fused matrix)
                continue
            w.data = w.data.t().contiguous().t()
            done[key] = w
    return model
