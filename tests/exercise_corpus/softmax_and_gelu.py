"""Softmax and GELU backward passes as learners write them."""
import math

import numpy as np
from corpus_tools import right, wrong

# ---------------------------------------------------------------- softmax


@wrong("softmax", "no-sum-term", must_not=("transposed", "mask"))
def _(dy, cache):
    (y,) = cache
    dx = y * dy  # softmax' = softmax
    return dx


@wrong("softmax", "no-diagonal")
def _(dy, cache):
    (y,) = cache
    s = np.sum(dy * y, axis=-1, keepdims=True)
    return -y * s


@wrong("softmax", "sum-dy-not-weighted")
def _(dy, cache):
    (y,) = cache
    return y * (dy - dy.sum(-1, keepdims=True))


@wrong("softmax", "mean-not-sum")
def _(dy, cache):
    (y,) = cache
    dot = np.mean(dy * y, axis=-1, keepdims=True)
    return y * (dy - dot)


@wrong("softmax", "sum-wrong-axis")
def _(dy, cache):
    (y,) = cache
    return y * (dy - (y * dy).sum(axis=1, keepdims=True))


@wrong("softmax", "sum-wrong-axis")
def _(dy, cache):
    (y,) = cache
    total = (y * dy).sum()
    return y * (dy - total)


@wrong("softmax", "diagonal-only")
def _(dy, cache):
    (y,) = cache
    return dy * y * (1 - y)


@wrong("softmax", "plus-sum")
def _(dy, cache):
    (y,) = cache
    return y * dy + y * (y * dy).sum(axis=-1, keepdims=True)


@wrong("softmax", "no-outer-y")
def _(dy, cache):
    (y,) = cache
    return dy - np.einsum("btc,btc->bt", dy, y)[..., None]


@wrong("softmax", "log-softmax-backward")
def _(dy, cache):
    (y,) = cache
    return dy - y * dy.sum(axis=-1, keepdims=True)


@wrong("softmax", "s-without-dy")
def _(dy, cache):
    (y,) = cache
    return y * (dy - y.sum(axis=-1, keepdims=True))


@wrong("softmax", "no-sum-term")
def _(dy, cache):
    (y,) = cache
    dx = np.zeros_like(y)
    for b in range(y.shape[0]):
        for t in range(y.shape[1]):
            jac = np.diag(y[b, t])  # forgot - outer(y, y)
            dx[b, t] = jac @ dy[b, t]
    return dx


@right("softmax")
def _(dy, cache):
    (y,) = cache
    dx = np.empty_like(y)
    for b in range(y.shape[0]):
        for t in range(y.shape[1]):
            p = y[b, t]
            dx[b, t] = (np.diag(p) - np.outer(p, p)) @ dy[b, t]
    return dx


@right("softmax")
def _(dy, cache):
    (y,) = cache
    return y * dy - y * np.einsum("...c,...c->...", y, dy)[..., None]


# ---------------------------------------------------------------- gelu

C = math.sqrt(2 / math.pi)


@wrong("gelu", "no-3")
def _(dy, cache):
    (x,) = cache
    t = np.tanh(C * (x + 0.044715 * x**3))
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t**2) * C * (1 + 0.044715 * x**2))


@wrong("gelu", "no-first-term")
def _(dy, cache):
    (x,) = cache
    t = np.tanh(C * (x + 0.044715 * x**3))
    return dy * 0.5 * x * (1 - t * t) * C * (1 + 3 * 0.044715 * x * x)


@wrong("gelu", "one-minus-t")
def _(dy, cache):
    (x,) = cache
    t = np.tanh(C * (x + 0.044715 * x**3))
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t) * C * (1 + 3 * 0.044715 * x**2))


@wrong("gelu", "no-second-term", must_not=("mask",))
def _(dy, cache):
    (x,) = cache
    return dy * 0.5 * (1 + np.tanh(C * (x + 0.044715 * x**3)))


@wrong("gelu", "no-c")
def _(dy, cache):
    (x,) = cache
    u = C * (x + 0.044715 * x**3)
    du = 1 + 3 * 0.044715 * x**2
    return dy * (0.5 * (1 + np.tanh(u)) + 0.5 * x * (1 - np.tanh(u) ** 2) * du)


@wrong("gelu", "sech-not-squared")
def _(dy, cache):
    (x,) = cache
    u = C * (x + 0.044715 * x**3)
    return dy * (0.5 * (1 + np.tanh(u)) + 0.5 * x / np.cosh(u) * C * (1 + 3 * 0.044715 * x**2))


@wrong("gelu", "no-dy")
def _(dy, cache):
    (x,) = cache
    t = np.tanh(C * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * C * (1 + 3 * 0.044715 * x**2)


@wrong("gelu", "no-half-second")
def _(dy, cache):
    (x,) = cache
    t = np.tanh(C * (x + 0.044715 * x**3))
    return dy * (0.5 * (1 + t) + x * (1 - t**2) * C * (1 + 3 * 0.044715 * x**2))


@wrong("gelu", "erf-derivative")
def _(dy, cache):
    (x,) = cache
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    pdf = np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
    return dy * (cdf + x * pdf)


@wrong("gelu", "no-inner-derivative")
def _(dy, cache):
    (x,) = cache
    t = np.tanh(C * (x + 0.044715 * x**3))
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t**2))


@wrong("gelu", "cube-not-differentiated")
def _(dy, cache):
    (x,) = cache
    inner = x + 0.044715 * x**3
    t = np.tanh(C * inner)
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t**2) * C * inner)


@wrong("gelu", "y-for-x")
def _(dy, cache):
    (x,) = cache
    t = np.tanh(C * (x + 0.044715 * x**3))
    y = 0.5 * x * (1 + t)
    return dy * (0.5 * (1 + t) + 0.5 * y * (1 - t**2) * C * (1 + 3 * 0.044715 * x**2))


@right("gelu")
def _(dy, cache):
    (x,) = cache
    u = C * (x + 0.044715 * x * x * x)
    sech2 = 1 / np.cosh(u) ** 2
    return 0.5 * dy * (1 + np.tanh(u)) + 0.5 * dy * x * sech2 * C * (1 + 0.134145 * x * x)


@wrong("gelu", "tanh-of-x")
def _(dy, cache):
    (x,) = cache
    t = np.tanh(x)
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t**2) * C * (1 + 3 * 0.044715 * x**2))


@wrong("softmax", "recogniser")
def _(dy, cache):
    (y,) = cache
    return y * ((dy * y).sum(axis=-1, keepdims=True) - dy)  # the subtraction the wrong way round
