"""Known mistakes in the softmax backward.

The derivation: y_i = exp(x_i) / sum_k exp(x_k) gives the Jacobian dy_i/dx_j = y_i (delta_ij - y_j),
so dx_j = sum_i dy_i y_i (delta_ij - y_j) = y_j dy_j - y_j sum_i dy_i y_i = y_j (dy_j - s), s = sum_i dy_i y_i."""
from __future__ import annotations

import numpy as np

from tinygpt.exercises.catalogue import Context, recorder

MISTAKES: list = []
mistake = recorder(MISTAKES)


def context(inputs, dout) -> Context:
    x = inputs["x"]
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    y = e / e.sum(axis=-1, keepdims=True)
    dy = np.asarray(dout)
    return Context(x=x, y=y, dy=dy, s=(dy * y).sum(axis=-1, keepdims=True))


@mistake("no-sum-term", "the term - y_j sum_i dy_i y_i is missing (yours is y * dy)",
         """y * dy keeps only the delta_ij y_i part of the Jacobian dy_i/dx_j = y_i (delta_ij - y_j): the part from
         x_j in the numerator of y_j. But every y_i of the row has x_j in its denominator sum_k exp(x_k), so
         moving x_j moves all of them. The
         - y_i y_j part, summed against dy_i, gives - y_j sum_i dy_i y_i. The full line: dx = y * (dy - (dy * y).sum(-1, keepdims=True))""")
def _(c):
    return {"dx": c.y * c.dy}


@mistake("no-diagonal", "the diagonal term y_j dy_j of the Jacobian is missing (yours is only - y * sum(dy * y))",
         """The Jacobian dy_i/dx_j = y_i (delta_ij - y_j) has two parts: delta_ij y_i, which is there only when
         i = j (x_j is in the numerator of y_j alone), and - y_i y_j, which every output has. Yours kept the
         second and dropped the first: dx_j = y_j dy_j - y_j sum_i dy_i y_i = y * (dy - s)""")
def _(c):
    return {"dx": -c.y * c.s}


@mistake("sum-dy-not-weighted", "sum(dy) where the math has sum(dy * y)",
         """The per-row term is s = sum_i dy_i y_i: it comes from summing dy_i times the off-diagonal Jacobian
         entries - y_i y_j over i, so each dy_i carries its y_i. sum(dy) leaves the y_i out. dx = y * (dy - s)""")
def _(c):
    return {"dx": c.y * (c.dy - c.dy.sum(axis=-1, keepdims=True))}


@mistake("mean-not-sum", "a mean over the row where the math has a sum: mean(dy * y) for sum(dy * y)",
         """s = sum_i dy_i y_i adds the contribution of every output y_i of the row to x_j; it is a sum over i
         because the chain rule sums over every path from x_j to the loss, not an average""")
def _(c):
    return {"dx": c.y * (c.dy - (c.dy * c.y).mean(axis=-1, keepdims=True))}


@mistake("sum-wrong-axis", "the sum s = sum_i dy_i y_i taken over the wrong axis",
         """The softmax normalises along the last axis, so y_i and x_j interact only within one row: s sums
         over the last axis (axis=-1, keepdims=True). Summing over another axis mixes rows that never met""")
def _(c):
    return {"dx": [c.y * (c.dy - (c.dy * c.y).sum(axis=a, keepdims=True)) for a in (0, 1)]
            + [c.y * (c.dy - (c.dy * c.y).sum())]}


@mistake("diagonal-only", "only the diagonal of the Jacobian, y (1 - y) dy, as for a sigmoid",
         """y_j (1 - y_j) is dy_j/dx_j, the diagonal entry. A sigmoid's outputs are independent so that is all it
         needs, but a softmax's outputs share one denominator: dy_i/dx_j = - y_i y_j for i != j as well.
         Summed over i the off-diagonal part gives dx = y * (dy - sum(dy * y))""")
def _(c):
    return {"dx": c.y * (1 - c.y) * c.dy}


@mistake("plus-sum", "+ sum(dy * y) where the math subtracts it",
         """The off-diagonal Jacobian entries are - y_i y_j: raising x_j raises the shared denominator and lowers
         every other output. So the per-row term is subtracted: dx = y * (dy - s)""")
def _(c):
    return {"dx": c.y * (c.dy + c.s)}


@mistake("x-for-y", "the input x used where the softmax output y belongs",
         """The Jacobian of softmax is written with its output: dy_i/dx_j = y_i (delta_ij - y_j). The cache
         saves y for exactly this; x appears nowhere in the backward""")
def _(c):
    return {"dx": c.x * (c.dy - (c.dy * c.x).sum(axis=-1, keepdims=True))}


@mistake("no-outer-y", "the factor y_j in front is missing: dy - sum(dy * y)",
         """Both parts of dy_i/dx_j = y_i (delta_ij - y_j) carry a y: summed against dy_i they give
         y_j dy_j - y_j s. The y_j factors out: dx = y * (dy - s), not dy - s""")
def _(c):
    return {"dx": c.dy - c.s}


@mistake("log-softmax-backward", "the backward of log_softmax (dy - y * sum(dy)), not of softmax",
         """For z = log softmax(x), dz_i/dx_j = delta_ij - y_j, so dx = dy - y * sum(dy). For y = softmax(x)
         itself the Jacobian is y_i (delta_ij - y_j): dx = y * (dy - sum(dy * y))""")
def _(c):
    return {"dx": c.dy - c.y * c.dy.sum(axis=-1, keepdims=True)}


@mistake("s-without-dy", "sum(y) where the math has sum(dy * y) (and sum(y) is 1)",
         """The per-row term is s = sum_i dy_i y_i: each output's share of the shared denominator, weighted by
         how much the loss cares about that output, dy_i. Without dy_i it is sum_i y_i, which is always 1""")
def _(c):
    return {"dx": c.y * (c.dy - c.y.sum(axis=-1, keepdims=True))}
