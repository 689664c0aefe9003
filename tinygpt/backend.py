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
all reseeded by `manual_seed`), the default floating-point dtype, and moves between host
and device. Fast versions of the big ops live apart, in tinygpt/kernels/.
"""
from __future__ import annotations

import contextlib
import numbers
import os
from typing import Any

import numpy as np

from tinygpt.errors import RunError

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

    def uniform(self, shape: tuple[int, ...], seed: int, start: int | None = None):
        """Uniform [0, 1) float32 numbers that depend only on `seed` and `shape`: element i
        (in C order) is number i of the stream of default_rng(seed).

        Dropout draws its mask from here with a seed it remembers, so that backward can
        rebuild the mask instead of keeping it in memory. With `start`, the numbers are
        those from position `start` of the stream on, so a blocked kernel can draw its own
        part of a mask and get exactly the numbers of the whole: the generator (PCG64)
        jumps ahead in O(log n), and makes each 64-bit output into two float32 numbers.
        Without it, a data-parallel rank starts where its rows start in the whole batch's
        stream (see batch_shard), so N ranks draw exactly the masks of one process."""
        start = mask_start(shape) if start is None else start
        generator = np.random.PCG64(seed)
        generator.advance(start // 2)
        size = int(np.prod(shape))
        numbers = np.random.Generator(generator).random(size + start % 2, dtype=np.float32)[start % 2:]
        return self.xp.asarray(numbers.reshape(shape))

    def index_add(self, target, index, values) -> None:
        """target[index] += values, adding repeated indices once per occurrence (plain
        `target[index] += values` keeps only one of the repeats)."""
        self.xp.add.at(target, index, values)

    def to_host(self, array) -> np.ndarray:
        return array.copy()

    def from_host(self, array: np.ndarray):
        """A copy of host array `array` on this backend's device."""
        return self.xp.array(array)

    def full_precision(self):
        """A with-block where matrix products use the full precision of their dtype (no
        TF32 on GPUs, see CupyBackend.allow_tf32); gradcheck runs inside one."""
        return contextlib.nullcontext()


class CupyBackend(Backend):
    def uniform(self, shape, seed, start: int | None = None):
        """CuPy's own generator (the GPU's masks differ from the CPU's). It cannot jump ahead,
        so a `start` past 0 (a data-parallel rank's part of a batch) draws the numbers before
        it too and drops them."""
        start = mask_start(shape) if start is None else start
        size = int(np.prod(shape))
        numbers = self.xp.random.RandomState(seed).random_sample(start + size, dtype=self.xp.float32)
        return numbers[start:].reshape(shape)

    def index_add(self, target, index, values) -> None:
        import cupyx

        cupyx.scatter_add(target, index, values)

    def to_host(self, array) -> np.ndarray:
        return array.get()

    # TF32. CuPy has no public switch for the compute type of matrix products besides the
    # CUPY_TF32 environment variable, read once at import, so these two use the setting
    # CuPy keeps in cupy._core._routines_linalg.
    @staticmethod
    def allow_tf32(flag: bool) -> None:
        """Let float32 matrix products run on the tensor cores of Ampere and newer GPUs in
        TF32: inputs rounded to 10 mantissa bits (float32 has 23), several times faster, with
        relative errors near 1e-3 instead of 1e-7. Opt-in: off unless this is called with
        True, or CuPy was started with CUPY_TF32=1. float64 products are never affected."""
        from cupy._core import _routines_linalg as linalg

        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if flag else linalg.COMPUTE_TYPE_DEFAULT)

    @contextlib.contextmanager
    def full_precision(self):
        from cupy._core import _routines_linalg as linalg

        previous = linalg.get_compute_type(np.float32)
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_DEFAULT)
        try:
            yield
        finally:
            linalg.set_compute_type(np.float32, previous)


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
        raise RunError(f"CUDA was requested but CuPy is not installed ({e}). Install it with: {_CUDA_INSTALL_HINT}") from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CuPy raises its own CUDARuntimeError when no driver is present
        raise RunError(f"CUDA was requested and CuPy is installed, but no CUDA GPU is usable: {e}") from e
    if count == 0:
        raise RunError("CUDA was requested and CuPy is installed, but no CUDA GPU is visible")
    return cupy


def get_backend(device: str) -> Backend:
    """The backend of a device name ("cpu", "cuda" or "strict"), created on first use."""
    if device not in _backends:
        if device == "cpu":
            _backends[device] = Backend("cpu", np, _seed)
        elif device == "cuda":
            _backends[device] = CupyBackend("cuda", _load_cupy(), _seed)
        elif device == "strict":
            from tinygpt import strict

            _backends[device] = StrictBackend("strict", strict.xp, _seed)
        else:
            raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
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
    """The device of new tensors: set_default_device, else $TINYGPT_DEVICE, else "cpu"."""
    if _default_device is None:
        device = os.environ.get("TINYGPT_DEVICE", "").strip() or "cpu"
        if device not in DEVICES:
            raise ValueError(f"TINYGPT_DEVICE must be one of {', '.join(DEVICES)}, got {device!r}")
        set_default_device(device)
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
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:  # NumPy takes no negative seeds
        raise ValueError(f"manual_seed: the seed must be an integer >= 0, got {seed!r}")
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


