"""A CPU training process's share of the machine: its threads, and memory that malloc keeps for reuse.

Measured on a 2-core Xeon (AMX), BERT 6x384, batch 16 x 128 tokens, bf16 autocast:
Glibc's malloc serves large blocks with fresh pages from the kernel and hands them back
when they are freed, so each step page-faulted its activations and gradients in again:
27,000 faults and 50 ms of kernel time per step. Zeroing a new 47 MB embedding gradient
took 12 ms, against 1.2 ms for memory already mapped. Keeping freed memory for reuse
(what jemalloc or tcmalloc preloaded with LD_PRELOAD do, the usual advice for PyTorch
on CPU) cut that to 4,500-6,500 faults and 8-12 ms.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from utils.backend import Backend

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next training step instead of unmapping it.

    Large blocks come from the heap rather than from their own mmap, and the heap is given
    back to the kernel only when over 1 GiB of it is free at the top. Peak memory is the
    same (a step allocates what the previous one freed); memory freed after the peak stays
    with the process. False where the C library is not glibc (macOS, musl): nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        # The symbols already loaded into this process, libc's among them: no library search
        # (find_library would run ldconfig in a subprocess at every start).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1
               for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 256 << 20)))


def fit_cpu_threads(training_args) -> str | None:
    """Give each CPU process its share of the machine's CPUs; returns a line to log when that changed anything.

    accelerate sets threads per process from the physical cores psutil reports, which in a
    container or a VM limited to fewer CPUs counts the host's: 2 processes on 2 usable CPUs
    got 2 threads each, oversubscribed. Here the share is the CPUs this process may run on
    (its affinity) divided by the processes on this machine. A smaller number chosen by the
    user (OMP_NUM_THREADS) is kept.
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local <= 1 or not Backend.of(training_args).cpu:
        return None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, usable // local)
    current = torch.get_num_threads()
    if current <= share:
        return None
    torch.set_num_threads(share)
    return (f"{share} thread{'s' if share > 1 else ''} per process ({usable} usable CPUs / {local} processes on "
            f"this machine; the launcher gave {current}, which oversubscribes the CPUs)")
