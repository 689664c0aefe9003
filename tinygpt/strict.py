"""A NumPy that behaves like CuPy where code usually breaks. For tests only.

Code developed on NumPy often fails on a GPU for two reasons: it converts device data
to NumPy without saying so (`np.asarray(x)`, `float(np.sum(x))` through NumPy, a NumPy
function that silently calls `__array__`), or it mixes a device array with a host NumPy
array (`x * np.ones(3)`). CuPy refuses both; NumPy happily does both.

`StrictArray` wraps a NumPy array and refuses both too:
  - `np.asarray(strict_array)` raises TypeError (like CuPy: use `.get()`);
  - any operation that mixes a StrictArray with a raw `numpy.ndarray` raises TypeError;
  - reductions return 0-d arrays, not NumPy scalars (as CuPy does).
Python scalars and NumPy scalars mix freely, as they do with CuPy.

`xp` is the matching module: `xp.zeros`, `xp.exp`, `xp.add.at`, ... are NumPy's, with
StrictArrays in and out. `xp.asarray(numpy_array)` is the one explicit host-to-device door.
"""
from __future__ import annotations

import numbers
import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

_MIXING = "strict backend: cannot mix a raw numpy.ndarray with a device array (CuPy refuses this too); move it with tinygpt.backend.to_device first"


def _unwrap(obj):
    """StrictArray -> its numpy array; raw numpy arrays are refused; containers recurse."""
    if isinstance(obj, StrictArray):
        return obj._a
    if isinstance(obj, np.ndarray):
        raise TypeError(_MIXING)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


def _wrap(obj):
    if isinstance(obj, np.ndarray):
        return StrictArray(obj)
    if isinstance(obj, np.generic) and not isinstance(obj, (np.str_, np.bytes_)):
        return StrictArray(np.asarray(obj))
    if isinstance(obj, tuple):
        return tuple(_wrap(o) for o in obj)
    if isinstance(obj, list):
        return [_wrap(o) for o in obj]
    return obj


class StrictArray(NDArrayOperatorsMixin):
    """A NumPy array that refuses implicit conversion and mixing, as a CuPy array does."""

    __slots__ = ("_a",)

    def __init__(self, array: np.ndarray):
        self._a = array

    # --- refusals -------------------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError("strict backend: implicit conversion to a NumPy array is not allowed (CuPy refuses it too); use .get()")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        result = getattr(ufunc, method)(*_unwrap(inputs), **_unwrap(kwargs))
        if "out" in kwargs and method != "at":
            out = kwargs["out"]
            return out[0] if isinstance(out, tuple) and len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    # --- the explicit door to the host -------------------------------------------------
    def get(self) -> np.ndarray:
        return self._a.copy()

    # --- array protocol -------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    flags = property(lambda self: self._a.flags)
    base = property(lambda self: None if self._a.base is None else StrictArray(self._a.base))
    T = property(lambda self: StrictArray(self._a.T))

    def __getitem__(self, index):
        return _wrap(self._a[_unwrap(index)])

    def __setitem__(self, index, value):
        self._a[_unwrap(index)] = _unwrap(value)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(row) for row in self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def __repr__(self):
        return "strict_" + repr(self._a)

    def __getattr__(self, name):
        if name.startswith("__"):  # no __array_interface__ and friends: they would leak the data to NumPy
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if callable(attr):
            return lambda *args, **kwargs: _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
        return _wrap(attr)


class _StrictUfunc:
    def __init__(self, ufunc: np.ufunc):
        self._ufunc = ufunc

    def __call__(self, *args, **kwargs):
        _check_no_raw(args)
        return self._ufunc(*_as_strict_inputs(args), **kwargs)

    def __getattr__(self, name):  # .at, .reduce, ... dispatch through __array_ufunc__
        method = getattr(self._ufunc, name)
        return lambda *args, **kwargs: _wrap(method(*_unwrap(args), **_unwrap(kwargs)))


def _check_no_raw(args):
    for a in args:
        if isinstance(a, np.ndarray):
            raise TypeError(_MIXING)


def _as_strict_inputs(args):
    # a ufunc of only Python scalars would return a NumPy scalar; CuPy returns a 0-d array
    if not any(isinstance(a, StrictArray) for a in args):
        return tuple(StrictArray(np.asarray(a)) if isinstance(a, (numbers.Number, np.generic)) else a for a in args)
    return args


class _StrictNamespace:
    """numpy's functions with StrictArrays in and out."""

    def __init__(self, module: types.ModuleType):
        self._module = module

    ndarray = StrictArray

    def asarray(self, obj, dtype=None):
        """The explicit host-to-device move: accepts NumPy arrays, like cupy.asarray."""
        if isinstance(obj, StrictArray):
            return obj if dtype is None else StrictArray(obj._a.astype(dtype, copy=False))
        return StrictArray(np.asarray(obj, dtype=dtype))

    def array(self, obj, dtype=None, copy=True):
        if isinstance(obj, StrictArray):
            obj = obj._a
        return StrictArray(np.array(obj, dtype=dtype, copy=copy))

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if isinstance(attr, np.ufunc):
            return _StrictUfunc(attr)
        if isinstance(attr, types.ModuleType):
            return _StrictNamespace(attr)
        if isinstance(attr, type) or not callable(attr):
            return attr  # dtypes, constants such as pi, inf, newaxis
        return lambda *args, **kwargs: _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))


xp = _StrictNamespace(np)
