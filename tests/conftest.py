"""Shared pytest configuration: `cuda`-marked tests are skipped where no GPU can run them."""

from __future__ import annotations

import pytest
import torch


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        from engine import _C
    except ImportError:
        return None  # the test module reports the missing extension itself
    if not _C.with_cuda:
        return "engine._C was built without CUDA (rebuild on a machine with nvcc)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _cuda_skip_reason()
    if reason is None:
        return
    skip_cuda = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)
