"""The fused ops' fast paths on NumPy: the plain math of functional.py, blocked.

Every function computes what the op of the same name in functional.py computes (its
docstring there has the math), on row blocks of about 1 MB run side by side on a thread pool
(threads.run_blocks): a block stays in a core's cache while all its steps run, in place in a
buffer or two, and the blocks use every core. Rows of layer norm, GELU, dropout and
cross-entropy are independent; attention, in blocks of queries, has a file of its own
(cpu_attention.py). The parameter gradients that are sums over rows (layer norm's dscale
and dshift) are summed per block and the partial sums added at the end, so no two threads
write the same memory.
"""
from __future__ import annotations

import functools

import numpy as np

from tinygpt import backend
from tinygpt.functional.dropout import drop_scale
from tinygpt.functional.activations import GELU_CUBIC, SQRT_2_OVER_PI
from tinygpt.kernels.threads import matmul as matmul  # the interface's matmul: split across the threads
from tinygpt.kernels.cpu_attention import attention_backward, attention_forward  # noqa: F401  (the interface's)
from tinygpt.kernels.threads import rows_per_block, run_blocks, run_rows


def _rows(x):
    """x as a 2-D array of rows, [..., C] -> [N, C] (a 0-d x as one 1 x 1 row)."""
    return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


def _uniform(shape, seed: int, start: int):
    return backend.get_backend("cpu").uniform(shape, seed, start)


def embedding_backward(ids, grad_rows, vocab: int):
    """dW[v] = sum of the rows of grad_rows whose id is v. np.add.at adds one element at a
    time; sorting the ids and summing each run of equal ones with add.reduceat does the same
    in a few vectorised passes."""
    grad_w = np.zeros((vocab, grad_rows.shape[1]), dtype=grad_rows.dtype)
    if ids.size == 0:
        return grad_w
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_ids[1:] != sorted_ids[:-1]]))
    grad_w[sorted_ids[starts]] = np.add.reduceat(grad_rows[order], starts, axis=0)
    return grad_w


def layer_norm_forward(x2, scale, shift, eps: float):
    dtype = np.result_type(x2.dtype, scale.dtype, shift.dtype)  # as x * scale + shift would give
    xhat, y = np.empty(x2.shape, dtype=dtype), np.empty(x2.shape, dtype=dtype)
    rstd = np.empty((x2.shape[0], 1), dtype=dtype)

    def block(s):
        mean = x2[s].mean(axis=-1, keepdims=True)
        np.subtract(x2[s], mean, out=xhat[s])
        var = (xhat[s] * xhat[s]).mean(axis=-1, keepdims=True)
        rstd[s] = 1.0 / np.sqrt(var + eps)
        xhat[s] *= rstd[s]
        np.multiply(xhat[s], scale, out=y[s])
        y[s] += shift

    run_rows(block, x2)
    return y, xhat, rstd


