"""Known mistakes in the embedding backward.

The derivation: y[b, t] = W[ids[b, t]], a copy of one row. Row v of W is copied to every
position whose id is v, so dW[v] = sum of dy[b, t] over those positions (zero for unused ids)."""
from __future__ import annotations

import numpy as np

from tinygpt.exercises.catalogue import Context, recorder

MISTAKES: list = []
mistake = recorder(MISTAKES)


def context(inputs, dout) -> Context:
    W, ids = inputs["W"], inputs["ids"]
    dy = np.asarray(dout)
    dW = np.zeros_like(W)
    np.add.at(dW, ids, dy)
    counts = np.bincount(ids.reshape(-1), minlength=W.shape[0])[:, None]
    return Context(W=W, ids=ids, dy=dy, dW=dW, counts=counts)


def scatter(c, ids, dy):
    out = np.zeros_like(c.W)
    np.add.at(out, ids, dy)
    return out


@mistake("no-add-at", "dW[ids] += dy (or = dy): a repeated id keeps one position, not the sum",
         """With fancy indexing, dW[ids] += dy reads dW[ids], adds and writes back once per index array: when an
         id appears twice both writes land in the same row and the last wins. The row of a repeated id must add
         the dy of every position that used it: np.add.at(dW, ids, dy) does""")
def _(c):
    last, first = np.zeros_like(c.W), np.zeros_like(c.W)
    last[c.ids] += c.dy
    for b, t in reversed(list(np.ndindex(c.ids.shape))):
        first[c.ids[b, t]] = c.dy[b, t]
    return {"dW": [last, first]}


@mistake("dW-is-dy", "dy returned as dW: it has the output's shape, not W's",
         """dW must have W's shape [V, C]: one row per vocabulary entry. dy has one row per position; it has to be
         scattered back into the rows the positions looked up""")
def _(c):
    return {"dW": [c.dy, c.dy.reshape(-1, c.dy.shape[-1])]}


@mistake("times-W", "dy multiplied by W's rows, as if the lookup were a product",
         """y = W[ids] copies rows: dy/dW[v] is 1 at each position that picked v (the one-hot row), with no W
         in it. So dW[v] = sum of dy there, not dy * W[v]""")
def _(c):
    return {"dW": scatter(c, c.ids, c.dy * c.W[c.ids])}


@mistake("misaligned", "ids and dy flattened in different orders, so positions are paired wrongly",
         """Each position's dy belongs to that position's id: flatten both in the same order
         (ids.reshape(-1) with dy.reshape(-1, C)); transposing one of them pairs dy[b, t] with ids[t, b]""")
def _(c):
    C = c.dy.shape[-1]
    return {"dW": [scatter(c, c.ids.reshape(-1), c.dy.swapaxes(0, 1).reshape(-1, C)),
                   scatter(c, c.ids.T.reshape(-1), c.dy.reshape(-1, C))]}


@mistake("mean-over-uses", "each row averaged over the positions that used it, not summed",
         """Every position that used row v adds its own part to the loss; the chain rule sums them: dW[v] is
         the sum of dy over those positions, not their mean""")
def _(c):
    return {"dW": c.dW / np.maximum(c.counts, 1)}


@mistake("counts-not-dy", "counts of the ids instead of the upstream gradient",
         """dW[v] = sum of dy[b, t] over the positions with ids[b, t] = v: the one-hot row times dy. Counting the
         positions is that sum with dy replaced by 1: the chain rule's factor dy is missing""")
def _(c):
    return {"dW": [np.broadcast_to(c.counts, c.W.shape).astype(float), scatter(c, c.ids, np.ones_like(c.dy))]}


@mistake("one-batch-row", "only one batch element (or a loop that overwrites dW instead of adding)",
         """Every position of every batch element adds to dW. A loop doing dW = ... per batch element keeps
         the last; add into one dW for all of them""")
def _(c):
    return {"dW": [scatter(c, c.ids[b], c.dy[b]) for b in range(c.ids.shape[0])]}


@mistake("mean-over-positions", "dW divided by the number of positions (B*T, or B)",
         """The loss's gradient dL/dy already carries any averaging the loss does; the lookup only routes dy
         back to the rows it read, so nothing is divided here""")
def _(c):
    B, T = c.ids.shape
    return {"dW": [c.dW / (B * T), c.dW / B, c.dW / T]}


@mistake("one-hot-transposed", "the one-hot product in the wrong order: dy^T @ onehot, shape [C, V]",
         """With onehot [B*T, V], y = onehot @ W, so dW = onehot^T @ dy_rows, shape [V, C] like W""")
def _(c):
    return {"dW": c.dW.T}


@mistake("starts-from-W", "dW started from a copy of W instead of zeros",
         """dW accumulates the gradient; it must start at zero (np.zeros_like(W)). Starting from W.copy() adds
         W to the gradient""")
def _(c):
    return {"dW": c.W + c.dW}
