"""The answer key of the warm-ups: plain NumPy, taking the cache each sheet's forward returns."""
from __future__ import annotations

import numpy as np


def add(dout, cache):
    """out = a + b, b broadcast over the rows: da = dout, db = dout summed over the rows."""
    return dout.copy(), dout.sum(axis=0)


def mul(dout, cache):
    """out = a * b: da = dout * b, db = dout * a."""
    a, b = cache
    return dout * b, dout * a


def div(dout, cache):
    """out = a / b: da = dout / b, db = -dout * a / b^2."""
    a, b = cache
    return dout / b, -dout * a / b**2


def pow(dout, cache):
    """out = a^3: da = dout * 3 a^2."""
    (a,) = cache
    return dout * 3 * a**2


def exp(dout, cache):
    """out = exp(a): da = dout * exp(a) = dout * out."""
    a, out = cache
    return dout * out


def log(dout, cache):
    """out = log(a): da = dout / a."""
    (a,) = cache
    return dout / a


def tanh(dout, cache):
    """out = tanh(a): da = dout * (1 - out^2)."""
    a, out = cache
    return dout * (1 - out**2)


def sum(dout, cache):
    """out = a.sum(axis=1): da[i, j] = dout[i], copied along the summed axis."""
    (a,) = cache
    return np.broadcast_to(dout[:, None], a.shape).copy()


def mean(dout, cache):
    """out = a.mean(axis=0): da[i, j] = dout[j] / B."""
    (a,) = cache
    return np.broadcast_to(dout / a.shape[0], a.shape).copy()


def reshape_transpose(dout, cache):
    """out = a.transpose(0, 2, 1).reshape(2, 12): undo the reshape, then the transpose."""
    (a,) = cache
    return dout.reshape(2, 4, 3).transpose(0, 2, 1)


def getitem(dout, cache):
    """out = a[rows]: da[rows[n]] += dout[n], adding for every repeat."""
    a, rows = cache
    da = np.zeros_like(a)
    np.add.at(da, rows, dout)
    return da


def matmul(dout, cache):
    """out = a @ b: da = dout @ b^T, db = a^T @ dout."""
    a, b = cache
    return dout @ b.T, a.T @ dout


def mlp(dlogits, cache):
    """The MLP, from logits back to x, one line of the forward at a time."""
    c, d = cache, {"logits": dlogits}
    d["W2"], d["b2"], d["h"] = c["h"].T @ dlogits, dlogits.sum(axis=0), dlogits @ c["W2"].T   # logits = h @ W2 + b2
    d["h_pre"] = d["h"] * (1 - c["h"] ** 2)                                                   # h = tanh(h_pre)
    d["W1"], d["b1"], d["x"] = c["x"].T @ d["h_pre"], d["h_pre"].sum(axis=0), d["h_pre"] @ c["W1"].T  # h_pre = x @ W1 + b1
    return d