def layer_norm_backward(g2, xhat, rstd, scale):
    grad_x = np.empty_like(xhat)
    rows = rows_per_block(xhat.shape[1])
    partial_scale = np.zeros((-(-xhat.shape[0] // rows), xhat.shape[1]), dtype=xhat.dtype)  # one row per block
    partial_shift = np.zeros_like(partial_scale)

    def block(s):
        i = s.start // rows
        partial_shift[i] = g2[s].sum(axis=0)
        partial_scale[i] = (g2[s] * xhat[s]).sum(axis=0)
        dxhat = g2[s] * scale
        np.subtract(dxhat, dxhat.mean(axis=-1, keepdims=True), out=grad_x[s])
        dxhat *= xhat[s]
        grad_x[s] -= xhat[s] * dxhat.mean(axis=-1, keepdims=True)
        grad_x[s] *= rstd[s]

    run_blocks(block, xhat.shape[0], rows)
    return grad_x, partial_scale.sum(axis=0), partial_shift.sum(axis=0)


def rms_norm_forward(x2, w, eps: float):
    dtype = np.result_type(x2.dtype, w.dtype)  # as x * w would give
    xhat, y = np.empty(x2.shape, dtype=dtype), np.empty(x2.shape, dtype=dtype)
    rstd = np.empty((x2.shape[0], 1), dtype=dtype)

    def block(s):
        np.multiply(x2[s], x2[s], out=y[s])
        rstd[s] = 1.0 / np.sqrt(y[s].mean(axis=-1, keepdims=True) + eps)
        np.multiply(x2[s], rstd[s], out=xhat[s])
        np.multiply(xhat[s], w, out=y[s])

    run_rows(block, x2)
    return y, xhat, rstd


def rms_norm_backward(g2, xhat, rstd, w):
    grad_x = np.empty_like(xhat)
    rows = rows_per_block(xhat.shape[1])
    partial_w = np.zeros((-(-xhat.shape[0] // rows), xhat.shape[1]), dtype=xhat.dtype)  # one row per block

    def block(s):  # dx = rstd (dxhat - xhat mean(dxhat xhat)), dxhat = g w
        partial_w[s.start // rows] = (g2[s] * xhat[s]).sum(axis=0)
        dxhat = g2[s] * w
        np.multiply(dxhat, xhat[s], out=grad_x[s])
        np.multiply(xhat[s], grad_x[s].mean(axis=-1, keepdims=True), out=grad_x[s])
        np.subtract(dxhat, grad_x[s], out=grad_x[s])
        grad_x[s] *= rstd[s]

    run_blocks(block, xhat.shape[0], rows)
    return grad_x, partial_w.sum(axis=0)


def _tanh_u(x, x_sq):
    """tanh(u), u = SQRT_2_OVER_PI x (1 + GELU_CUBIC x^2), computed in place in x_sq = x * x."""
    x_sq *= GELU_CUBIC
    x_sq += 1.0
    x_sq *= x
    x_sq *= SQRT_2_OVER_PI
    return np.tanh(x_sq, out=x_sq)


def gelu_forward(x):
    x2 = _rows(x)
    y = np.empty_like(x2)

    def block(s):
        t = _tanh_u(x2[s], np.multiply(x2[s], x2[s], out=y[s]))  # y = 0.5 x (1 + t)
        t += 1.0
        t *= x2[s]
        t *= 0.5

    run_rows(block, x2)
    return y.reshape(x.shape)


def gelu_backward(x, grad):
    x2 = _rows(x)
    g2 = grad.reshape(x2.shape)
    dx = np.empty_like(x2)

    def block(s):
        xs, dydx = x2[s], dx[s]
        x_sq = xs * xs
        np.multiply(x_sq, 3 * GELU_CUBIC, out=dydx)  # 0.5 x (1 - t^2) du/dx, du/dx = SQRT_2_OVER_PI (1 + 3 GELU_CUBIC x^2)
        dydx += 1.0
        dydx *= xs
        dydx *= 0.5 * SQRT_2_OVER_PI
        t = _tanh_u(xs, x_sq)
        dydx *= 1.0 - t * t
        t += 1.0                                     # + 0.5 (1 + t)
        t *= 0.5
        dydx += t
        dydx *= g2[s]

    run_rows(block, x2)
    return dx.reshape(x.shape)


def _sigmoid_into(a, out):
    """sigmoid(a) = 1 / (1 + exp(-a)) into out. For a < -88 (float32) exp(-a) overflows to inf
    and 1 / inf = 0 is the right limit, so the overflow is allowed rather than avoided: the plain
    op's overflow-free form (exp of -|a|, then a choice by sign) measured 7x slower here."""
    with np.errstate(over="ignore"):
        np.exp(np.negative(a, out=out), out=out)
    out += 1.0
    return np.divide(1.0, out, out=out)


def swiglu_forward(a, b):
    a2, b2 = _rows(a), _rows(b)
    y = np.empty_like(a2)

    def block(s):  # y = a sigmoid(a) b
        _sigmoid_into(a2[s], y[s])
        y[s] *= a2[s]
        y[s] *= b2[s]

    run_rows(block, a2)
    return y.reshape(a.shape)


def swiglu_backward(a, b, grad, need_a: bool):
    a2, b2, g2 = _rows(a), _rows(b), grad.reshape(_rows(a).shape)
    grad_a = np.empty_like(a2) if need_a else None
    grad_b = np.empty_like(a2)

    def block(rows):
        s = _sigmoid_into(a2[rows], np.empty_like(a2[rows]))
        silu = np.multiply(a2[rows], s, out=grad_b[rows])
        if need_a:  # dL/da = g b (s + silu (1 - s))
            da = np.subtract(1.0, s, out=grad_a[rows])
            da *= silu
            da += s
            da *= b2[rows]
            da *= g2[rows]
        silu *= g2[rows]  # dL/db = g silu(a)

    run_rows(block, a2)
    return (None if grad_a is None else grad_a.reshape(a.shape)), grad_b.reshape(a.shape)


def dropout(x, p: float, seed: int):
    x2 = _rows(x)
    y = np.empty_like(x2)
    scale = drop_scale(p)

    first = backend.mask_start(x.shape)

    def block(s):  # this block's part of the mask: from its first element's place in the stream
        keep = _uniform(x2[s].shape, seed, first + s.start * x2.shape[1]) >= p
        np.multiply(x2[s], keep, out=y[s])
        y[s] *= scale

    run_rows(block, x2)
    return y.reshape(x.shape)


def logsumexp_rows(z):
    lse = np.empty(z.shape[0], dtype=z.dtype)

    def block(s):  # lse = m + log sum exp(z - m), m = max(z): exp never overflows
        m = z[s].max(axis=1, keepdims=True)
        e = z[s] - m
        np.exp(e, out=e)
        lse[s] = (m + np.log(e.sum(axis=1, keepdims=True)))[:, 0]

    run_rows(block, z)
    return lse


def cross_entropy_backward(z, lse, t, weight):
    dz = np.empty_like(z)

    def block(s):
        np.subtract(z[s], lse[s, None], out=dz[s])
        np.exp(dz[s], out=dz[s])  # softmax(z)
        dz[np.arange(s.start, s.stop), t[s]] -= 1.0
        dz[s] *= weight[s]

    run_rows(block, z)
    return dz


def adamw_step_(w, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step_size, rsqrt_correction) -> None:
    """In place, on flat views updated block by block: each block is read from memory once
    for all the steps of the update. Arrays that are not contiguous get one block."""
    arrays = (w, g, m, v)
    if not all(a.flags.c_contiguous for a in arrays):
        _adamw_block(slice(None), arrays, lr, beta1, beta2, eps, weight_decay, step_size, rsqrt_correction)
        return
    flat = [a.reshape(-1) for a in arrays]
    run_blocks(functools.partial(_adamw_block, arrays=flat, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                 weight_decay=weight_decay, step_size=step_size, rsqrt_correction=rsqrt_correction),
               flat[0].size, 1 << 18)


def _adamw_block(s, arrays, lr, beta1, beta2, eps, weight_decay, step_size, rsqrt_correction) -> None:
    w, g, m, v = arrays
    if weight_decay:
        w[s] *= 1.0 - lr * weight_decay
    m[s] *= beta1
    m[s] += (1.0 - beta1) * g[s]
    v[s] *= beta2
    v[s] += (1.0 - beta2) * (g[s] * g[s])
    denom = np.sqrt(v[s])
    denom *= rsqrt_correction
    denom += eps
    np.divide(m[s], denom, out=denom)
    denom *= step_size
    w[s] -= denom
