"""glibc malloc thresholds for a worker whose threads allocate large tensors every step.

glibc serves an allocation at or above its mmap threshold with a fresh ``mmap``
and unmaps it on free; it trims the top of a heap past its trim threshold. Both
hand memory back to the kernel, so the next tensor of that size page-faults in
again. The threshold is dynamic: freeing a mapped block raises it to that
block's size, so a tensor a little larger than the last one is mapped afresh
again. A continuous batching step allocates such KV-sized tensors
(``repeat_kv``, the paged cache's update) every step: a worker took 0.9 million
page faults per benchmark pass, and its engine thread spent 2 to 3 times as long
per token in them as the same engine alone in a quiet process
(``benchmarks.generation --profile``, then ``benchmarks.profile_summary``).

:func:`keep_large_allocations` fixes both thresholds, as
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` would, through
``mallopt``: blocks under 32 MiB come from the heap and freed memory stays there
for the next step. The cost is that the worker's resident memory stays near its
peak. A user who sets either variable keeps glibc's behaviour as set; on a C
library other than glibc nothing changes. No kept library does this (jemalloc or
tcmalloc would mean ``LD_PRELOAD`` in every image).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""``mallopt`` parameter numbers (glibc's ``malloc.h``)."""

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
"""glibc's largest mmap threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``): blocks under it come from the heap."""

TRIM_THRESHOLD_BYTES = 2**31 - 1
"""Free memory at a heap's top is kept up to this much (2 GiB), for the next step's tensors."""

USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
"""glibc's own environment variables: when the user sets one, the worker leaves malloc alone."""


def keep_large_allocations() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (see the module docstring); True if set."""
    if any(name in os.environ for name in USER_VARIABLES):
        logger.info("malloc: %s set in the environment; glibc's thresholds left as set",
                    ", ".join(name for name in USER_VARIABLES if name in os.environ))
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if done:
        logger.info("malloc: blocks under %d MiB come from the heap and freed memory stays there (mmap threshold "
                    "%d, trim threshold %d)", MMAP_THRESHOLD_BYTES // 2**20, MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES)
    else:
        logger.warning("malloc: glibc refused the thresholds; allocations behave as glibc's defaults")
    return done
