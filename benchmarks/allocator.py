"""The C allocator setting that a side-by-side benchmark's workers start with.

On this project's machine (a virtual machine whose kernel reports free memory to the host:
virtio-balloon free page reporting), memory a process has handed back to the kernel for about
two seconds is taken back by the host, and touching it again costs about 1 ms per MB (measured:
a 1024 x 768 @ 768 x 50257 product into a fresh output, 395 ms right after the previous one was
freed, 605 ms three seconds after, 0.37 s of it in the kernel). glibc's malloc gives big arrays
(over 32 MB) their own mapping and unmaps them when they are freed, and trims the top of its heap,
so an engine pays this for its big arrays whenever it has been idle for two seconds.

A harness that alternates engines makes every engine idle that long between its runs (the
other engine's step), which a real loop does not: there, a step's freed memory is taken again
by the next step at once. So "keep" (the default of forward.py and train_step.py) starts every
worker with glibc told to keep freed memory in the process (MALLOC_MMAP_MAX_=0: no separate
mappings; MALLOC_TRIM_THRESHOLD_ huge: no trimming), the same for every engine, and the
comparison is of the engines rather than of how often each returns memory to the host.
"release" leaves glibc's defaults, as earlier runs in RESULTS.md did.
"""
from __future__ import annotations

import os

MODES = ("keep", "release")
KEEP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def set_for_workers(mode: str) -> str:
    """Set (or clear) the variables in this process's environment, which spawned workers
    inherit (glibc reads them when a process starts). Returns a line for the report."""
    if mode not in MODES:
        raise ValueError(f"allocator mode must be one of {', '.join(MODES)}, got {mode!r}")
    for name, value in KEEP.items():
        if mode == "keep":
            os.environ[name] = value
        else:
            os.environ.pop(name, None)
    if mode == "keep":
        return "allocator: keep (every worker: " + ", ".join(f"{k}={v}" for k, v in KEEP.items()) + ")"
    return "allocator: release (glibc's defaults: big arrays unmapped when freed)"
