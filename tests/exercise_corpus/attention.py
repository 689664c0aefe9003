"""Attention backward passes as learners write them."""
import numpy as np
from corpus_tools import right, wrong


def parts(dout, cache):
    q, k, v, P = cache
    D = q.shape[-1]
    dP = dout @ v.swapaxes(-1, -2)
    dS = P * (dP - (dP * P).sum(-1, keepdims=True))
    return q, k, v, P, D, dP, dS


@wrong("attention", "dv-not-transposed", must_not=("no simple pattern", "not transposed,"))
def _(dout, cache):
    q, k, v, P, D, dP, dS = parts(dout, cache)
    return dS @ k / np.sqrt(D), dS.swapaxes(-1, -2) @ q / np.sqrt(D), P @ dout


@wrong("attention", "dk-not-transposed", must_not=("no simple pattern", "not transposed,"))
def _(dout, cache):
    q, k, v, P, D, dP, dS = parts(dout, cache)
    return dS @ k / np.sqrt(D), dS @ q / np.sqrt(D), P.swapaxes(-1, -2) @ dout


@wrong("attention", "no-scale")
def _(dout, cache):
    q, k, v, P, D, dP, dS = parts(dout, cache)
    return dS @ k, dS.swapaxes(-1, -2) @ q, P.swapaxes(-1, -2) @ dout


@wrong("attention", "scale-inverted")
def _(dout, cache):
    q, k, v, P, D, dP, dS = parts(dout, cache)
    return dS @ k * np.sqrt(D), dS.swapaxes(-1, -2) @ q * np.sqrt(D), P.swapaxes(-1, -2) @ dout


@wrong("attention", "softmax-no-P", must_not=("masked positions only",))
def _(dout, cache):
    q, k, v, P, D, dP, _ = parts(dout, cache)
    dS = dP - (dP * P).sum(-1, keepdims=True)
    return dS @ k / np.sqrt(D), dS.swapaxes(-1, -2) @ q / np.sqrt(D), P.swapaxes(-1, -2) @ dout


@wrong("attention", "softmax-no-sum-term")
def _(dout, cache):
    q, k, v, P, D, dP, _ = parts(dout, cache)
    dS = P * dP
    return dS @ k / np.sqrt(D), dS.swapaxes(-1, -2) @ q / np.sqrt(D), P.swapaxes(-1, -2) @ dout


@wrong("attention", "softmax-wrong-axis")
def _(dout, cache):
    q, k, v, P, D, dP, _ = parts(dout, cache)
    dS = P * (dP - (dP * P).sum(axis=2, keepdims=True))
    return dS @ k / np.sqrt(D), dS.swapaxes(-1, -2) @ q / np.sqrt(D), P.swapaxes(-1, -2) @ dout


@wrong("attention", "unmasked-P")
def _(dout, cache):
    q, k, v, _, D, _, _ = parts(dout, cache)
    S = q @ k.swapaxes(-1, -2) / np.sqrt(D)
    P = np.exp(S - S.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    dP = dout @ v.swapaxes(-1, -2)
    dS = P * (dP - (dP * P).sum(-1, keepdims=True))
    return dS @ k / np.sqrt(D), dS.swapaxes(-1, -2) @ q / np.sqrt(D), P.swapaxes(-1, -2) @ dout


@wrong("attention", "masked-gets-gradient")
def _(dout, cache):
    q, k, v, P, D, dP, dS = parts(dout, cache)
    T = P.shape[-1]
    mask = np.triu(np.ones((T, T), dtype=bool), 1)
    dS = np.where(mask, dP, dS)
    return dS @ k / np.sqrt(D), dS.swapaxes(-1, -2) @ q / np.sqrt(D), P.swapaxes(-1, -2) @ dout


@wrong("attention", "swapped")
def _(dout, cache):
    q, k, v, P, D, dP, dS = parts(dout, cache)
    dq = dS @ k / np.sqrt(D)
    dk = dS.swapaxes(-1, -2) @ q / np.sqrt(D)
    return dk, dq, P.swapaxes(-1, -2) @ dout


@wrong("attention", "softmax-diagonal-only")
def _(dout, cache):
    q, k, v, P, D, dP, _ = parts(dout, cache)
    dS = P * (1 - P) * dP
    return dS @ k / np.sqrt(D), dS.swapaxes(-1, -2) @ q / np.sqrt(D), P.swapaxes(-1, -2) @ dout


@wrong("attention", "dq-uses-q")
def _(dout, cache):
    q, k, v, P, D, dP, dS = parts(dout, cache)
    return dS @ q / np.sqrt(D), dS.swapaxes(-1, -2) @ q / np.sqrt(D), P.swapaxes(-1, -2) @ dout


@wrong("attention", "scale-twice")
def _(dout, cache):
    q, k, v, P, D, dP, dS = parts(dout, cache)
    dS = dS / np.sqrt(D)
    return dS @ k / np.sqrt(D), dS.swapaxes(-1, -2) @ q / np.sqrt(D), P.swapaxes(-1, -2) @ dout


@right("attention")
def _(dout, cache):
    q, k, v, P = cache
    scale = q.shape[-1] ** -0.5
    dv = np.einsum("bhij,bhid->bhjd", P, dout)
    dP = np.einsum("bhid,bhjd->bhij", dout, v)
    dS = P * dP - P * np.einsum("bhij,bhij->bhi", P, dP)[..., None]
    return np.einsum("bhij,bhjd->bhid", dS, k) * scale, np.einsum("bhij,bhid->bhjd", dS, q) * scale, dv


@wrong("attention", "softmax-skipped")
def _(dout, cache):
    q, k, v, P, D, dP, _ = parts(dout, cache)
    return dP @ k / np.sqrt(D), dP.swapaxes(-1, -2) @ q / np.sqrt(D), P.swapaxes(-1, -2) @ dout


@wrong("attention", "generic", must_not=("transposed:",))
def _(dout, cache):
    q, k, v, P = cache
    B, H, T, D = q.shape
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for h in range(H - 1):  # off by one: the last head is never visited
        dv[:, h] = P[:, h].swapaxes(-1, -2) @ dout[:, h]
        dP = dout[:, h] @ v[:, h].swapaxes(-1, -2)
        dS = P[:, h] * (dP - (dP * P[:, h]).sum(-1, keepdims=True))
        dq[:, h] = dS @ k[:, h] / np.sqrt(D)
        dk[:, h] = dS.swapaxes(-1, -2) @ q[:, h] / np.sqrt(D)
    return dq, dk, dv


@wrong("attention", "recogniser", must_not=("no simple pattern",))
def _(dout, cache):
    q, k, v, P, D, dP, dS = parts(dout, cache)
    T = P.shape[-1]
    dS = dS.copy()
    dS[..., np.triu(np.ones((T, T), dtype=bool), 1)] = 0.5  # junk where the mask is
    return dS @ k / np.sqrt(D), dS.swapaxes(-1, -2) @ q / np.sqrt(D), P.swapaxes(-1, -2) @ dout
