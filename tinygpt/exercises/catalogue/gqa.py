"""Known mistakes in the grouped-query attention backward.

The attention backward against the repeated heads gives dq, dk_rep and dv_rep (see the
attention catalogue). Then the repeat: k_rep[:, h] = k[:, h // n], so head j of k is used by
the n query heads j n .. j n + n - 1, and receives the sum of their gradients:
    dk = dk_rep.reshape(B, H_kv, n, T, D).sum(axis=2)       (the same for v)
The attention step's own mistakes are here too, each followed by the right group sum."""
from __future__ import annotations

import numpy as np

from tinygpt.exercises.catalogue import Mistake, recorder
from tinygpt.exercises.catalogue import attention as att

MISTAKES: list = []
mistake = recorder(MISTAKES)


def context(inputs, dout):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    n = q.shape[1] // k.shape[1]
    c = att.context({"q": q, "k": np.repeat(k, n, axis=1), "v": np.repeat(v, n, axis=1)}, dout)
    c.n, c.H_kv = n, k.shape[1]
    c.dk_rep, c.dv_rep = att.T(c.dS) @ c.q * c.scale, att.T(c.P) @ c.dy
    return c


def grouped(a, n, reduce=np.sum):
    B, H, T, D = a.shape
    return reduce(a.reshape(B, H // n, n, T, D), axis=2)


@mistake("no-group-sum", "dk and dv returned for the repeated heads, [B, H, T, D]: the group sum is missing",
         """The attention backward gives the gradients of k_rep and v_rep, one per query head. But k and v have
         H_kv heads: the forward repeated head j n times (np.repeat(k, n, axis=1)), and the backward of a repeat
         is a sum, dk[:, j] = sum_{r < n} dk_rep[:, j n + r], which gives dk the shape of k""")
def _(c):
    return {"dk": c.dk_rep, "dv": c.dv_rep}


@mistake("group-mean", "each shared head gets the mean of its group's gradients, not the sum",
         """k_rep repeats head j of k n times: the same numbers are used by n query heads, and each use adds its
         own contribution to the loss. The chain rule adds them: dk_j = sum over the group of dk_rep, not the mean""")
def _(c):
    return {"dk": grouped(c.dk_rep, c.n, np.mean), "dv": grouped(c.dv_rep, c.n, np.mean)}


@mistake("first-head-only", "each shared head takes the gradient of one query head of its group (dk_rep[:, ::n])",
         """Picking one head of each group (dk_rep[:, ::n], or the last, dk_rep[:, n-1::n]) keeps one use of k_j
         and drops the other n - 1. A value used n times receives all n gradients: sum each group""")
def _(c):
    return {g: [rep[:, first::c.n] for first in (0, c.n - 1)] for g, rep in (("dk", c.dk_rep), ("dv", c.dv_rep))}


@mistake("strided-groups", "the groups taken as heads j, j + H_kv, j + 2 H_kv, ... (np.tile's order), not j n .. j n + n - 1",
         """np.repeat(k, n, axis=1) puts the copies of head j next to each other: query heads j n, ..., j n + n - 1
         (Hugging Face's repeat_kv does the same). Summing every H_kv-th head (reshape(B, n, H_kv, T, D).sum(1))
         undoes np.tile instead, and mixes the groups""")
def _(c):
    B, H, T, D = c.dk_rep.shape
    return {g: rep.reshape(B, c.n, H // c.n, T, D).sum(axis=1) for g, rep in (("dk", c.dk_rep), ("dv", c.dv_rep))}


@mistake("sum-over-all-heads", "every shared head gets the sum over all H query heads",
         """Head j of k is used only by its own group of n query heads (h // n = j); the other groups read other
         key/value heads and send them nothing""")
def _(c):
    out = {}
    for g, rep in (("dk", c.dk_rep), ("dv", c.dv_rep)):
        total = rep.sum(axis=1, keepdims=True)
        out[g] = [np.repeat(total, c.H_kv, axis=1), total]
    return out


@mistake("group-sum-scaled", "the group sum divided by H, the number of query heads",
         """The gradient of a value used n times is the plain sum of its n gradients: there is no average, and
         neither the number of query heads nor of key/value heads appears""")
def _(c):
    H = c.dk_rep.shape[1]
    return {g: grouped(rep, c.n) / H for g, rep in (("dk", c.dk_rep), ("dv", c.dv_rep))}


@mistake("dq-grouped", "dq summed over the groups too",
         """Only k and v are shared: every query head has its own q, used once, so dq is the attention's dq as it
         is, [B, H, T, D]""")
def _(c):
    return {"dq": [grouped(c.dS @ c.k * c.scale, c.n), np.repeat(grouped(c.dS @ c.k * c.scale, c.n), c.n, axis=1)]}


@mistake("group-sum-repeated-back", "the group sum repeated back to all H heads (the forward's repeat applied again)",
         """The forward repeats; its backward sums. After the sum, dk has the shape of k, [B, H_kv, T, D]: repeating
         it again gives the gradient of k_rep that k would have if every query head used all its group's keys""")
def _(c):
    return {g: np.repeat(grouped(rep, c.n), c.n, axis=1) for g, rep in (("dk", c.dk_rep), ("dv", c.dv_rep))}


def _attention_step(m):
    """An attention mistake, followed by the right group sum of dk and dv."""
    def wrong(c):
        out = m.wrong(c)
        return {g: [grouped(np.asarray(v), c.n) if g != "dq" and np.shape(v) == c.dk_rep.shape else v
                    for v in (values if isinstance(values, list) else [values])]
                for g, values in out.items()}
    return Mistake(f"attention-{m.key}", f"in the attention step: {m.title}", m.lesson, wrong)


MISTAKES += [_attention_step(m) for m in att.MISTAKES]

