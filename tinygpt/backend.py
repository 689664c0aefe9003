"""Which array library holds tensor data: NumPy on the CPU, CuPy on a CUDA GPU.

This is the only module that knows which library is in use. Everything above it asks
for the array module of an array (`xp = backend_of(x)`) and writes one line of code
that runs on NumPy and on CuPy alike.

Three backends, named by device:
  "cpu"    NumPy.
  "cuda"   CuPy (install with `pip install -e ".[cuda12]"` or `".[cuda13]"`).
  "strict" NumPy wrapped so that it refuses what CuPy refuses (implicit conversion to a
           NumPy array, mixing with raw NumPy arrays). Tests use it to prove that code
           written on a laptop will also run on a GPU. See `tinygpt/strict.py`.

The backend also owns the library's random numbers (one seeded generator per backend,
all reseeded by `manual_seed`) and the default floating-point dtype.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import threading
from typing import Any, Callable

import numpy as np

DEVICES = ("cpu", "cuda", "strict")
_CUDA_INSTALL_HINT = 'pip install -e ".[cuda12]" (CUDA 12) or pip install -e ".[cuda13]" (CUDA 13)'


class Backend:
    """One array library: its module `xp`, its random generator, and the few helpers
    whose spelling differs between NumPy and CuPy.

    Random numbers for initialisation are drawn on the host by one seeded NumPy
    generator per backend, then moved to the device: the same seed gives the same
    weights on every device. Dropout masks are drawn where the data lives."""

    def __init__(self, device: str, xp: Any, seed: int):
        self.device = device
        self.xp = xp
        self.seed(seed)

    def seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def random_seed(self) -> int:
        """A fresh seed drawn from this backend's generator."""
        return int(self.rng.integers(0, 2**63 - 1))

    def randn(self, shape: tuple[int, ...], dtype):
        return self.xp.asarray(self.rng.standard_normal(shape, dtype=np.float64).astype(dtype))

    def rand(self, shape: tuple[int, ...], dtype):
        return self.xp.asarray(self.rng.random(shape, dtype=np.float64).astype(dtype))

    def uniform(self, shape: tuple[int, ...], seed: int):
        """Uniform [0, 1) float32 numbers that depend only on `seed` and `shape`.

        Dropout draws its mask from here with a seed it remembers, so that backward can
        rebuild the mask instead of keeping it in memory."""
        return self.xp.asarray(np.random.default_rng(seed).random(shape, dtype=np.float32))

    def index_add(self, target, index, values) -> None:
        """target[index] += values, adding repeated indices once per occurrence.

        (Plain `target[index] += values` keeps only one of the repeats.) `np.add.at` does
        this one element at a time; sorting the indices and summing each run of equal ones
        with `add.reduceat` does the same in a few vectorised passes."""
        xp = self.xp
        rows_of_target = (getattr(index, "ndim", 0) == 1 and index.dtype.kind in "iu" and values.ndim == target.ndim > 1
                          and values.shape[0] == index.shape[0] and values.shape[1:] == target.shape[1:])
        if not rows_of_target:  # the general case (any index, any shapes)
            xp.add.at(target, index, values)
            return
        index = xp.where(index < 0, index + target.shape[0], index)  # -1 and n - 1 are one row
        order = xp.argsort(index, kind="stable")
        ids = index[order]
        starts = xp.flatnonzero(xp.concatenate([xp.ones(1, dtype=bool), ids[1:] != ids[:-1]])) if ids.size else ids
        target[ids[starts]] += xp.add.reduceat(values[order], starts, axis=0)

    def to_host(self, array) -> np.ndarray:
        return array.copy()

    def from_host(self, array: np.ndarray):
        """A copy of host array `array` on this backend's device."""
        return self.xp.array(array)

    # Fused GPU kernels for the big ops (tinygpt/cuda_kernels.py), or None where the ops'
    # array code runs as written (NumPy, strict). See CupyBackend.kernels.
    kernels = None

    def matmul(self, a, b):
        """a @ b for 2-D arrays (NumPy splits it across threads; see NumpyBackend)."""
        return a @ b

    def full_precision(self):
        """A with-block where matrix products use the full precision of their dtype (no
        TF32 on GPUs, see cuda_kernels.allow_tf32); gradcheck runs inside one."""
        return contextlib.nullcontext()

    def run_blocks(self, fn: Callable[[slice], None], n: int, block: int) -> None:
        """fn(slice) for consecutive slices of range(n), `block` long (the last may be
        shorter). Each call must touch only its own rows of any output. Here (the strict
        backend) one after another, so tests run the block logic exactly as the CPU does."""
        for start in range(0, n, block):
            fn(slice(start, min(start + block, n)))


