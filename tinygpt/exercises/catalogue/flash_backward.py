"""Known mistakes in FlashAttention's tiled backward.

Per tile (queries i, keys j): P_ij = exp(S_ij - L_i) rebuilt from the saved log-sum-exp (0
at future keys), dV_j += P_ij^T g_i, dP_ij = g_i V_j^T, dS_ij = P_ij * (dP_ij - D_i),
dQ_i += dS_ij K_j / sqrt(D), dK_j += dS_ij^T Q_i / sqrt(D), with D = rowsum(dout * out)
computed once: sum_j dP_ij P_ij = g_i . sum_j P_ij v_j = g_i . out_i.

Most mistakes give the same numbers tiled or not, so they are computed on whole arrays here;
those that only a tiled loop makes (a row sum per tile, = for +=, a softmax per tile, a
skipped tile) run the tiles."""
from __future__ import annotations

import numpy as np

from tinygpt.exercises.catalogue import Context, recorder
from tinygpt.exercises.sheets.flash_backward import blocks, future

MISTAKES: list = []
mistake = recorder(MISTAKES)


def T(a):
    return a.swapaxes(-1, -2)


def context(inputs, dout) -> Context:
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    Tq, Tk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1 / np.sqrt(D)
    mask = future(slice(0, Tq), slice(0, Tk), Tq, Tk)
    S = q @ T(k) * scale
    Sm = np.where(mask, -np.inf, S)
    L = np.log(np.exp(Sm - Sm.max(-1, keepdims=True)).sum(-1)) + Sm.max(-1)
    P = np.exp(Sm - L[..., None])
    g = np.asarray(dout)
    out = P @ v
    dP = g @ T(v)
    c = Context(q=q, k=k, v=v, Tq=Tq, Tk=Tk, scale=scale, mask=mask, S=S, L=L, P=P, g=g, out=out, dP=dP,
                Drow=(g * out).sum(-1))
    c.dS = P * (dP - c.Drow[..., None])
    return c


def grads(c, dS=None, P=None, scale=None, dv=True) -> dict:
    """dq, dk (and dv from P) from a dS, on whole arrays."""
    dS = c.dS if dS is None else dS
    scale = c.scale if scale is None else scale
    out = {"dq": dS @ c.k * scale, "dk": T(dS) @ c.q * scale}
    if dv and P is not None:
        out["dv"] = T(P) @ c.g
    return out


def from_P(c, P) -> dict:
    """Every gradient, when the rebuilt P is wrong (and dS is made from it)."""
    dP = c.g @ T(c.v)
    return grads(c, P * (dP - c.Drow[..., None]), P)


def tiled(c, tile_P=None, tile_D=None, skip=None, assign=False) -> dict:
    """The tiled loop with one part changed: tile_P(c, rows, keys) -> P tile, tile_D(c, rows, keys, P) -> D,
    skip(rows, keys) -> bool, assign: = where += belongs."""
    dq, dk, dv = np.zeros_like(c.q), np.zeros_like(c.k), np.zeros_like(c.v)
    for keys in blocks(c.Tk):
        for rows in blocks(c.Tq):
            m = future(rows, keys, c.Tq, c.Tk)
            if (skip or (lambda r, k: m.all()))(rows, keys):
                continue
            P = tile_P(c, rows, keys) if tile_P else np.exp(np.where(m, -np.inf, c.S[..., rows, keys]) - c.L[..., rows, None])
            g = c.g[..., rows, :]
            dP = g @ T(c.v[..., keys, :])
            D = tile_D(c, rows, keys, P, dP) if tile_D else c.Drow[..., rows, None]
            dS = P * (dP - D)
            parts = (T(P) @ g, dS @ c.k[..., keys, :] * c.scale, T(dS) @ c.q[..., rows, :] * c.scale)
            for target, index, part in ((dv, keys, parts[0]), (dq, rows, parts[1]), (dk, keys, parts[2])):
                if assign:
                    target[..., index, :] = part
                else:
                    target[..., index, :] += part
    return {"dq": dq, "dk": dk, "dv": dv}


@mistake("no-D-term", "dS = P * dP: the softmax backward's - P * rowsum(dP * P) term is missing",
         """The softmax's Jacobian is P_i (delta_ij - P_j): the - P_i P_j part gives dS_ij = P_ij (dP_ij - D_i) with
         D_i = sum_j dP_ij P_ij, the row sum every tile of the row needs. In the tiled backward it comes from
         dout and out, D = rowsum(dout * out), computed once before the loop""")
def _(c):
    return grads(c, c.P * c.dP)


@mistake("D-without-out", "D = rowsum(dout) (or rowsum(out)): the product dout * out is missing",
         """D_i = sum_j dP_ij P_ij = sum_j (g_i . v_j) P_ij = g_i . (sum_j P_ij v_j) = g_i . out_i: the row sum of
         dout * out, elementwise, over the D values of the row""")
def _(c):
    variants = [grads(c, c.P * (c.dP - D[..., None])) for D in (c.g.sum(-1), c.out.sum(-1))]
    return {n: [w[n] for w in variants] for n in ("dq", "dk")}


@mistake("D-per-tile", "D taken over the tile's keys only: rowsum(dP * P) inside the loop",
         """D_i = sum_j dP_ij P_ij runs over all Tk keys of the row, and a tile holds only BLOCK of them: a sum
         inside the tile is a part of D, not D. The whole sum is g_i . out_i (sum_j P_ij v_j is out_i), so
         D = rowsum(dout * out) before the loop""")
