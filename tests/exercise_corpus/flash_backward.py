"""Tiled attention backward passes (FlashAttention-2) as learners write them."""
import numpy as np
from corpus_tools import right, wrong

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