def rows_per_block(row_size: int, target: int = 1 << 18) -> int:
    """How many rows of `row_size` elements make a block of about `target` elements
    (256K float32 = 1 MB: a few such blocks stay in a core's L2 cache)."""
    return max(1, target // max(row_size, 1))


def num_threads() -> int:
    """Threads for NumPy's blocked kernels: $TINYGPT_NUM_THREADS, else the usable cores."""
    if os.environ.get("TINYGPT_NUM_THREADS"):
        return max(1, int(os.environ["TINYGPT_NUM_THREADS"]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class NumpyBackend(Backend):
    """NumPy runs each elementwise operation on one core, but releases the GIL while it
    runs, as OpenBLAS does in a matrix product. So a big kernel split into blocks (see
    run_blocks) runs on every core from plain Python threads, and each block, small enough
    to stay in cache, is read from memory once instead of once per operation.

    While blocks run, the BLAS library is held to one thread per call: its own threads
    would compete with ours for the same cores (and, spinning while they wait for work,
    slow everything else down). Matrix products are split across our threads instead
    (see matmul), which keeps every core busy with no such contention."""

    _pool: concurrent.futures.ThreadPoolExecutor | None = None
    _pool_threads = 0
    _worker = threading.local()
    _blas: list | None = None  # threadpoolctl controllers of the BLAS libraries NumPy loaded

    def run_blocks(self, fn: Callable[[slice], None], n: int, block: int) -> None:
        slices = [slice(start, min(start + block, n)) for start in range(0, n, block)]
        threads = num_threads()
        if threads == 1 or len(slices) == 1 or getattr(self._worker, "busy", False):
            for s in slices:  # one thread, one block, or already inside a block: run here
                fn(s)
            return
        if NumpyBackend._pool_threads != threads:
            NumpyBackend._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="tinygpt")
            NumpyBackend._pool_threads = threads
        with _blas_threads(1):
            list(NumpyBackend._pool.map(functools.partial(self._in_worker, fn), slices))  # list(): re-raise errors

    def matmul(self, a, b):
        """a @ b for 2-D a [M, K] and b [K, N], split into one piece per thread: rows of a
        when there are many, else columns of b (a single token's products)."""
        threads = num_threads()
        m, n = a.shape[0], b.shape[1]
        if threads == 1 or getattr(self._worker, "busy", False) or m * n < (1 << 16):
            return a @ b
        out = np.empty((m, n), dtype=np.result_type(a.dtype, b.dtype))
        if m >= 16 * threads:
            def piece(s):
                np.matmul(a[s], b, out=out[s])
            self.run_blocks(piece, m, -(-m // threads))
        else:
            def piece(s):
                out[:, s] = a @ b[:, s]
            self.run_blocks(piece, n, -(-n // threads))
        return out

    def _in_worker(self, fn, s: slice) -> None:
        self._worker.busy = True
        try:
            fn(s)
        finally:
            self._worker.busy = False


@contextlib.contextmanager
def _blas_threads(n: int):
    """Hold NumPy's BLAS library to n threads per call inside the with-block."""
    if NumpyBackend._blas is None:
        try:
            from threadpoolctl import ThreadpoolController

            NumpyBackend._blas = ThreadpoolController().select(user_api="blas").lib_controllers
        except Exception:  # no threadpoolctl, or a BLAS it cannot steer: leave BLAS as it is
            NumpyBackend._blas = []
    before = [lib.num_threads for lib in NumpyBackend._blas]
    for lib in NumpyBackend._blas:
        lib.set_num_threads(n)
    try:
        yield
    finally:
        for lib, count in zip(NumpyBackend._blas, before):
            lib.set_num_threads(count)


class CupyBackend(Backend):
    @functools.cached_property
    def kernels(self):
        """One CUDA kernel per op direction instead of a chain of elementwise launches."""
        from tinygpt import cuda_kernels

        return cuda_kernels

    def full_precision(self):
        return self.kernels.tf32_disabled()

    def run_blocks(self, fn, n, block):
        fn(slice(0, n))  # one launch over everything: the GPU parallelises inside each operation

    def uniform(self, shape, seed):
        return self.xp.random.RandomState(seed).random_sample(shape, dtype=self.xp.float32)

    def index_add(self, target, index, values) -> None:
        import cupyx

        cupyx.scatter_add(target, index, values)

    def to_host(self, array) -> np.ndarray:
        return array.get()


class StrictBackend(Backend):
    def to_host(self, array) -> np.ndarray:
        return array.get()


# ----------------------------------------------------------------------------- state

_backends: dict[str, Backend] = {}
_seed = 0
_default_device: str | None = None
_default_dtype = np.dtype(np.float32)


def _load_cupy():
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError(f"CUDA was requested but CuPy is not installed ({e}). Install it with: {_CUDA_INSTALL_HINT}") from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CuPy raises its own CUDARuntimeError when no driver is present
        raise RuntimeError(f"CUDA was requested and CuPy is installed, but no CUDA GPU is usable: {e}") from e
    if count == 0:
        raise RuntimeError("CUDA was requested and CuPy is installed, but no CUDA GPU is visible")
    return cupy


def get_backend(device: str) -> Backend:
    """The backend of a device name ("cpu", "cuda" or "strict"), created on first use."""
    if device not in _backends:
        if device == "cpu":
            _backends[device] = NumpyBackend("cpu", np, _seed)
        elif device == "cuda":
            _backends[device] = CupyBackend("cuda", _load_cupy(), _seed)
        elif device == "strict":
            from tinygpt import strict

            _backends[device] = StrictBackend("strict", strict.xp, _seed)
        else:
            raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")
    return _backends[device]


def cuda_available() -> tuple[bool, str]:
    """(True, "") when CuPy and a GPU are usable, else (False, the reason)."""
    try:
        get_backend("cuda")
        return True, ""
    except RuntimeError as e:
        return False, str(e)


def device_of(array) -> str:
    """The device name of a backend array."""
    if isinstance(array, np.ndarray):
        return "cpu"
    module = type(array).__module__
    if module.startswith("cupy"):
        return "cuda"
    if module == "tinygpt.strict":
        return "strict"
    raise TypeError(f"expected a numpy, cupy or strict array, got {type(array).__name__}")


def backend_of(array):
    """The array module (numpy, cupy, or the strict wrapper) that holds `array`."""
    return get_backend(device_of(array)).xp


def is_array(obj) -> bool:
    try:
        device_of(obj)
        return True
    except TypeError:
        return False


# ------------------------------------------------------------------ defaults and seeds

def default_device() -> str:
    if _default_device is None:
        set_default_device(os.environ.get("TINYGPT_DEVICE", "cpu"))
    return _default_device


def set_default_device(device: str) -> None:
    """Where new tensors live: "cpu" (NumPy), "cuda" (CuPy) or "strict" (tests)."""
    global _default_device
    get_backend(device)  # fails here, with the reason, if the device is unusable
    _default_device = device


@contextlib.contextmanager
def device_scope(device: str | None):
    """Make `device` the default inside a with-block (None: leave it as it is)."""
    previous = default_device()
    set_default_device(device or previous)
    try:
        yield
    finally:
        set_default_device(previous)


def default_dtype() -> np.dtype:
    return _default_dtype


def set_default_dtype(dtype) -> None:
    """The dtype of new floating-point tensors: float32 (default) or float64."""
    global _default_dtype
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"default dtype must be float32 or float64, got {dtype}")
    _default_dtype = dtype


def manual_seed(seed: int) -> None:
    """Seed every random generator the library uses, on every backend."""
    global _seed
    _seed = int(seed)
    for backend in _backends.values():
        backend.seed(_seed)


def get_rng_state() -> dict:
    """The state of every backend's generator (for checkpoints, and to restore after gradcheck)."""
    return {"seed": _seed, "backends": {name: b.rng.bit_generator.state for name, b in _backends.items()}}


def set_rng_state(state: dict) -> None:
    manual_seed(state["seed"])
    for name, bit_state in state["backends"].items():
        get_backend(name).rng.bit_generator.state = bit_state


# ------------------------------------------------------------------ moving data

def to_host(array) -> np.ndarray:
    """A NumPy copy (or view, on the CPU) of any backend array."""
    return get_backend(device_of(array)).to_host(array)


def to_device(array, device: str):
    """`array` (any backend, or anything NumPy accepts) as an array on `device`."""
    if is_array(array):
        if device_of(array) == device:
            return array
        array = to_host(array)
    return get_backend(device).from_host(np.asarray(array))


def index_add(target, index, values) -> None:
    """target[index] += values with repeated indices all counted (scatter-add)."""
    get_backend(device_of(target)).index_add(target, index, values)


def as_dtype(dtype) -> np.dtype:
    """Normalise "float32", np.float32, ... to a numpy dtype object (CuPy uses the same)."""
    return np.dtype(dtype)


def make_array(data, dtype=None, device: str | None = None):
    """A new array on `device` holding a copy of array-like `data`. Floating-point data
    takes the default dtype unless `dtype` says otherwise; integers and booleans keep theirs."""
    if device is None:  # device arrays stay where they are; host data goes to the default device
        device = device_of(data) if is_array(data) and not isinstance(data, np.ndarray) else default_device()
    if is_array(data):
        if dtype is None:
            dtype = _default_dtype if data.dtype.kind == "f" else data.dtype
        if device_of(data) == device:
            return data.astype(dtype)  # astype copies
        data = to_host(data)
    else:
        data = np.asarray(data)
        if dtype is None:
            dtype = _default_dtype if data.dtype.kind == "f" else data.dtype
    return get_backend(device).from_host(data.astype(dtype, copy=False))
