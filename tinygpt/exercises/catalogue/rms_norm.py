"""Known mistakes in the RMSNorm backward.

The derivation, per row of C values: rstd = 1/sqrt(mean(x^2) + eps), xhat = x * rstd,
y = xhat * weight. With dxhat = dy * weight, x_j reaches xhat two ways (directly, and
through rstd, with d rstd/dx_j = -rstd^3 x_j / C):
    dx = rstd * (dxhat - xhat * mean(dxhat * xhat))
and dweight = sum over rows of dy * xhat."""
from __future__ import annotations

import numpy as np

from tinygpt.exercises.catalogue import Context, recorder

MISTAKES: list = []
mistake = recorder(MISTAKES)
EPS = 1e-6


def context(inputs, dout) -> Context:
    x, weight = inputs["x"], inputs["weight"]
    rstd = 1 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + EPS)
    dy = np.asarray(dout)
    return Context(x=x, weight=weight, rstd=rstd, xhat=x * rstd, dy=dy, dxhat=dy * weight, rows=tuple(range(x.ndim - 1)))


def dx_from(c, dxhat=None, xhat=None, rstd=None, term=1.0, mean=np.mean):
    dxhat = c.dxhat if dxhat is None else dxhat
    xhat = c.xhat if xhat is None else xhat
    rstd = c.rstd if rstd is None else rstd
    return rstd * (dxhat - term * xhat * mean(dxhat * xhat, axis=-1, keepdims=True))


@mistake("constant-rstd", "rstd treated as a constant: dx = dy * weight * rstd",
         """Only the direct path x_j -> xhat_j is there. But rstd = 1/sqrt(mean(x^2) + eps) is computed from every
         x of the row, so x_j also moves every xhat_i through rstd: d rstd/dx_j = -rstd^3 x_j / C, which adds
         the term - rstd * xhat * mean(dxhat * xhat) to dx""")
def _(c):
    return {"dx": c.rstd * c.dxhat}


@mistake("no-weight", "dy used where dxhat = dy * weight belongs (the weight is missing in dx)",
         """y = xhat * weight, so what reaches xhat is dxhat = dy * weight (the chain rule through the last line
         of the forward); both terms of dx are built from dxhat""")
def _(c):
    return {"dx": [dx_from(c, dxhat=c.dy),
                   c.rstd * (c.dxhat - c.xhat * (c.dy * c.xhat).mean(axis=-1, keepdims=True)),
                   c.rstd * (c.dy - c.xhat * (c.dxhat * c.xhat).mean(axis=-1, keepdims=True))]}


@mistake("offset-weight", "dxhat = dy * (1 + weight): the Gemma variant, where this forward multiplies by weight",
         """Some models (Gemma) store weight - 1 and multiply by 1 + weight; this forward multiplies by weight
         itself, so dxhat = dy * weight. (With the offset, dxhat = dy * (1 + weight) and dweight is unchanged,
         since d(1 + weight)/d weight = 1)""")
def _(c):
    return {"dx": dx_from(c, dxhat=c.dy * (1 + c.weight))}


@mistake("layer-norm-mean-term", "a - mean(dxhat) term, as in layer norm: RMSNorm subtracts no mean",
         """Layer norm subtracts the row's mean in its forward, and that path gives its - mean(dxhat) term.
         RMSNorm divides by the root mean square only: x_j reaches xhat directly and through rstd, nothing
         else, so dx = rstd * (dxhat - xhat * mean(dxhat * xhat))""")
def _(c):
    return {"dx": c.rstd * (c.dxhat - c.dxhat.mean(axis=-1, keepdims=True)
                            - c.xhat * (c.dxhat * c.xhat).mean(axis=-1, keepdims=True))}


@mistake("layer-norm-stats", "rstd recomputed from the variance (x - mean), as layer norm does",
         """RMSNorm's rstd is 1/sqrt(mean(x^2) + eps): the mean square of x itself, not the variance around the
         mean. Use the cache's rstd and xhat, which are the forward's""")
def _(c):
    xc = c.x - c.x.mean(axis=-1, keepdims=True)
    rstd = 1 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + EPS)
    return {"dx": [dx_from(c, xhat=c.x * rstd, rstd=rstd), dx_from(c, xhat=xc * rstd, rstd=rstd)],
            "dweight": [(c.dy * c.x * rstd).sum(axis=c.rows), (c.dy * xc * rstd).sum(axis=c.rows)]}


@mistake("power-rule", "the term through rstd off by a factor 2 (the 1/2 of the power rule, or the 2 of x^2)",
         """rstd = (ms + eps)^(-1/2) with ms = mean(x^2): d rstd/d ms = -(1/2) rstd^3 and d ms/dx_j = 2 x_j / C.
         The 1/2 and the 2 cancel, leaving d rstd/dx_j = -rstd^3 x_j / C; dropping one of them doubles or
         halves the term - rstd * xhat * mean(dxhat * xhat)""")
