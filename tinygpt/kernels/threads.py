"""Running NumPy code on every core: row blocks on a thread pool, BLAS held to one thread.

NumPy runs each elementwise operation on one core, but releases the GIL while it runs, as
OpenBLAS does in a matrix product. So a big kernel split into blocks runs on every core from
plain Python threads, and each block, small enough to stay in cache, is read from memory once
instead of once per operation.

While blocks run, the BLAS library is held to one thread per call: its own threads would
compete with ours for the same cores (and, spinning while they wait for work, slow everything
else down). Matrix products are split across our threads instead (see matmul), which keeps
every core busy with no such contention.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import threading
from typing import Callable

import numpy as np

from tinygpt import env

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_threads = 0
_worker = threading.local()
_blas: list | None = None  # threadpoolctl controllers of the BLAS libraries NumPy loaded
_blas_lock = threading.Lock()
_blas_users = 0  # threads inside blas_threads now
_blas_before: list = []  # the thread counts to put back when the last one leaves


def num_threads() -> int:
    """Threads for the blocked kernels: $TINYGPT_NUM_THREADS, else the usable cores."""
    threads = env.num_threads()
    if threads is not None:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def rows_per_block(row_size: int, target: int = 1 << 18) -> int:
    """How many rows of `row_size` elements make a block of about `target` elements
    (256K float32 = 1 MB: a few such blocks stay in a core's L2 cache)."""
    return max(1, target // max(row_size, 1))


def run_blocks(fn: Callable[[slice], None], n: int, block: int) -> None:
    """fn(s) for consecutive slices s of range(n), `block` long (the last may be shorter), on
    the thread pool. Each call must write only its own rows of any output. Inside a block
    (a kernel calling a kernel) the slices run in place, one after another."""
    global _pool, _pool_threads
    slices = [slice(start, min(start + block, n)) for start in range(0, n, block)]
    threads = num_threads()
    if threads == 1 or len(slices) == 1 or getattr(_worker, "busy", False):
        for s in slices:
            fn(s)
        return
    if _pool_threads != threads:
        _pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="tinygpt")
        _pool_threads = threads
    with blas_threads(1):
        list(_pool.map(functools.partial(_in_worker, fn), slices))  # list(): re-raise errors


def run_rows(fn: Callable[[slice], None], x2) -> None:
    """fn(s) over row blocks of the 2-D array x2, blocks of about 1 MB."""
    run_blocks(fn, x2.shape[0], rows_per_block(x2.shape[1]))


def _in_worker(fn, s: slice) -> None:
    _worker.busy = True
    try:
        fn(s)
    finally:
        _worker.busy = False


FEW_ROWS = 256  # products with fewer rows run as one BLAS call (see matmul)


def matmul(a, b):
    """a @ b for 2-D a [M, K] and b [K, N], split into one piece per thread: rows of a when
    there are many, else columns of b. A product of fewer than FEW_ROWS rows (a decoding
    step's one row, a short prompt's forward) is one BLAS call on BLAS's own threads: measured
    at batch 1 that beat a split over our pool, for decoding (benchmarks/decode.py: 42 against
    27 tokens/s) and for the no_grad forward at T = 128 (230 against 460 ms: after BLAS's own
    threads run, they spin for a while and take the cores from the pool's pieces). Under heavy
    load from other processes BLAS's spinning threads lose instead (11 against 2 tokens/s),
    but that is not the machine this is tuned for."""
    threads = num_threads()
    m, n = a.shape[0], b.shape[1]
    if threads == 1 or getattr(_worker, "busy", False) or m * n < (1 << 16) or m < FEW_ROWS:
        return a @ b
    out = np.empty((m, n), dtype=np.result_type(a.dtype, b.dtype))
    if m >= 16 * threads:
        def piece(s):
            np.matmul(a[s], b, out=out[s])
        run_blocks(piece, m, -(-m // threads))
    else:
        def piece(s):
            out[:, s] = a @ b[:, s]
        run_blocks(piece, n, -(-n // threads))
    return out


@contextlib.contextmanager
def blas_threads(n: int):
    """Hold NumPy's BLAS library to n threads per call inside the with-block.

    The setting is the process's, not the thread's: when two threads run blocks at once (a
    training loop beside inference), the first to enter sets it and the last to leave puts
    back what was there before. (Each restoring its own 'before' would let one thread undo
    the other's setting in the middle of its blocks, and could leave BLAS on one thread.)"""
    global _blas, _blas_users, _blas_before
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController

            _blas = ThreadpoolController().select(user_api="blas").lib_controllers
        except Exception:  # a BLAS threadpoolctl cannot steer: leave it as it is
            _blas = []
    with _blas_lock:
        if _blas_users == 0:
            _blas_before = [lib.num_threads for lib in _blas]
            for lib in _blas:
                lib.set_num_threads(n)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                for lib, count in zip(_blas, _blas_before):
                    lib.set_num_threads(count)
