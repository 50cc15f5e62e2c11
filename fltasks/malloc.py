"""glibc heap settings for processes that move multi-megabyte models: the daemon and the simulator.

Shared by both (as the tasks are), so the simulator need not import the node package.

glibc serves allocations above 128 KiB with fresh ``mmap`` pages and returns
them on free, so every update buffer costs one page fault per 4 KiB page
(about 2,000 for an 8 MB update, ~7 ms here). Raising the mmap and trim
thresholds keeps such buffers in the heap, where they are reused warm.

Only up to 32 MB: a ResNet-18 update (44.7 MB, 89 MB as float64) kept in the
heap after it is freed keeps hundreds of MB resident for a time saving of a
few tens of milliseconds of page faults in a round of tens of seconds (peak
RSS per daemon: scripts/bench_resnet.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_HEAP_THRESHOLD_BYTES = 32 * 1024 * 1024


def _mallopt(settings: dict[int, int]) -> bool:
    """Apply glibc ``mallopt`` settings; False (and no change) where that is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all([bool(mallopt(option, value)) for option, value in settings.items()])


def keep_large_buffers_in_heap() -> bool:
    """Ask glibc to reuse large buffers; False (and no change) where that is not glibc."""
    return _mallopt(
        {_M_MMAP_THRESHOLD: _HEAP_THRESHOLD_BYTES, _M_TRIM_THRESHOLD: 2 * _HEAP_THRESHOLD_BYTES}
    )


def return_large_buffers(threshold_bytes: int = 1024 * 1024) -> bool:
    """Serve every allocation from ``threshold_bytes`` up with its own pages, freed at once.

    The opposite trade of :func:`keep_large_buffers_in_heap`, for the
    simulator's memory-bounded runs: glibc's default threshold rises with the
    buffers freed (up to 32 MB), after which chunk-sized activations land in
    the heap and fragment it. Measured with a 1M-parameter model, node chunks
    of 2: peak RSS grew by 13 MB per node instead of the 4 MB its model takes.
    Setting the threshold fixes it (glibc stops adjusting it).
    """
    return _mallopt({_M_MMAP_THRESHOLD: threshold_bytes})
