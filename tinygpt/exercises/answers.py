"""The answer key: a plain NumPy backward for every exercise, taking the cache its sheet's
forward returns. Kept out of the sheets, so `start` never writes a solution.

The ops' backward passes follow the derivations in tinygpt/functional.py; the block's
reuses them step by step, which is the point of the block exercise."""
from __future__ import annotations

import numpy as np

from tinygpt.exercises.sheets import layer_norm as layer_norm_sheet


def linear(dy, cache):
    """y = x W^T + b  ->  dx = dy W,  dW = dy^T x (summed over rows),  db = sum over rows of dy."""
    x, W, b = cache
    dy_rows, x_rows = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])  # [..., n] -> [N, n]
    return dy @ W, dy_rows.T @ x_rows, dy_rows.sum(axis=0)


def embedding(dy, cache):
    """y[b, t] = W[ids[b, t]]  ->  dW[v] = sum of dy over the positions whose id is v."""
    W, ids = cache
    dW = np.zeros_like(W)
    np.add.at(dW, ids, dy)  # unlike dW[ids] += dy, adds once per occurrence of a repeated id
    return dW


def layer_norm(dy, cache):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dy * scale."""
    x, scale, xhat, rstd = cache
    rows = tuple(range(dy.ndim - 1))  # every axis but the last: scale and shift are broadcast over them
    dxhat = dy * scale
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, (dy * xhat).sum(axis=rows), dy.sum(axis=rows)


def gelu(dy, cache):
    """dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2),  t = tanh(u)."""
    (x,) = cache
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t**2) * c * (1 + 3 * 0.044715 * x**2))


def softmax(dy, cache):
    """dx_j = y_j (dy_j - sum_i dy_i y_i)."""
    (y,) = cache
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


def attention(dout, cache):
    """out = P V, P = softmax(S), S = Q K^T / sqrt(D), going back one line at a time."""
    q, k, v, P = cache
    scale = 1 / np.sqrt(q.shape[-1])
    dv = P.swapaxes(-1, -2) @ dout                        # [B, H, T, T] @ [B, H, T, D]
    dP = dout @ v.swapaxes(-1, -2)                        # [B, H, T, D] @ [B, H, D, T]
    dS = softmax(dP, (P,))                                # masked entries have P = 0, so dS = 0 there
    return dS @ k * scale, dS.swapaxes(-1, -2) @ q * scale, dv


def cross_entropy(dloss, cache):
    """dlogits_r = (softmax(z_r) - onehot(t_r)) * dloss / N."""
    logits, targets, logsumexp = cache
    dlogits = np.exp(logits - logsumexp[:, None])         # softmax, one row per sample
    dlogits[np.arange(len(targets)), targets] -= 1.0
    return dlogits * dloss / len(targets)


def block(dout, cache):
    """The block, from out back to x. Each step quotes the forward line it inverts."""
    c, p = cache, cache["p"]
    B, T, C = c["x"].shape
    H, D = c["q"].shape[1], c["q"].shape[3]
    d = {}
    # out = x1 + ff_out: both get dout (x1 collects a second part from ln2 below)
    d["ff_out"] = dout
    # ff_out = act @ W_2.T + b_2
    d["act"], d["W_2"], d["b_2"] = linear(d["ff_out"], (c["act"], p["W_2"], p["b_2"]))
    # act = gelu(h)
    d["h"] = gelu(d["act"], (c["h"],))
    # h = ln2 @ W_1.T + b_1
    d["ln2"], d["W_1"], d["b_1"] = linear(d["h"], (c["ln2"], p["W_1"], p["b_1"]))
    # ln2 = layer_norm(x1, scale2, shift2)
    dx1_norm, d["scale2"], d["shift2"] = layer_norm(d["ln2"], layer_norm_sheet.forward(c["x1"], p["scale2"], p["shift2"])[1])
    d["x1"] = dout + dx1_norm
    # x1 = x + att_out: att_out gets all of dx1 (x gets it too, added at the end)
    d["att_out"] = d["x1"]
    # att_out = ctx @ W_o.T + b_o
    d["ctx"], d["W_o"], d["b_o"] = linear(d["att_out"], (c["ctx"], p["W_o"], p["b_o"]))
    # ctx = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C): undo the merge of the heads
    dheads = d["ctx"].reshape(B, T, H, D).transpose(0, 2, 1, 3)     # [B, T, C] -> [B, H, T, D]
    d["att"] = dheads @ c["v"].swapaxes(-1, -2)
    d["v"] = c["att"].swapaxes(-1, -2) @ dheads
    # att = softmax(scores with the future masked): masked entries have att = 0, so no gradient
    d["scores"] = softmax(d["att"], (c["att"],))
    # scores = q @ k^T / sqrt(D)
    d["q"] = d["scores"] @ c["k"] / np.sqrt(D)
    d["k"] = d["scores"].swapaxes(-1, -2) @ c["q"] / np.sqrt(D)
    # q, k, v = (ln1 @ W.T) split into heads: merge the heads back, then the linear backward
    d["ln1"] = np.zeros_like(c["ln1"])
    for name, weight in (("q", "W_q"), ("k", "W_k"), ("v", "W_v")):
        merged = d[name].transpose(0, 2, 1, 3).reshape(B, T, C)       # [B, H, T, D] -> [B, T, C]
        dln1, d[weight], _ = linear(merged, (c["ln1"], p[weight], None))
        d["ln1"] += dln1                                              # ln1 feeds all three
    # ln1 = layer_norm(x, scale1, shift1), and x also feeds x1 directly
    dx_norm, d["scale1"], d["shift1"] = layer_norm(d["ln1"], layer_norm_sheet.forward(c["x"], p["scale1"], p["shift1"])[1])
    d["x"] = dx_norm + d["x1"]
    return d
