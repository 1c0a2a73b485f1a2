"""glibc's allocator at large batches: page faults that make a forward slower and its timing vary.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its *mmap threshold*
with a fresh ``mmap`` and returns it to the OS when freed; the threshold rises with the blocks
freed, but never above 32 MB, and the top of the heap is given back whenever more than twice
the threshold is free there. A forward at batch 32 allocates activations of tens to hundreds of
MB, so every call maps them anew and the kernel zeroes every page on first touch. Measured on a
2-core Zen 4 EPYC (dense FP32, eager, 2 threads, batch 32 of 224 px images; each allocator in a
process of its own, ``benchmarks/malloc_effect.py``):

* resnet50: 960,908 minor page faults per forward (3.7 GB zeroed), 3,050 ms; with
  :func:`steady_malloc`, no page faults and 1,931 ms (1.58x);
* mobilenetv3_large_100: 489 ms against 289 ms; efficientnet_b0: 1,178 ms against 474 ms;
* all-MiniLM-L6-v2 at 32 x 128 tokens: no gain (582 ms against 689 ms); its activations stay
  under the threshold once it has risen.

Two consequences. Speed-ups at batch 32 against the default allocator partly measure the dense
model's page faults (a pruned or INT8 model allocates less and pays fewer): uniform 50%
channels on mobilenetv3 measured 2.35-2.47x against the default allocator and 2.05-2.12x
against a steady one. And how many blocks a call maps anew depends on what the process freed
before (MiniLM took 47,316 faults per forward in one process and none in another), one source
of the spread of batch-32 timings, not all of it.

:func:`steady_malloc` does what ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the
environment (or jemalloc / tcmalloc preloaded, as PyTorch's CPU tuning guide advises) do: large
blocks come from the heap and freed memory stays with the process for the next forward. The
price is that the process keeps its peak memory instead of returning it between calls. It is
process-wide and cannot be undone, so slimkit never calls it on its own: the user (a serving
process, a benchmark) calls it first. :func:`faults_per_call` is how ``prune.target`` notices
timings that include page faults (see :mod:`slimkit.prune.target`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GB come from the heap
TRIM_THRESHOLD = 2 << 30  # the heap's free top is returned to the OS only above 2 GB
_steady = False


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None  # musl has no mallopt
    except OSError:
        return None


def steady_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Keep large blocks in the heap from now on (glibc ``mallopt``), so a forward at a large
    batch stops page-faulting its activations in. Returns whether it was applied (False where
    the C library is not glibc: macOS, Windows, musl; there it does nothing)."""
    global _steady
    libc = _libc()
    if libc is None:
        return False
    done = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    done = libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and done
    _steady = _steady or done
    return done


def is_steady() -> bool:
    """Whether :func:`steady_malloc` was applied in this process."""
    return _steady


def page_bytes() -> int:
    """The size of a memory page (4 KB on x86-64 Linux; 16 or 64 KB on some ARM kernels)."""
    try:
        import resource
    except ImportError:  # Windows
        return 4096
    return resource.getpagesize()


def minor_faults() -> int | None:
    """Minor page faults of this process so far (None where ``resource`` does not exist)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def faults_per_call(fn: Callable[[], object], calls: int = 3, warmup: int = 2) -> float | None:
    """Minor page faults of ``fn``'s steadiest call: the fewest of ``calls`` calls after ``warmup``
    (None where not counted). The first calls of a process grow its heap, which faults in once,
    now and then a call or two later, even with :func:`steady_malloc`; with the default allocator
    every call faults. Other threads of the process count too: call it while the process does
    nothing else."""
    for _ in range(warmup):
        fn()
    counts = []
    for _ in range(calls):
        start = minor_faults()
        if start is None:
            return None
        fn()
        counts.append(minor_faults() - start)
    return float(min(counts))
