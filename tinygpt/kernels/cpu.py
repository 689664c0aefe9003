"""The fused ops' fast paths on NumPy: the plain math of functional.py, blocked.

Every function computes what the op of the same name in functional.py computes (its
docstring there has the math), on row blocks of about 1 MB run side by side on a thread pool
(threads.run_blocks): a block stays in a core's cache while all its steps run, in place in a
buffer or two, and the blocks use every core. Rows of layer norm, GELU, dropout and
cross-entropy are independent; attention runs one sequence per block. The parameter
gradients that are sums over rows (layer norm's dscale and dshift) are summed per block and
the partial sums added at the end, so no two threads write the same memory.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from tinygpt import backend
from tinygpt.functional.attention import future_mask
from tinygpt.functional.dropout import drop_scale
from tinygpt.functional.activations import GELU_CUBIC, SQRT_2_OVER_PI
from tinygpt.kernels.threads import matmul as matmul  # the interface's matmul: split across the threads
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


@functools.lru_cache(maxsize=16)
def _causal_bias(tq: int, tk: int, dtype):
    """0 where query i may look at key j, -inf where j > i + (tk - tq). Cached: a training
    run asks for the same (T, T) mask at every layer and step."""
    return np.where(future_mask(np, tq, tk), -math.inf, 0.0).astype(dtype)


def _heads_last(shape, dtype):
    """An empty [..., H, T, D] array laid out in memory as [..., T, H, D]: the heads' layout
    before attention, so joining them afterwards copies nothing."""
    if len(shape) < 3:
        return np.empty(shape, dtype=dtype)
    *lead, h, t, d = shape
    return np.swapaxes(np.empty((*lead, t, h, d), dtype=dtype), -2, -3)


def _keep(probs, s, dropout_p: float, seed: int):
    """The dropout mask of sequences s of probs [B, ...], or None without dropout: the part of
    the whole mask's stream that starts at sequence s.start."""
    if dropout_p == 0.0:
        return None
    return _uniform(probs[s].shape, seed, backend.mask_start(probs.shape) + s.start * probs[0].size) >= dropout_p


def attention_forward(q, k, v, causal: bool, dropout_p: float, seed: int):
    if q.ndim == 2:  # (T, D) inputs: one sequence
        out, probs = attention_forward(q[None], k[None], v[None], causal, dropout_p, seed)
        return out[0], probs[0]
    (*lead, tq, d), tk, dv = q.shape, k.shape[-2], v.shape[-1]
    scale = 1.0 / math.sqrt(d)
    dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    probs = np.empty((*lead, tq, tk), dtype=dtype)
    out = _heads_last((*lead, tq, dv), dtype)
    bias = _causal_bias(tq, tk, dtype) if causal else None

    def block(s):  # one sequence
        p = probs[s]
        np.matmul(q[s], np.swapaxes(k[s], -1, -2), out=p)  # S: [1,H,Tq,D] @ [1,H,D,Tk] -> [1,H,Tq,Tk]
        p *= scale
        if bias is not None:
            p += bias
        p -= p.max(axis=-1, keepdims=True)  # softmax in place: the scores are not needed afterwards
        np.exp(p, out=p)
        p /= p.sum(axis=-1, keepdims=True)
        keep = _keep(probs, s, dropout_p, seed)
        if keep is not None:
            p = p * keep * drop_scale(dropout_p)
        out[s] = p @ v[s]  # [1,H,Tq,Tk] @ [1,H,Tk,Dv] -> [1,H,Tq,Dv]

    run_blocks(block, q.shape[0], 1)
    return out, probs


def attention_backward(grad, q, k, v, probs, dropout_p: float, seed: int, needs):
    if q.ndim == 2:
        grads = attention_backward(grad[None], q[None], k[None], v[None], probs[None], dropout_p, seed, needs)
        return tuple(None if g is None else g[0] for g in grads)
    need_q, need_k, need_v = needs
    scale = 1.0 / math.sqrt(q.shape[-1])
    grad_q = _heads_last(q.shape, q.dtype) if need_q else None
    grad_k = _heads_last(k.shape, k.dtype) if need_k else None
    grad_v = _heads_last(v.shape, v.dtype) if need_v else None

    def block(s):
        p, g = probs[s], grad[s]
        keep = _keep(probs, s, dropout_p, seed)
        if need_v:
            dropped = p if keep is None else p * keep * drop_scale(dropout_p)
            grad_v[s] = np.swapaxes(dropped, -1, -2) @ g
        dscores = g @ np.swapaxes(v[s], -1, -2)  # dL/dP, through the dropout mask
        if keep is not None:
            dscores *= keep
            dscores *= drop_scale(dropout_p)
        dscores -= (dscores * p).sum(axis=-1, keepdims=True)  # softmax backward, times the score scale
        dscores *= p
        dscores *= scale
        if need_q:
            grad_q[s] = dscores @ k[s]
        if need_k:
            grad_k[s] = np.swapaxes(dscores, -1, -2) @ q[s]

    run_blocks(block, probs.shape[0], 1)
    return grad_q, grad_k, grad_v


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
