"""The answer key of the exercises on the newer blocks (RMSNorm, RoPE, SwiGLU, GQA) and on
FlashAttention (the online softmax, the tiled backward), in each sheet's own interface.

The derivations are those of tinygpt/functional/ (norms.py, rope.py, activations.py,
gqa.py, flash_attention.py)."""
from __future__ import annotations

import numpy as np

from tinygpt.exercises.sheets.flash_backward import blocks, future
from tinygpt.exercises.sheets.rope import rotate_half


def rms_norm(dy, cache):
    """dx = rstd * (dxhat - xhat * mean(dxhat * xhat)),  dxhat = dy * weight;  dweight = sum over rows of dy * xhat."""
    x, weight, xhat, rstd = cache
    dxhat = dy * weight
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, (dy * xhat).sum(axis=tuple(range(dy.ndim - 1)))


def rope(dy, cache):
    """dx = R(a)^T dy = R(-a) dy:  dx1 = g1 cos + g2 sin,  dx2 = g2 cos - g1 sin."""
    positions, cos, sin = cache
    return dy * cos - rotate_half(dy) * sin


def swiglu(dy, cache):
    """Back through y = h W_down^T, h = act * up, act = silu(gate), gate and up = x W^T."""
    c = cache
    rows = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731  [B, T, n] -> [B*T, n]
    dh = dy @ c["W_down"]                                      # [B, T, C] @ [C, HID]
    dW_down = rows(dy).T @ rows(c["h"])                        # [C, B*T] @ [B*T, HID]
    dact, dup = dh * c["up"], dh * c["act"]
    s = 1.0 / (1.0 + np.exp(-c["gate"]))
    dgate = dact * s * (1.0 + c["gate"] * (1.0 - s))           # silu'(g) = s (1 + g (1 - s))
    dx = dgate @ c["W_gate"] + dup @ c["W_up"]                 # x feeds gate and up: both paths add
    return dx, rows(dgate).T @ rows(c["x"]), rows(dup).T @ rows(c["x"]), dW_down


def gqa(dout, cache):
    """The attention backward against k_rep and v_rep, then each group's sum into its shared head."""
    q, k_rep, v_rep, P, n = cache
    scale = 1 / np.sqrt(q.shape[-1])
    dv_rep = P.swapaxes(-1, -2) @ dout                          # out = P v_rep
    dP = dout @ v_rep.swapaxes(-1, -2)
    dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))        # P = softmax(S); 0 where masked
    dq, dk_rep = dS @ k_rep * scale, dS.swapaxes(-1, -2) @ q * scale
    B, H, T, D = dk_rep.shape                                   # k_rep = repeat(k, n): sum each group of n heads
    return dq, dk_rep.reshape(B, H // n, n, T, D).sum(axis=2), dv_rep.reshape(B, H // n, n, T, D).sum(axis=2)


class online_softmax:  # noqa: N801 - the answer key of a forward exercise: the functions the sheet asks for
    """m' = max(m, max s); l' = l exp(m - m') + sum exp(s - m'); a' = a exp(m - m') + exp(s - m') V."""

    @staticmethod
    def step(m, l, a, s, v):
        m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
        rescale, p = np.exp(m - m_new), np.exp(s - m_new)      # [B, Tq, 1], [B, Tq, bk]
        return m_new, l * rescale + p.sum(axis=-1, keepdims=True), a * rescale + p @ v

    @staticmethod
    def finish(m, l, a):
        return a / l, (m + np.log(l))[..., 0]


def flash_backward(dout, cache):
    """P rebuilt per tile from L; D = rowsum(dout * out) once, for the softmax backward's row sum."""
    q, k, v, out, L = cache
    Tq, Tk = q.shape[-2], k.shape[-2]
    scale = 1 / np.sqrt(q.shape[-1])
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    D = (dout * out).sum(axis=-1)                              # [B, H, Tq]: sum_j dP_ij P_ij = dout_i . out_i
    for keys in blocks(Tk):
        for rows in blocks(Tq):
            mask = future(rows, keys, Tq, Tk)
            if mask.all():
                continue  # every key here is in the future of every query here
            S = q[..., rows, :] @ k[..., keys, :].swapaxes(-1, -2) * scale
            P = np.exp(np.where(mask, -np.inf, S) - L[..., rows, None])   # [B, H, bq, bk]
            g = dout[..., rows, :]
            dv[..., keys, :] += P.swapaxes(-1, -2) @ g
            dS = P * (g @ v[..., keys, :].swapaxes(-1, -2) - D[..., rows, None])
            dq[..., rows, :] += dS @ k[..., keys, :] * scale
            dk[..., keys, :] += dS.swapaxes(-1, -2) @ q[..., rows, :] * scale
    return dq, dk, dv