def _(c):
    wrong = tiled(c, tile_D=lambda c, rows, keys, P, dP: (dP * P).sum(-1, keepdims=True))
    return {"dq": wrong["dq"], "dk": wrong["dk"]}  # dv does not use D


@mistake("D-sign", "dS = P * (dP + D): the row sum added where the softmax backward subtracts it",
         """dS_ij = P_ij (dP_ij - D_i): the - P_i P_j part of the softmax Jacobian P_i (delta_ij - P_j) brings the
         minus""")
def _(c):
    return grads(c, c.P * (c.dP + c.Drow[..., None]))


@mistake("P-without-L", "P rebuilt as exp(S): the saved log-sum-exp L is not subtracted",
         """P_ij = exp(S_ij) / sum_j exp(S_ij) = exp(S_ij - L_i), with L_i = log sum_j exp(S_ij) the number the
         forward saved per row. exp(S) alone is P times exp(L), a different number in every row""")
def _(c):
    with np.errstate(over="ignore"):
        return from_P(c, np.where(c.mask, 0.0, np.exp(c.S)))


@mistake("P-tile-softmax", "P rebuilt as a softmax over the tile's keys only",
         """A softmax over the BLOCK keys of one tile normalises each row of the tile to 1; the forward's P
         normalises over all Tk keys. That whole-row denominator is exactly what L keeps: P_ij = exp(S_ij - L_i)""")
def _(c):
    def tile_softmax(c, rows, keys):
        s = np.where(future(rows, keys, c.Tq, c.Tk), -np.inf, c.S[..., rows, keys])
        mx = s.max(-1, keepdims=True)
        e = np.exp(s - np.where(np.isfinite(mx), mx, 0.0))
        total = e.sum(-1, keepdims=True)
        return np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    return tiled(c, tile_P=tile_softmax)


@mistake("unmasked-P", "P rebuilt without the causal mask: future keys get a probability",
         """The forward set the scores of keys after their query to -inf, so P is 0 there. exp(S - L) of the raw
         scores is not: apply the mask (future(rows, keys, Tq, Tk)) before the exp, in every tile that is
         partly in the future""")
def _(c):
    P = np.exp(c.S - c.L[..., None])
    whole = from_P(c, P)
    skipping = tiled(c, tile_P=lambda c, rows, keys: np.exp(c.S[..., rows, keys] - c.L[..., rows, None]))
    return {n: [whole[n], skipping[n]] for n in whole}


@mistake("mask-no-offset", "the causal mask without the offset Tk - Tq: query i treated as if at position i",
         """The Tq queries are the last Tq of the Tk positions: query i sits at position Tk - Tq + i and sees keys
         j <= Tk - Tq + i. Masking j > i hides Tk - Tq keys each query did see in the forward""")
def _(c):
    shifted = np.arange(c.Tk)[None, :] > np.arange(c.Tq)[:, None]
    return from_P(c, np.where(shifted | c.mask, 0.0, c.P))


@mistake("skipped-visible-tiles", "tiles skipped that some of their queries can see (a wrong skip test)",
         """A tile may be skipped only when every key in it is after every query's position, i.e. when its first key
         is after the position of its LAST query, Tk - Tq + rows.stop - 1. A test on the first query, or without
         the offset Tk - Tq, skips tiles that hold probabilities""")
def _(c):
    offset = c.Tk - c.Tq
    tests = (lambda r, k: k.start > r.start + offset, lambda r, k: k.start > r.stop - 1, lambda r, k: k.start >= r.stop)
    variants = [tiled(c, skip=t) for t in tests]
    return {n: [w[n] for w in variants] for n in ("dq", "dk", "dv")}


@mistake("assign-not-add", "a tile's share assigned (=) to dq, dk or dv where it must be added (+=)",
         """dq_i sums the shares of every key tile of the row, and dk_j, dv_j the shares of every query tile that
         sees them: each tile adds its part. With = only the last tile's part is left""")
def _(c):
    return tiled(c, assign=True)


@mistake("no-scale", "the 1/sqrt(D) missing in dq and dk (or in the rebuilt scores)",
         """S = Q K^T / sqrt(D): dQ and dK carry the same 1/sqrt(D), and the scores rebuilt for P must be scaled
         as in the forward, or exp(S - L) is not the forward's P""")
def _(c):
    unscaled = np.where(c.mask, 0.0, np.exp(np.minimum(c.S / c.scale - c.L[..., None], 700.0)))
    out = {n: [v] for n, v in grads(c, scale=1.0).items()}
    for n, v in from_P(c, unscaled).items():
        out.setdefault(n, []).append(v)
    return out


@mistake("scale-twice", "1/sqrt(D) applied twice in dq and dk (1/D)",
         """One 1/sqrt(D) in the forward's scores gives one in the backward: scaling dS and again dq and dk makes 1/D""")
def _(c):
    return grads(c, scale=c.scale ** 2)


@mistake("dv-uses-dS", "dv = dS^T dout (or P dout): the weights of out = P V are P, transposed",
         """out = P V is linear in V with coefficients P: dV_j = sum_i P_ij dout_i = P^T dout, tile by tile
         dV_j += P_ij^T g_i""")
def _(c):
    return {"dv": T(c.dS) @ c.g}