# ------------------------------------------------------------------ data parallel masks

_shard_first_row = 0


@contextlib.contextmanager
def batch_shard(first_row: int):
    """Inside the with-block this process holds the rows first_row, first_row + 1, ... of a
    bigger batch whose other rows other processes hold (data parallel). Dropout then draws,
    for an array whose first axis is the batch, the part of the whole batch's mask that
    these rows would get in one process: N processes draw exactly the masks of one."""
    global _shard_first_row
    previous, _shard_first_row = _shard_first_row, int(first_row)
    try:
        yield
    finally:
        _shard_first_row = previous


def mask_start(shape: tuple[int, ...]) -> int:
    """Where a batch-first array of `shape` starts in the random stream of its whole batch."""
    return _shard_first_row * int(np.prod(shape[1:])) if len(shape) else 0


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
    try:
        return np.dtype(dtype)
    except TypeError:  # NumPy's "data type 'gpu' not understood": x.to("gpu") comes here
        raise TypeError(f"{dtype!r} is not a dtype (nor a device: {', '.join(DEVICES)})") from None


def make_array(data, dtype=None, device: str | None = None):
    """A new array on `device` holding a copy of array-like `data`. Floating-point data
    takes the default dtype unless `dtype` says otherwise; integers and booleans keep theirs."""
    data = _plain(data)
    if device is None:  # device arrays stay where they are; host data goes to the default device
        device = device_of(data) if is_array(data) and not isinstance(data, np.ndarray) else default_device()
    if not is_array(data):
        try:
            data = np.asarray(data)
        except ValueError:  # NumPy's "inhomogeneous shape" message
            raise ValueError("tensor data is ragged: nested lists of different lengths make no array") from None
    if data.dtype.kind not in "biuf":
        raise TypeError(f"tensor data must be numbers or booleans, got dtype {data.dtype} ({_kind_name(data.dtype)})")
    if dtype is None:
        dtype = _default_dtype if data.dtype.kind == "f" else data.dtype
    elif as_dtype(dtype).kind not in "biuf":
        raise TypeError(f"dtype must be a number or boolean type, got {as_dtype(dtype)} ({_kind_name(as_dtype(dtype))})")
    if device_of(data) == device:
        return data.astype(dtype)  # astype copies
    return get_backend(device).from_host(to_host(data).astype(dtype, copy=False))


def _plain(data):
    """data, unless it is an ndarray subclass whose arithmetic means something else: an
    np.matrix (its * is a matrix product) or a masked array (its masked values would count).
    Other subclasses (np.memmap) are read as plain arrays."""
    if isinstance(data, np.matrix):
        raise TypeError("tensor data is an np.matrix, whose * means a matrix product; pass np.asarray(data)")
    if isinstance(data, np.ma.MaskedArray):
        raise TypeError("tensor data is a masked array; fill its masked values first (data.filled(0))")
    return np.asarray(data) if isinstance(data, np.ndarray) else data


def _kind_name(dtype) -> str:
    return {"c": "complex: tensors hold real numbers", "U": "text", "S": "bytes", "O": "objects", "M": "dates", "m": "time spans"}.get(dtype.kind, dtype.kind)


def _dtype_kind(value) -> str | None:
    """The dtype kind NumPy gives `value` ("f", "c", ...), None for what makes no array."""
    if is_array(value):
        return value.dtype.kind
    try:
        return np.asarray(value).dtype.kind
    except (TypeError, ValueError):
        return None


def hook_replacement(value, like, hook, what: str = "gradient"):
    """What a hook returned in place of the array `like` (a gradient), checked and made an array
    of like's dtype on like's device. A Tensor comes unwrapped (its .data). Refused with one
    line naming the hook: a value of another shape, an array on another device (moving it
    silently would hide where it came from), complex numbers, an np.matrix, anything not numbers.
    Real numbers of another dtype are cast, as the engine casts everything to the tensor's dtype."""
    name = hook if isinstance(hook, str) else getattr(hook, "__qualname__", None) or repr(hook)
    shown, wanted = f"hook {name} returned", f"return None, an array or a Tensor of shape {tuple(like.shape)}"
    if isinstance(value, np.matrix):
        raise TypeError(f"{shown} an np.matrix as the {what}; {wanted} (np.asarray turns a matrix into an array)")
    if is_array(value) and device_of(value) != device_of(like):
        raise RuntimeError(f"{shown} a {what} on device {device_of(value)!r} for a tensor on {device_of(like)!r}; "
                           f"return it on the tensor's device")
    if _dtype_kind(value) == "c":
        raise TypeError(f"{shown} complex numbers as the {what}; a {what} must be real")
    try:
        array = make_array(value, dtype=like.dtype, device=device_of(like))
    except (TypeError, ValueError):
        raise TypeError(f"{shown} {type(value).__name__} {value!r:.40} as the {what}; {wanted}") from None
    if array.shape != like.shape:
        raise RuntimeError(f"{shown} a {what} of shape {tuple(array.shape)} for a tensor of shape {tuple(like.shape)}")
    return array
