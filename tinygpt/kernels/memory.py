"""Keeping freed memory in the process, for the next step's arrays.

glibc's malloc gives every big array (over 32 MB: a GPT-2 step's logits and their gradient,
the embedding's gradient, 206 and 154 MB) a mapping of its own and unmaps it when the array
is freed, and hands the free top of its heap back to the kernel. On a virtual machine that
reports free memory to its host (virtio-balloon free page reporting, as on this project's
machine), memory handed back for about two seconds is taken by the host, and the next array
that lands there pays about 1 ms per MB to touch it again: the LM head's product into fresh
logits, 395 ms right after the previous logits were freed, 605 ms three seconds later. A
training step of a few seconds frees its arrays at the end and allocates them again in the
next step, so it pays this on every step for every big array.

keep_freed_memory() asks glibc to keep what the process frees (no separate mappings, no
trimming of the heap): the next arrays of the same sizes reuse the same memory, as a GPU
allocator's cache does. The price is that the process holds on to its peak memory until it
exits. It is called when the CPU kernels load, unless the environment already sets glibc's
own variables for this (MALLOC_MMAP_MAX_ or MALLOC_TRIM_THRESHOLD_: e.g.
MALLOC_TRIM_THRESHOLD_=131072, glibc's default threshold, keeps it handing memory back).
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory in the process. True when it did; False off
    glibc (other systems, musl), or when the environment already sets the variables."""
    if not sys.platform.startswith("linux") or any(v in os.environ for v in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # mallopt exists in musl too, but does nothing
            return False
        # mallopt(3): M_MMAP_MAX 0 serves big requests from the heap, M_TRIM_THRESHOLD -1 never trims it
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
    except (OSError, AttributeError):
        return False
