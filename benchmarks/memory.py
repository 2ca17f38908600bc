"""Peak-memory meters: process RSS on CPU, the caching allocator's counters on CUDA.

CPU: the peak resident set size is the kernel's high-water mark ``VmHWM``, which
``/proc/self/clear_refs`` (write ``5``, Linux >= 4.0) resets, so one process can measure
several calls in turn. Where that reset is refused the meter falls back to
``getrusage(RUSAGE_SELF).ru_maxrss`` — a process-lifetime maximum, valid only for the first
measured call of a fresh process (``Meter.resettable`` says which one is in use). Freed heap
memory is handed back with ``malloc_trim(0)`` before every baseline so the baseline counts
live memory only.

CUDA: ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated`` minus the bytes
allocated at the baseline (tensors only; the allocator's cache and the CUDA context are
not counted).
"""
from __future__ import annotations

import ctypes
import gc
import resource
from typing import Optional

import torch

__all__ = ["Meter", "rss_bytes", "vm_size_bytes", "exact_heap", "fast_heap"]


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes."""
    kib = _status_kib("VmRSS")
    if kib is None:  # pragma: no cover - non-Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def vm_size_bytes() -> int:
    """Current virtual address space of this process (what RLIMIT_AS limits), in bytes."""
    kib = _status_kib("VmSize")
    return 0 if kib is None else kib * 1024


_LIBC = None
_M_MMAP_THRESHOLD = -3
EXACT_MMAP_THRESHOLD = 1 << 16
FAST_MMAP_THRESHOLD = 32 << 20


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:  # pragma: no cover - not glibc
            _LIBC = False
    return _LIBC


def _malloc_trim() -> None:
    libc = _libc()
    if libc and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def exact_heap() -> bool:
    """Serve every allocation of 64 KiB or more from its own mapping (glibc ``mallopt``), so
    that freed tensors leave the resident set at once and the RSS high-water mark follows
    live tensors instead of the heap's fragmentation. Slows allocation down: call it for
    the metered runs only, then :func:`fast_heap` before timing. Returns whether it took
    effect."""
    return _set_mmap_threshold(EXACT_MMAP_THRESHOLD)


def fast_heap() -> bool:
    """Back to glibc's steady state for timing: allocations of 32 MiB or more mapped, the
    rest from the heap (what the default dynamic threshold settles at)."""
    ok = _set_mmap_threshold(FAST_MMAP_THRESHOLD)
    _malloc_trim()
    return ok


def _set_mmap_threshold(value: int) -> bool:
    libc = _libc()
    return bool(libc and hasattr(libc, "mallopt") and libc.mallopt(_M_MMAP_THRESHOLD, value) == 1)


class Meter:
    """``baseline()`` then ``reset()``, run, then ``peak()`` = bytes above the baseline."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resettable = True
        if not self.cuda:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.method = "VmHWM after clear_refs reset (RSS high-water mark)"
            except OSError:
                self.resettable = False
                self.method = "ru_maxrss (process lifetime maximum)"
        else:
            self.method = "torch.cuda.max_memory_allocated"
        self._base = 0

    def settle(self) -> None:
        """Free what can be freed so the next reading counts live memory only."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        else:
            _malloc_trim()

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return rss_bytes()

    def _high_water(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        if self.resettable:
            kib = _status_kib("VmHWM")
            if kib is not None:
                return kib * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def baseline(self) -> int:
        """Settle, remember the current usage as the baseline and reset the peak."""
        self.settle()
        self._base = self.current()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return self._base

    def peak(self) -> int:
        """Peak usage since :meth:`baseline`, minus the baseline (bytes, >= 0)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return max(0, self._high_water() - self._base)
