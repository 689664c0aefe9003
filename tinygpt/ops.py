"""The small differentiable operations behind Tensor's operators and methods.

Each is a `Function` with its forward and, right below it, the backward rule it implies.
They exist for users and for composition; the fused ops of a GPT are in functional.py.
"""
from __future__ import annotations

from tinygpt import backend
from tinygpt.backend import backend_of, device_of, is_array
from tinygpt.tensor import Function, Tensor


def _broadcastable(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return all(m == n or m == 1 or n == 1 for m, n in zip(reversed(a), reversed(b)))


def _check_broadcastable(op: str, a: tuple[int, ...], b: tuple[int, ...]) -> None:
    if not _broadcastable(a, b):
        raise ValueError(f"{op}: shapes {a} and {b} cannot be broadcast together")


def _is_advanced(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(is_array(i) for i in parts)


class Add(Function):
    """y = a + b.   dy/da = 1, dy/db = 1."""

    @staticmethod
    def forward(ctx, a, b):
        _check_broadcastable("add", a.shape, b.shape)
        return a + b

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


class Sub(Function):
    """y = a - b.   dy/da = 1, dy/db = -1."""

    @staticmethod
    def forward(ctx, a, b):
        _check_broadcastable("sub", a.shape, b.shape)
        return a - b

    @staticmethod
    def backward(ctx, grad):
        return grad, -grad if ctx.needs_input_grad[1] else None


class Mul(Function):
    """y = a * b.   dy/da = b, dy/db = a."""

    @staticmethod
    def forward(ctx, a, b):
        _check_broadcastable("mul", a.shape, b.shape)
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        return (grad * b if ctx.needs_input_grad[0] else None,
                grad * a if ctx.needs_input_grad[1] else None)


class Div(Function):
    """y = a / b.   dy/da = 1/b, dy/db = -a/b^2 = -y/b."""

    @staticmethod
    def forward(ctx, a, b):
        _check_broadcastable("div", a.shape, b.shape)
        y = a / b
        ctx.save_for_backward(b, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        b, y = ctx.saved
        grad_a = grad / b
        return grad_a, -grad_a * y if ctx.needs_input_grad[1] else None


class Neg(Function):
    """y = -x.   dy/dx = -1."""

    @staticmethod
    def forward(ctx, x):
        return -x

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Pow(Function):
    """y = x^p for a constant p.   dy/dx = p x^(p-1)."""

    @staticmethod
    def forward(ctx, x, exponent):
        ctx.save_for_backward(x)
        ctx.exponent = exponent
        return x**exponent

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        p = ctx.exponent
        return grad * (p * x ** (p - 1))


class Exp(Function):
    """y = e^x.   dy/dx = e^x = y."""

    @staticmethod
    def forward(ctx, x):
        y = backend_of(x).exp(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return grad * y


class Log(Function):
    """y = log x.   dy/dx = 1/x."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return backend_of(x).log(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        return grad / x


class Tanh(Function):
    """y = tanh x.   dy/dx = 1 - tanh^2 x = 1 - y^2."""

    @staticmethod
    def forward(ctx, x):
        y = backend_of(x).tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return grad * (1 - y * y)


class Sqrt(Function):
    """y = sqrt x.   dy/dx = 1 / (2 sqrt x) = 0.5 / y."""

    @staticmethod
    def forward(ctx, x):
        y = backend_of(x).sqrt(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return grad * (0.5 / y)


class MatMul(Function):
    """Y = A @ B over the last two axes (leading axes broadcast).

    dL/dA = dL/dY @ B^T and dL/dB = A^T @ dL/dY, since Y_ij = sum_k A_ik B_kj."""

    @staticmethod
    def forward(ctx, a, b):
        if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2] or not _broadcastable(a.shape[:-2], b.shape[:-2]):
            raise ValueError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not align")
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        xp = backend_of(grad)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = grad @ xp.swapaxes(b, -1, -2)
        if ctx.needs_input_grad[1]:
            if b.ndim == 2 and a.ndim > 2:
                # a weight shared across a batch: fold the batch into rows, one (K, N) product
                # instead of a (batch, K, N) stack that unbroadcast would sum
                grad_b = a.reshape(-1, a.shape[-1]).T @ grad.reshape(-1, grad.shape[-1])
            else:
                grad_b = xp.swapaxes(a, -1, -2) @ grad
        return grad_a, grad_b


def reduced_count(shape: tuple[int, ...], axis) -> int:
    """How many elements a reduction over `axis` (None: all, an int, or a tuple) takes into each result."""
    if axis is None:
        axis = range(len(shape))
    elif isinstance(axis, int):
        axis = (axis,)
    count = 1
    for a in axis:
        count *= shape[a]
    return count


class Sum(Function):
    """y = sum of x over `axis`.   Each x element contributes once: dL/dx = dL/dy, broadcast back."""

    @staticmethod
    def forward(ctx, x, axis, keepdims):
        ctx.shape, ctx.axis, ctx.keepdims = x.shape, axis, keepdims
        return x.sum(axis=axis, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        xp = backend_of(grad)
        if not ctx.keepdims and ctx.axis is not None:
            grad = xp.expand_dims(grad, ctx.axis)
        return xp.broadcast_to(grad, ctx.shape)


class Max(Function):
    """y = max of x over `axis`.

    The maximum moves only with the elements that attain it: dy/dx_i = 1 for those
    (split evenly when several tie), 0 for the rest."""

    @staticmethod
    def forward(ctx, x, axis, keepdims):
        y = x.max(axis=axis, keepdims=True)
        ctx.save_for_backward(x, y)
        ctx.axis, ctx.keepdims = axis, keepdims
        return y if keepdims else (y.reshape(()) if axis is None else y.squeeze(axis))

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved
        if not ctx.keepdims:
            grad = grad.reshape(y.shape)
        is_max = x == y
        ties = is_max.sum(axis=ctx.axis, keepdims=True).astype(grad.dtype)  # an integer count would upcast
        return is_max * (grad / ties)


class Reshape(Function):
    """y = x viewed with another shape.   dL/dx = dL/dy viewed with x's shape."""

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        try:
            return x.reshape(shape)
        except ValueError:
            raise ValueError(f"cannot reshape a tensor of shape {tuple(x.shape)} ({x.size} elements) to {shape}") from None

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(ctx.shape)


class Transpose(Function):
    """y = x with two axes swapped.   dL/dx = dL/dy with the same two axes swapped back."""

    @staticmethod
    def forward(ctx, x, axis1, axis2):
        ctx.axes = (axis1, axis2)
        return backend_of(x).swapaxes(x, axis1, axis2)

    @staticmethod
    def backward(ctx, grad):
        return backend_of(grad).swapaxes(grad, *ctx.axes)


def index_on_device(index, device: str):
    """Tensors, lists and host arrays inside an index become arrays on `device`."""
    if isinstance(index, tuple):
        return tuple(index_on_device(i, device) for i in index)
    if isinstance(index, Tensor):
        index = index.data
    if isinstance(index, list) or is_array(index):
        return backend.to_device(index, device)
    return index


class GetItem(Function):
    """y = x[index].   Each y element is one x element, so dL/dx is zero except at the
    selected places, which receive dL/dy; an element selected twice receives both
    (scatter-add), which is why integer-array indices go through index_add."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.shape, ctx.dtype, ctx.index = x.shape, x.dtype, index
        return x[index]

    @staticmethod
    def backward(ctx, grad):
        grad_x = backend_of(grad).zeros(ctx.shape, dtype=ctx.dtype)
        if _is_advanced(ctx.index):
            backend.index_add(grad_x, ctx.index, grad)
        else:
            grad_x[ctx.index] = grad
        return grad_x


class Concatenate(Function):
    """y = [x1, x2, ...] joined along `axis`.   dL/dxi is xi's own slice of dL/dy."""

    @staticmethod
    def forward(ctx, *xs, axis):
        ctx.axis = axis
        ctx.ends = [0]
        for x in xs:
            ctx.ends.append(ctx.ends[-1] + x.shape[axis])
        return backend_of(xs[0]).concatenate(xs, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        return tuple(backend_of(grad).split(grad, ctx.ends[1:-1], axis=ctx.axis))


class Where(Function):
    """y = a where cond else b.   dL/da = dL/dy where cond, 0 elsewhere; dL/db the other way round."""

    @staticmethod
    def forward(ctx, a, b, cond):
        ctx.cond = cond
        return backend_of(cond).where(cond, a, b)

    @staticmethod
    def backward(ctx, grad):
        xp = backend_of(grad)
        return (xp.where(ctx.cond, grad, 0) if ctx.needs_input_grad[0] else None,
                xp.where(ctx.cond, 0, grad) if ctx.needs_input_grad[1] else None)


class ToDevice(Function):
    """y = x copied to another device.   dL/dx = dL/dy copied back."""

    @staticmethod
    def forward(ctx, x, device):
        ctx.source = device_of(x)
        return backend.to_device(x, device)

    @staticmethod
    def backward(ctx, grad):
        return backend.to_device(grad, ctx.source)


class Cast(Function):
    """y = x in another dtype.   dL/dx = dL/dy in x's dtype."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = x.dtype
        return x.astype(dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.astype(ctx.dtype)