def _(c):
    return {"dx": [dx_from(c, term=2.0), dx_from(c, term=0.5)]}


@mistake("no-rstd-factor", "dx without its outer factor rstd: dxhat - xhat * mean(dxhat * xhat)",
         """xhat = x * rstd, so every path from x_j to xhat brings a factor rstd: the direct one, d xhat_j/dx_j = rstd,
         and the one through rstd, rstd^3 x_j / C = rstd * rstd * xhat_j / C. Both terms of
         dx = rstd * (dxhat - xhat * mean(dxhat * xhat)) carry it""")
def _(c):
    return {"dx": c.dxhat - c.xhat * (c.dxhat * c.xhat).mean(axis=-1, keepdims=True)}


@mistake("sum-not-mean", "sum(dxhat * xhat) over the row where the math has its mean (the 1/C is missing)",
         """ms = (1/C) sum_i x_i^2 brings the 1/C into d rstd/dx_j = -rstd^3 x_j / C, so the row's term is the
         mean of dxhat * xhat, not its sum""")
def _(c):
    return {"dx": dx_from(c, mean=np.sum)}


@mistake("term-sign", "+ xhat * mean(dxhat * xhat) where the math subtracts it",
         """Raising |x_j| raises the mean square, which lowers rstd and shrinks every xhat_i of the row:
         d rstd/dx_j = -rstd^3 x_j / C. That minus sign makes the term - rstd * xhat * mean(dxhat * xhat)""")
def _(c):
    return {"dx": dx_from(c, term=-1.0)}


@mistake("rstd-on-first-term-only", "rstd multiplies only the first term of dx (the same numbers as x for xhat there)",
         """dx = rstd * (dxhat - xhat * mean(dxhat * xhat)): both paths end in xhat = x * rstd, so both terms carry
         the factor rstd (the second one's rstd^3 x_j is rstd * rstd^2 x_j = rstd * rstd * xhat_j). Writing
         rstd * (dxhat - x * mean(dxhat * xhat)) gives the same numbers: x = xhat / rstd cancels one rstd""")
def _(c):
    return {"dx": c.rstd * c.dxhat - c.xhat * (c.dxhat * c.xhat).mean(axis=-1, keepdims=True)}


@mistake("x-for-xhat", "x used where xhat belongs in the rstd term's mean, or in dweight",
         """The term is - rstd * xhat_j * mean(dxhat * xhat): rstd^3 x_j sum_i dxhat_i x_i / C, with two of the
         rstd's turning x into xhat. Using x (the cache's first value) leaves those factors out""")
def _(c):
    return {"dx": [c.rstd * (c.dxhat - c.xhat * (c.dxhat * c.x).mean(axis=-1, keepdims=True)),
                   c.rstd * (c.dxhat - c.x * (c.dxhat * c.x).mean(axis=-1, keepdims=True))],
            "dweight": (c.dy * c.x).sum(axis=c.rows)}


@mistake("mean-wrong-axis", "the mean of dxhat * xhat taken over the wrong axis",
         """RMSNorm normalises each row of C values (the last axis) on its own: rstd is a mean over axis -1, so
         the term's mean(dxhat * xhat) is over axis -1 too, with keepdims=True""")
def _(c):
    return {"dx": [c.rstd * (c.dxhat - c.xhat * (c.dxhat * c.xhat).mean(axis=ax, keepdims=True)) for ax in c.rows]}


@mistake("dweight-no-xhat", "dweight without its factor xhat",
         """y = xhat * weight: the derivative of y by weight is xhat (the value weight multiplies), so
         dweight = sum over rows of dy * xhat""")
def _(c):
    return {"dweight": c.dy.sum(axis=c.rows)}


@mistake("dweight-times-weight", "dweight multiplied by weight",
         """d(xhat * weight)/d weight = xhat: the weight itself does not appear in its own gradient""")
def _(c):
    return {"dweight": (c.dy * c.xhat * c.weight).sum(axis=c.rows)}


@mistake("dweight-mean", "dweight averaged over the rows instead of summed",
         """weight is used at every one of the B*T rows, and each use adds its own contribution to the loss: the
         chain rule adds them up, dweight = sum of dy * xhat over the rows""")
def _(c):
    return {"dweight": (c.dy * c.xhat).mean(axis=c.rows)}


@mistake("dweight-sum-axis", "dweight summed over only some of the broadcast axes, or over C",
         """weight has shape [C] and is broadcast over every row, B and T alike: its gradient sums dy * xhat over
         axes (0, 1) and keeps the channel axis""")
def _(c):
    return {"dweight": [(c.dy * c.xhat).sum(axis=ax) for ax in (*c.rows, -1)]}
