"""Keep freed memory in the process while quantized models train (glibc's malloc, Linux).

glibc gives the top of its heap back to the system once more than ``M_TRIM_THRESHOLD`` of it is free, and every
page taken back is faulted in (and zeroed) again at its next use. A training step frees and re-allocates its
activations every step; with the fake quantizers' extra activation-sized tensors the heap's top is freed and given
back within each step, and the pages come back as faults inside the next convolutions: on YOLO11n (batch 16,
160 px, 2 threads) about 14,000 minor faults per W8A8 step against about none for float, 7-8 % of the step.

:func:`keep_freed_memory` (called by :func:`detq_hooks.quantize`) sets ``M_MMAP_THRESHOLD`` to 32 MiB (glibc's
upper limit, where its own adaptive threshold ends) and ``M_TRIM_THRESHOLD`` to 1 GiB: freed memory up to that
size stays with the process, as PyTorch's caching allocators keep theirs. It changes nothing where the user chose
the allocator (``GLIBC_TUNABLES`` with a malloc setting, a ``MALLOC_*_`` variable, jemalloc/tcmalloc/mimalloc in
``LD_PRELOAD``), off glibc, or with ``DETQ_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import threading

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30

_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
               "MALLOC_ARENA_MAX")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_lock = threading.Lock()
_status: str | None = None


def _reason_to_leave_alone() -> str | None:
    if os.environ.get("DETQ_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return "left alone: DETQ_MALLOC_TUNING=0"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"left alone: not glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown libc'})"
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "left alone: GLIBC_TUNABLES sets malloc"
    chosen = [k for k in _MALLOC_ENV if k in os.environ]
    if chosen:
        return f"left alone: {chosen[0]} is set"
    preload = os.environ.get("LD_PRELOAD", "")
    other = next((a for a in _OTHER_ALLOCATORS if a in preload), None)
    if other:
        return f"left alone: {other} is preloaded"
    return None


def keep_freed_memory() -> str:
    """Set glibc's trim and mmap thresholds once per process (see the module's text); returns what was done, as
    :func:`status` does. Safe to call many times and from any thread."""
    global _status
    with _lock:
        if _status is not None:
            return _status
        reason = _reason_to_leave_alone()
        if reason is None:
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            except (OSError, AttributeError) as err:
                reason = f"left alone: mallopt unavailable ({err})"
            else:
                reason = None if done else "left alone: mallopt refused the thresholds"
        _status = reason or f"glibc malloc keeps freed memory (trim threshold {TRIM_THRESHOLD >> 20} MiB, mmap threshold {MMAP_THRESHOLD >> 20} MiB)"
        return _status


def status() -> str:
    """One line: whether :func:`keep_freed_memory` has tuned the allocator, or why not (``not yet`` before it ran)."""
    return _status or "not yet: no model quantized in this process"
