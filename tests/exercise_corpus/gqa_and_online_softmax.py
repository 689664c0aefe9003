"""Grouped-query attention backward passes and online-softmax steps as learners write them."""
import numpy as np
from corpus_tools import right, wrong

# ------------------------------------------------------------------ gqa


def attention_back(dout, q, k_rep, v_rep, P):
    scale = 1 / np.sqrt(q.shape[-1])
    dv = P.swapaxes(-1, -2) @ dout
    dP = dout @ v_rep.swapaxes(-1, -2)
    dS = P * (dP - (dP * P).sum(-1, keepdims=True))
    return dS @ k_rep * scale, dS.swapaxes(-1, -2) @ q * scale, dv


@wrong("gqa", "group-mean")
def _(dout, cache):
    q, k_rep, v_rep, P, n = cache
    dq, dk, dv = attention_back(dout, q, k_rep, v_rep, P)
    B, H, T, D = dk.shape
    return dq, dk.reshape(B, H // n, n, T, D).mean(2), dv.reshape(B, H // n, n, T, D).mean(2)


@wrong("gqa", "first-head-only")
def _(dout, cache):
    q, k_rep, v_rep, P, n = cache
    dq, dk, dv = attention_back(dout, q, k_rep, v_rep, P)
    return dq, dk[:, ::n], dv[:, ::n]  # "undo np.repeat"


@wrong("gqa", "strided-groups")
def _(dout, cache):
    q, k_rep, v_rep, P, n = cache
    dq, dk, dv = attention_back(dout, q, k_rep, v_rep, P)
    H_kv = q.shape[1] // n
    dk_shared = sum(dk[:, r * H_kv:(r + 1) * H_kv] for r in range(n))
    dv_shared = sum(dv[:, r * H_kv:(r + 1) * H_kv] for r in range(n))
    return dq, dk_shared, dv_shared


@wrong("gqa", "strided-groups")
def _(dout, cache):
    q, k_rep, v_rep, P, n = cache
    dq, dk, dv = attention_back(dout, q, k_rep, v_rep, P)
    H_kv = q.shape[1] // n
    return dq, np.stack([dk[:, j::H_kv].sum(1) for j in range(H_kv)], 1), np.stack([dv[:, j::H_kv].sum(1) for j in range(H_kv)], 1)


@wrong("gqa", "group-sum-repeated-back")
def _(dout, cache):
    q, k_rep, v_rep, P, n = cache
    dq, dk, dv = attention_back(dout, q, k_rep, v_rep, P)
    B, H, T, D = dk.shape
    dk = np.repeat(dk.reshape(B, H // n, n, T, D).sum(2), n, axis=1)
    dv = np.repeat(dv.reshape(B, H // n, n, T, D).sum(2), n, axis=1)
    return dq, dk, dv


@wrong("gqa", "attention-dv-not-transposed")
def _(dout, cache):
    q, k_rep, v_rep, P, n = cache
    dq, dk, _ = attention_back(dout, q, k_rep, v_rep, P)
    dv = P @ dout
    B, H, T, D = dk.shape
    return dq, dk.reshape(B, H // n, n, T, D).sum(2), dv.reshape(B, H // n, n, T, D).sum(2)


@wrong("gqa", "attention-softmax-no-sum-term")
def _(dout, cache):
    q, k_rep, v_rep, P, n = cache
    D = q.shape[-1]
    dS = P * (dout @ v_rep.swapaxes(-1, -2))
    dk = dS.swapaxes(-1, -2) @ q / np.sqrt(D)
    dv = P.swapaxes(-1, -2) @ dout
    B, H, T, _ = dk.shape
    return dS @ k_rep / np.sqrt(D), dk.reshape(B, H // n, n, T, D).sum(2), dv.reshape(B, H // n, n, T, D).sum(2)


@wrong("gqa", "attention-no-scale")
def _(dout, cache):
    q, k_rep, v_rep, P, n = cache
    dP = dout @ v_rep.swapaxes(-1, -2)
    dS = P * (dP - (dP * P).sum(-1, keepdims=True))
    B, H, T, D = q.shape
    dk = (dS.swapaxes(-1, -2) @ q).reshape(B, H // n, n, T, D).sum(2)
    dv = (P.swapaxes(-1, -2) @ dout).reshape(B, H // n, n, T, D).sum(2)
    return dS @ k_rep, dk, dv


@wrong("gqa", "dq-grouped")
def _(dout, cache):
    q, k_rep, v_rep, P, n = cache
    dq, dk, dv = attention_back(dout, q, k_rep, v_rep, P)
    B, H, T, D = dk.shape
    group = lambda a: a.reshape(B, H // n, n, T, D).sum(2)  # noqa: E731
    return group(dq), group(dk), group(dv)


@wrong("gqa", "sum-over-all-heads")
def _(dout, cache):
    q, k_rep, v_rep, P, n = cache
    dq, dk, dv = attention_back(dout, q, k_rep, v_rep, P)
    H_kv = q.shape[1] // n
    return dq, np.repeat(dk.sum(1, keepdims=True), H_kv, 1), np.repeat(dv.sum(1, keepdims=True), H_kv, 1)


@wrong("gqa", "no-group-sum")
def _(dout, cache):
    q, k_rep, v_rep, P, n = cache
    return attention_back(dout, q, k_rep, v_rep, P)


@wrong("gqa", "attention-softmax-no-P")
def _(dout, cache):
    q, k_rep, v_rep, P, n = cache
    s = 1 / np.sqrt(q.shape[-1])
    dP = dout @ v_rep.swapaxes(-1, -2)
    dS = np.where(P == 0, 0.0, dP - (dP * P).sum(-1, keepdims=True))  # "zero the masked ones"
    B, H, T, D = q.shape
    group = lambda a: a.reshape(B, H // n, n, T, D).sum(2)  # noqa: E731
    return dS @ k_rep * s, group(dS.swapaxes(-1, -2) @ q * s), group(P.swapaxes(-1, -2) @ dout)


@right("gqa")
def _(dout, cache):
    q, k_rep, v_rep, P, n = cache
    dq, dk_rep, dv_rep = attention_back(dout, q, k_rep, v_rep, P)
    H_kv = q.shape[1] // n
    dk = np.zeros((q.shape[0], H_kv, *q.shape[2:]))
    dv = np.zeros_like(dk)
    for h in range(q.shape[1]):  # each query head sends its share to the head it read
        dk[:, h // n] += dk_rep[:, h]
        dv[:, h // n] += dv_rep[:, h]
    return dq, dk, dv


# ------------------------------------------------------------------ online_softmax


class Right:
    @staticmethod
    def step(m, l, a, s, v):
        m_new = np.maximum(m, s.max(-1, keepdims=True))
        r = np.exp(m - m_new)
        p = np.exp(s - m_new)
        return m_new, l * r + p.sum(-1, keepdims=True), a * r + p @ v

    @staticmethod
    def finish(m, l, a):
        return a / l, (m + np.log(l))[..., 0]


@wrong("online_softmax", "no-rescale")
class _(Right):
    def step(m, l, a, s, v):
        m_new = np.maximum(m, s.max(-1, keepdims=True))
        p = np.exp(s - m_new)
        return m_new, l + p.sum(-1, keepdims=True), a + p @ v


@wrong("online_softmax", "rescale-l-only")
class _(Right):
    def step(m, l, a, s, v):
        m_new = np.maximum(m, s.max(-1, keepdims=True))
        p = np.exp(s - m_new)
        l = l * np.exp(m - m_new) + p.sum(-1, keepdims=True)
        a = a + p @ v
        return m_new, l, a


@wrong("online_softmax", "rescale-inverted")
class _(Right):
    def step(m, l, a, s, v):
        m_new = np.maximum(m, s.max(-1, keepdims=True))
        corr = np.exp(m_new - m)
        corr = np.where(np.isfinite(corr), corr, 0.0)  # first block: m = -inf
        p = np.exp(s - m_new)
        return m_new, l * corr + p.sum(-1, keepdims=True), a * corr + p @ v


@wrong("online_softmax", "block-max-only")
class _(Right):
    def step(m, l, a, s, v):
        m_blk = s.max(-1, keepdims=True)
        p = np.exp(s - m_blk)
        r = np.exp(m - m_blk)
        return m_blk, l * r + p.sum(-1, keepdims=True), a * r + p @ v


@wrong("online_softmax", "no-accumulate")
class _(Right):
    def step(m, l, a, s, v):
        m_new = np.maximum(m, s.max(-1, keepdims=True))
        p = np.exp(s - m_new)
        return m_new, p.sum(-1, keepdims=True), a * np.exp(m - m_new) + p @ v


@wrong("online_softmax", "lse-without-max")
class _(Right):
    def finish(m, l, a):
        return a / l, np.log(l).squeeze(-1)


@wrong("online_softmax", "lse-sign")
class _(Right):
    def finish(m, l, a):
        return a / l, (m - np.log(l))[..., 0]


@wrong("online_softmax", "no-division")
class _(Right):
    def finish(m, l, a):
        return a, (m + np.log(l))[..., 0]


@wrong("online_softmax", "a-old-maximum")
class _(Right):
    def step(m, l, a, s, v):
        m_new = np.maximum(m, s.max(-1, keepdims=True))
        r = np.exp(m - m_new)
        with np.errstate(over="ignore"):
            contribution = np.exp(s - np.where(np.isfinite(m), m, m_new)) @ v
        return m_new, l * r + np.exp(s - m_new).sum(-1, keepdims=True), a * r + contribution


@wrong("online_softmax", "lse-is-max")
class _(Right):
    def finish(m, l, a):
        return a / l, m[..., 0]


@wrong("online_softmax", "recogniser")  # no max shift at all: overflows on the row near +700
class _(Right):
    def step(m, l, a, s, v):
        e = np.exp(s)
        return m, l + e.sum(-1, keepdims=True), a + e @ v

    def finish(m, l, a):
        return a / l, np.log(l)[..., 0]


@wrong("online_softmax", "sum-no-axis")
class _(Right):
    def step(m, l, a, s, v):
        m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
        r = np.exp(m - m_new)
        p = np.exp(s - m_new)
        return m_new, l * r + np.sum(p), a * r + p @ v


@right("online_softmax")
class _:
    def step(m, l, a, s, v):
        # written row by row with explicit loops
        m, l, a = m.copy(), l.copy(), a.copy()
        for b in range(s.shape[0]):
            for i in range(s.shape[1]):
                new = max(m[b, i, 0], s[b, i].max())
                scale = np.exp(m[b, i, 0] - new)
                w = np.exp(s[b, i] - new)
                l[b, i, 0] = l[b, i, 0] * scale + w.sum()
                a[b, i] = a[b, i] * scale + w @ v[b]
                m[b, i, 0] = new
        return m, l, a

    def finish(m, l, a):
        return a / l, np.log(l[..., 0]) + m[..., 0]
