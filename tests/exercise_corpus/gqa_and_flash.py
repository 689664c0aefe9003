"""Grouped-query attention, online softmax and tiled attention backward passes as learners write them."""
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


# ------------------------------------------------------------------ flash_backward


BLOCK = 4


def tiles(Tq, Tk):
    for j in range(0, Tk, BLOCK):
        for i in range(0, Tq, BLOCK):
            yield slice(i, min(i + BLOCK, Tq)), slice(j, min(j + BLOCK, Tk))


def flash(dout, cache, D_of=None, P_of=None, mask=True, add=True, scale_of=None):
    """A tiled backward with knobs, as a learner's variants of the same loop."""
    q, k, v, out, L = cache
    Tq, Tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1 / np.sqrt(d) if scale_of is None else scale_of(d)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    Drow = (dout * out).sum(-1, keepdims=True) if D_of is None else None
    for rows, keys in tiles(Tq, Tk):
        fut = np.arange(keys.start, keys.stop)[None, :] > np.arange(rows.start, rows.stop)[:, None] + Tk - Tq
        if fut.all():
            continue
        S = q[..., rows, :] @ k[..., keys, :].swapaxes(-1, -2) * (1 / np.sqrt(d))
        if mask:
            S = np.where(fut, -np.inf, S)
        P = np.exp(S - L[..., rows, None]) if P_of is None else P_of(S, L[..., rows, None])
        g = dout[..., rows, :]
        dP = g @ v[..., keys, :].swapaxes(-1, -2)
        Di = Drow[..., rows, :] if D_of is None else D_of(P, dP, g, out[..., rows, :])
        dS = P * (dP - Di)
        parts = ((dv, keys, P.swapaxes(-1, -2) @ g), (dq, rows, dS @ k[..., keys, :] * scale),
                 (dk, keys, dS.swapaxes(-1, -2) @ q[..., rows, :] * scale))
        for target, index, part in parts:
            if add:
                target[..., index, :] += part
            else:
                target[..., index, :] = part
    return dq, dk, dv


@wrong("flash_backward", "no-D-term")
def _(dout, cache):
    return flash(dout, cache, D_of=lambda P, dP, g, o: 0.0)


@wrong("flash_backward", "D-per-tile")
def _(dout, cache):
    return flash(dout, cache, D_of=lambda P, dP, g, o: (P * dP).sum(-1, keepdims=True))


@wrong("flash_backward", "D-without-out")
def _(dout, cache):
    return flash(dout, cache, D_of=lambda P, dP, g, o: g.sum(-1, keepdims=True))


@wrong("flash_backward", "P-tile-softmax")
def _(dout, cache):
    def local_softmax(S, L):
        e = np.exp(S - S.max(-1, keepdims=True))
        e = np.nan_to_num(e)
        total = e.sum(-1, keepdims=True)
        return np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    return flash(dout, cache, P_of=local_softmax)


@wrong("flash_backward", "unmasked-P")
def _(dout, cache):
    return flash(dout, cache, mask=False)


@wrong("flash_backward", "assign-not-add")
def _(dout, cache):
    return flash(dout, cache, add=False)


@wrong("flash_backward", "no-scale")
def _(dout, cache):
    return flash(dout, cache, scale_of=lambda d: 1.0)


@wrong("flash_backward", "P-without-L")
def _(dout, cache):
    return flash(dout, cache, P_of=lambda S, L: np.exp(S))


@wrong("flash_backward", "mask-no-offset")
def _(dout, cache):
    q, k, v, out, L = cache
    Tq, Tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    Drow = np.einsum("bhqd,bhqd->bhq", dout, out)
    for rows, keys in tiles(Tq, Tk):
        fut = np.arange(keys.start, keys.stop)[None, :] > np.arange(rows.start, rows.stop)[:, None]
        if fut.all():
            continue
        S = np.where(fut, -np.inf, q[..., rows, :] @ k[..., keys, :].swapaxes(-1, -2) / np.sqrt(d))
        P = np.exp(S - L[..., rows, None])
        g = dout[..., rows, :]
        dv[..., keys, :] += P.swapaxes(-1, -2) @ g
        dS = P * (g @ v[..., keys, :].swapaxes(-1, -2) - Drow[..., rows, None]) / np.sqrt(d)
        dq[..., rows, :] += dS @ k[..., keys, :]
        dk[..., keys, :] += dS.swapaxes(-1, -2) @ q[..., rows, :]
    return dq, dk, dv


@wrong("flash_backward", "untiled")  # right gradients, but P of [B, H, Tq, Tk] held at once
def _(dout, cache):
    q, k, v, out, L = cache
    Tq, Tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    S = q @ k.swapaxes(-1, -2) / np.sqrt(d)
    S = np.where(np.arange(Tk)[None, :] > np.arange(Tq)[:, None] + Tk - Tq, -np.inf, S)
    P = np.exp(S - L[..., None])
    dP = dout @ v.swapaxes(-1, -2)
    dS = P * (dP - (dP * P).sum(-1, keepdims=True)) / np.sqrt(d)
    return dS @ k, dS.swapaxes(-1, -2) @ q, P.swapaxes(-1, -2) @ dout


@right("flash_backward")
def _(dout, cache):
    q, k, v, out, L = cache
    Tq, Tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = d ** -0.5
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    Drow = np.einsum("bhqd,bhqd->bhq", dout, out)[..., None]
    for i in range(0, Tq, BLOCK):  # query blocks outside this time, and einsum
        rows = slice(i, min(i + BLOCK, Tq))
        for j in range(0, Tk, BLOCK):
            keys = slice(j, min(j + BLOCK, Tk))
            if j > rows.stop - 1 + Tk - Tq:
                break
            S = np.einsum("bhqd,bhkd->bhqk", q[..., rows, :], k[..., keys, :]) * scale
            fut = np.arange(keys.start, keys.stop)[None, :] > np.arange(rows.start, rows.stop)[:, None] + Tk - Tq
            P = np.where(fut, 0.0, np.exp(np.where(fut, 0.0, S) - L[..., rows, None]))
            g = dout[..., rows, :]
            dv[..., keys, :] += np.einsum("bhqk,bhqd->bhkd", P, g)
            dS = P * (np.einsum("bhqd,bhkd->bhqk", g, v[..., keys, :]) - Drow[..., rows, :])
            dq[..., rows, :] += np.einsum("bhqk,bhkd->bhqd", dS, k[..., keys, :]) * scale
            dk[..., keys, :] += np.einsum("bhqk,bhqd->bhkd", dS, q[..., rows, :]) * scale
    return dq, dk, dv
