"""Transparent huge pages under the CPU decode step's weights (Linux).

Why: a CPU decode step streams every weight once a token. Where the weights do not fit the
last-level cache they come from memory in 4 KiB pages, one TLB miss each, which a VM walks in
two levels of page tables: on a 2-vCPU AMD EPYC VM (32 MiB L3) the stories15M shape's step ran
at 211-239 tok/s on one thread in 4 KiB pages and 309-385 in 2 MiB pages (docs/PERF.md,
2026-12-02, issue 21). torch's CPU allocator asks for huge pages only under the environment
variable THP_MEM_ALLOC_ENABLE, read once per process.

What: `advise(tensors)` asks the kernel for huge pages under the 2 MiB-aligned spans around the
tensors' memory, each cut to the whole huge pages inside one of the process's writable mappings,
in place (madvise MADV_HUGEPAGE, then MADV_COLLAPSE, Linux 6.1+, to back the pages now): the
same addresses and contents, so nothing that holds the tensors changes. The spans may reach past
the tensors into neighbouring memory of the same mapping, whose contents a collapse keeps too. A
hint: where the platform, the kernel or its settings refuse, nothing happens.

Example::

    >>> import torch
    >>> from toyllm.engine.huge_pages import advise
    >>> w = torch.randn(1024, 1024)
    >>> before = w.clone()
    >>> _ = advise([w])  # spans advised (0 where refused)
    >>> torch.equal(w, before)
    True
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable

from torch import Tensor

__all__ = ["advise"]

_HUGE = 2 << 20  # x86-64's transparent huge page
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25


def _madvise() -> ctypes._CFuncPtr | None:
    """libc's madvise, or None off Linux or without it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def spans(tensors: Iterable[Tensor]) -> list[tuple[int, int]]:
    """The 2 MiB-aligned address spans [start, end) around the tensors' memory, merged."""
    raw = sorted((t.data_ptr() // _HUGE * _HUGE,
                  -(-(t.data_ptr() + t.numel() * t.element_size()) // _HUGE) * _HUGE)
                 for t in tensors if t.numel() > 0)
    merged: list[list[int]] = []
    for start, end in raw:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _mappings() -> list[tuple[int, int]]:
    """This process's writable private mappings [start, end) (/proc/self/maps), where huge
    pages can go; the kernel refuses a span that crosses a hole or another mapping."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[1].startswith("rw") and fields[1][3] == "p":
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    out.append((start, end))
    except OSError:
        return []
    return out


def advise(tensors: Iterable[Tensor]) -> int:
    """Huge pages under the CPU tensors' memory where the system gives them; returns how many
    spans (each within one mapping) were collapsed into huge pages (0 off Linux, on older
    kernels or with THP off)."""
    madvise = _madvise()
    if madvise is None:
        return 0
    maps = _mappings()
    done = 0
    for start, end in spans(t for t in tensors if t.device.type == "cpu"):
        for map_start, map_end in maps:
            # the span's whole huge pages inside this mapping
            lo = -(-max(start, map_start) // _HUGE) * _HUGE
            hi = min(end, map_end) // _HUGE * _HUGE
            if lo < hi and madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0:
                done += madvise(lo, hi - lo, _MADV_COLLAPSE) == 0
    return done
