"""Known mistakes in the linear backward.

The derivation: y[n, o] = sum_i x[n, i] W[o, i] + b[o] over every row n = (b, t). So
dx[n, i] = sum_o dy[n, o] W[o, i] (dx = dy @ W), dW[o, i] = sum_n dy[n, o] x[n, i] (dW = dy^T x over
all rows), db[o] = sum_n dy[n, o]."""
from __future__ import annotations

import numpy as np

from tinygpt.exercises.catalogue import Context, recorder

MISTAKES: list = []
mistake = recorder(MISTAKES)


def context(inputs, dout) -> Context:
    x, W = inputs["x"], inputs["W"]
    dy = np.asarray(dout)
    return Context(x=x, W=W, dy=dy, xr=x.reshape(-1, x.shape[-1]), dyr=dy.reshape(-1, dy.shape[-1]))


@mistake("dW-transposed", "dW = x^T dy, the transpose: W is stored [out, in]",
         """dW[o, i] = sum_n dy[n, o] x[n, i]: the first index of dW is the output o, as in W's [out, in]
         layout, so dW = dy_rows.T @ x_rows. x_rows.T @ dy_rows is its transpose, [in, out]""")
def _(c):
    return {"dW": c.xr.T @ c.dyr}


@mistake("dW-one-row", "dW from one batch element only (dy[0].T @ x[0], or the last one of a loop)",
         """W is used at every row n = (b, t) of every batch element, so dW sums dy[n]^T x[n] over all of them.
         Taking one batch element, or a loop that assigns dW = ... instead of adding dW += ..., keeps one""")
def _(c):
    return {"dW": [c.dy[b].T @ c.x[b] for b in range(c.x.shape[0])]
            + [c.dy[:, t].T @ c.x[:, t] for t in range(c.x.shape[1])]}


@mistake("dW-mean", "dW averaged over the rows instead of summed",
         """Every row uses W and adds its own contribution to the loss; the chain rule adds them up:
         dW = sum_n dy[n]^T x[n], no division by the number of rows""")
def _(c):
    return {"dW": [c.dyr.T @ c.xr / len(c.xr), c.dyr.T @ c.xr / c.x.shape[0], c.dyr.T @ c.xr / c.x.shape[1]]}


@mistake("no-dy", "the local derivative without the upstream gradient dy",
         """backward gets dy = dL/dy and must return dL/dx = dy @ W, dL/dW = dy^T x, dL/db = sum dy: the
         chain rule multiplies by dy. Without it you have dy/dx alone (W summed, x summed, ones)""")
def _(c):
    ones = np.ones_like(c.dyr)
    return {"dx": np.ones_like(c.dy) @ c.W, "dW": ones.T @ c.xr, "db": [ones.sum(axis=0), np.ones_like(c.W[:, 0])]}


@mistake("dx-times-x", "dx multiplied by x, as if y were x * W elementwise",
         """y = x W^T is a matrix product: dy/dx[n, i] = W[o, i], with no x in it. dx = dy @ W""")
def _(c):
    return {"dx": (c.dy @ c.W) * c.x}


@mistake("dx-with-W-sum", "dx from the sums of W (dy.sum(-1, keepdims=True) * W.sum(0)): products taken apart",
         """dx[n, i] = sum_o dy[n, o] W[o, i] pairs each dy[n, o] with its own W[o, i]: a matrix product, not
         the product of two sums""")
def _(c):
    return {"dx": c.dy.sum(axis=-1, keepdims=True) * c.W.sum(axis=0)}


@mistake("db-some-axes", "db summed over only one of the broadcast axes (B or T)",
         """b is added at every (b, t) position, so its gradient is the sum of dy over both: axis (0, 1)""")
def _(c):
    return {"db": [c.dy.sum(axis=0), c.dy.sum(axis=1)]}


@mistake("db-sum-all", "db = dy.sum(): summed over the output axis too",
         """db has one value per output feature o: db[o] = sum over rows of dy[n, o]. Summing over o as well
         adds the gradients of different biases together""")
def _(c):
    return {"db": [np.full(c.W.shape[0], c.dy.sum()), np.array(c.dy.sum())]}


@mistake("db-mean", "db averaged over the rows instead of summed",
         """b is added at each of the B*T rows and each use contributes: db = dy.sum(axis=(0, 1))""")
def _(c):
    return {"db": [c.dy.mean(axis=(0, 1)), c.dy.sum(axis=(0, 1)) / c.x.shape[0], c.dy.sum(axis=(0, 1)) / c.x.shape[1]]}


@mistake("db-wrong-axis", "db summed over the output axis (-1) instead of over the rows",
         """db[o] keeps the output axis and sums over the rows: dy.sum(axis=(0, 1)), shape [OUT]""")
def _(c):
    return {"db": [c.dy.sum(axis=-1), c.dy.sum(axis=(1, 2)), c.dy.sum(axis=(0, 2))]}


@mistake("dW-from-W", "dW computed with W in it (dy^T x W or W * ...)",
         """y[n, o] = sum_i x[n, i] W[o, i] is linear in W: its derivative by W[o, i] is x[n, i], with no W""")
def _(c):
    return {"dW": (c.dyr.T @ c.xr) * c.W}


@mistake("dW-first-row-only", "dW from the first row (dy[0, 0] and x[0, 0]) only",
         """Every one of the B*T rows uses W: dW = sum over all rows of outer(dy[n], x[n])""")
def _(c):
    return {"dW": np.outer(c.dyr[0], c.xr[0])}
