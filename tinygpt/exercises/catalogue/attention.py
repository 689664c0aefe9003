"""Known mistakes in the attention backward.

The derivation, one line of the forward at a time:
    out = P V               ->  dV = P^T dout,  dP = dout V^T
    P = softmax(S), masked  ->  dS = P * (dP - sum_j dP * P)   (0 where masked, since P = 0 there)
    S = Q K^T / sqrt(D)     ->  dQ = dS K / sqrt(D),  dK = dS^T Q / sqrt(D)"""
from __future__ import annotations

import numpy as np

from tinygpt.exercises.catalogue import Context, recorder

MISTAKES: list = []
mistake = recorder(MISTAKES)


def T(a):
    return a.swapaxes(-1, -2)


def context(inputs, dout) -> Context:
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    D, n = q.shape[-1], q.shape[-2]
    future = np.triu(np.ones((n, n), dtype=bool), k=1)
    S = q @ T(k) / np.sqrt(D)
    P = softmax(np.where(future, -np.inf, S))
    dout = np.asarray(dout)
    dP = dout @ T(v)
    return Context(q=q, k=k, v=v, D=D, future=future, S=S, P=P, dy=dout, dP=dP,
                   dS=P * (dP - (dP * P).sum(axis=-1, keepdims=True)), scale=1 / np.sqrt(D))


