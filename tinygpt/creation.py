"""New leaf tensors: from data (`tg.tensor`), or of a shape filled with zeros, ones or
standard-normal numbers, on the default device and in the default dtype unless told otherwise."""
from __future__ import annotations

from tinygpt import backend, op_checks
from tinygpt.tensor import Tensor


def tensor(data, requires_grad: bool = False, dtype=None, device: str | None = None) -> Tensor:
    """A new leaf tensor holding a copy of `data` (nested lists, NumPy/CuPy arrays, numbers,
    or a Tensor). Floating-point data takes the default dtype (float32) unless `dtype` is given."""
    if isinstance(data, Tensor):
        data = data.data
    return Tensor(backend.make_array(data, dtype=dtype, device=device), requires_grad=requires_grad)


def _creation(fill: str):
    def create(*shape, dtype=None, device: str | None = None, requires_grad: bool = False) -> Tensor:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        op_checks.shape(fill, shape)
        b = backend.get_backend(device or backend.default_device())
        dtype = backend.as_dtype(dtype or backend.default_dtype())
        data = b.randn(shape, dtype) if fill == "randn" else getattr(b.xp, fill)(shape, dtype=dtype)
        return Tensor(data, requires_grad=requires_grad)

    create.__name__ = fill
    create.__doc__ = f"A new tensor of the given shape filled by {fill} (shape as varargs or one tuple)."
    return create


zeros, ones, randn = _creation("zeros"), _creation("ones"), _creation("randn")