def softmax(S):
    e = np.exp(S - S.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def qk(c, dS, scale=None):
    scale = c.scale if scale is None else scale
    return {"dq": dS @ c.k * scale, "dk": T(dS) @ c.q * scale}


@mistake("dv-not-transposed", "dv = P @ dout: P is not transposed",
         """out[i] = sum_j P[i, j] V[j]: value j is used by every query i with weight P[i, j]. So
         dV[j] = sum_i P[i, j] dout[i], a sum over the first index of P: dV = P^T dout""")
def _(c):
    return {"dv": c.P @ c.dy}


@mistake("dk-not-transposed", "dk = dS @ q: dS is not transposed",
         """S[i, j] = q_i . k_j / sqrt(D): key j appears in column j of S, for every query i. So
         dK[j] = sum_i dS[i, j] q_i / sqrt(D), a sum over the first index: dK = dS^T Q / sqrt(D)""")
def _(c):
    return {"dk": c.dS @ c.q * c.scale}


@mistake("no-scale", "the 1/sqrt(D) of S = Q K^T / sqrt(D) is missing",
         """The scores are divided by sqrt(D) in the forward, so both dQ and dK carry the same 1/sqrt(D)""")
def _(c):
    return qk(c, c.dS, scale=1.0)


@mistake("scale-inverted", "multiplied by sqrt(D) where the forward divides by it",
         """S = Q K^T / sqrt(D): d S / d Q brings the factor 1/sqrt(D), the same one as in the forward""")
def _(c):
    return qk(c, c.dS, scale=np.sqrt(c.D))


@mistake("scale-twice", "1/sqrt(D) applied twice (1/D)",
         """One 1/sqrt(D) in the forward gives one in the backward; applying it to dS and again to dQ makes 1/D""")
def _(c):
    return qk(c, c.dS, scale=1 / c.D)


@mistake("softmax-no-P", "the softmax backward without its weighting by P: dS = dP - sum(dP * P)",
         """dS_j = P_j (dP_j - sum_i dP_i P_i): both terms of the softmax Jacobian P_i (delta_ij - P_j) carry P_j.
         Without the factor P, masked positions get gradient too and every entry is off""")
def _(c):
    unweighted = c.dP - (c.dP * c.P).sum(axis=-1, keepdims=True)
    variants = [qk(c, unweighted), qk(c, np.where(c.future, 0.0, unweighted))]  # masked afterwards, or not
    return {g: [v[g] for v in variants] for g in ("dq", "dk")}


@mistake("softmax-no-sum-term", "the softmax backward without - P * sum(dP * P): dS = P * dP",
         """Every P_i of a row shares one denominator, so moving S_j moves all of them: the Jacobian is
         P_i (delta_ij - P_j). The - P_i P_j part gives the term - P_j sum_i dP_i P_i""")
def _(c):
    return qk(c, c.P * c.dP)


@mistake("softmax-wrong-axis", "the softmax backward's sum taken over the query axis (-2), not the key axis (-1)",
         """The softmax normalises each row of S over the keys (axis -1): its backward's sum_i dP_i P_i runs
         over the same axis, keepdims=True""")
def _(c):
    variants = [qk(c, c.P * (c.dP - (c.dP * c.P).sum(axis=axis, keepdims=True))) for axis in (-2, 1, (-2, -1))]
    return {g: [v[g] for v in variants] for g in ("dq", "dk")}


@mistake("softmax-diagonal-only", "only the diagonal of the softmax Jacobian: dS = P (1 - P) dP",
         """P_j (1 - P_j) is dP_j/dS_j alone; the other entries of the row, dP_i/dS_j = - P_i P_j, add
         - P_j sum_{i != j} dP_i P_i. Together: dS = P * (dP - sum(dP * P))""")
def _(c):
    return qk(c, c.P * (1 - c.P) * c.dP)


@mistake("unmasked-P", "the probabilities recomputed without the causal mask",
         """The forward set S[i, j] = -inf for j > i before the softmax, so P is 0 there and each row sums to 1
         over the keys it may see. Recomputing softmax(Q K^T / sqrt(D)) without the mask gives another P: use
         the cache's P""")
def _(c):
    P = softmax(c.S)
    dP = c.dy @ T(c.v)
    return {"dv": T(P) @ c.dy, **qk(c, P * (dP - (dP * P).sum(axis=-1, keepdims=True)))}


@mistake("masked-gets-gradient", "gradient flows through the masked positions (dS is not 0 where j > i)",
         """Masked scores were replaced by -inf, a constant: they do not depend on Q or K, so their gradient is 0.
         P = 0 there makes P * (...) vanish by itself; passing dP through, or not masking, leaks gradient""")
def _(c):
    unmasked = softmax(c.S)
    return {g: [v, w] for (g, v), w in zip(qk(c, np.where(c.future, c.dP, c.dS)).items(),
                                           qk(c, unmasked * (c.dP - (c.dP * unmasked).sum(axis=-1, keepdims=True))).values())}


@mistake("softmax-skipped", "the softmax's backward skipped: dS = dP",
         """P = softmax(S) is a step of its own between S and out: dS = P * (dP - sum(dP * P)). Using dP as dS
         treats the softmax as if it were the identity""")
def _(c):
    return qk(c, c.dP)


@mistake("dP-transposed", "dP = v @ dout^T, the transpose of dout @ v^T",
         """out[i] = sum_j P[i, j] v_j, so dP[i, j] = dout_i . v_j: row i of dout against row j of v, which is
         dout @ V^T. v @ dout^T puts the key index first, the transpose""")
def _(c):
    dP = c.v @ T(c.dy)
    return qk(c, c.P * (dP - (dP * c.P).sum(axis=-1, keepdims=True)))


@mistake("dq-uses-q", "dq computed with q where k belongs (dS @ q)",
         """S[i, j] = q_i . k_j / sqrt(D): differentiating by q_i leaves k_j, so dQ = dS K / sqrt(D)""")
def _(c):
    return {"dq": c.dS @ c.q * c.scale}


@mistake("dk-uses-k", "dk computed with k where q belongs (dS^T @ k)",
         """S[i, j] = q_i . k_j / sqrt(D): differentiating by k_j leaves q_i, so dK = dS^T Q / sqrt(D)""")
def _(c):
    return {"dk": T(c.dS) @ c.k * c.scale}


@mistake("dv-uses-dP", "dv from dP or from v (not P^T dout)",
         """out = P V is linear in V with coefficients P: dV = P^T dout. dP is the gradient that flows the
         other way, towards the scores""")
def _(c):
    return {"dv": [T(c.P) @ c.dy @ T(c.v) @ c.v, c.dP @ c.v]}
