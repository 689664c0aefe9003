"""Known mistakes in the online softmax (FlashAttention's forward).

For each query row, over the blocks of keys: m' = max(m, max_j s_j), and with the rescale
r = exp(m - m') of the sums made against the old maximum,
    l' = l r + sum_j exp(s_j - m'),     a' = a r + exp(s - m') V_blk;
after the last block out = a / l and lse = m + log l.

Each mistake is a wrong step or finish, run through the same loop as the learner's."""
from __future__ import annotations

import numpy as np

from tinygpt.exercises.catalogue import Context, recorder
from tinygpt.exercises.sheets.online_softmax import BLOCK

MISTAKES: list = []
mistake = recorder(MISTAKES)


def context(inputs, dout) -> Context:
    return Context(s=inputs["s"], v=inputs["v"])


def right_step(m, l, a, s, v):
    m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
    r, p = np.exp(m - m_new), np.exp(s - m_new)
    return m_new, l * r + p.sum(axis=-1, keepdims=True), a * r + p @ v


def right_finish(m, l, a):
    return a / l, (m + np.log(l))[..., 0]


def run(c, step=right_step, finish=right_finish) -> dict:
    B, Tq, Tk = c.s.shape
    m, l, a = np.full((B, Tq, 1), -np.inf), np.zeros((B, Tq, 1)), np.zeros((B, Tq, c.v.shape[-1]))
    with np.errstate(all="ignore"):
        for start in range(0, Tk, BLOCK):
            keys = slice(start, min(start + BLOCK, Tk))
            m, l, a = step(m, l, a, c.s[..., keys], c.v[..., keys, :])
        out, lse = finish(m, l, a)
    return {"out": out, "lse": lse}


def stepper(rescale_l=True, rescale_a=True, keep_l=True, keep_a=True, inverted=False, block_max=False, a_old_max=False,
            sum_all=False):
    """A step with one of its parts wrong."""
    def step(m, l, a, s, v):
        m_new = s.max(axis=-1, keepdims=True) if block_max else np.maximum(m, s.max(axis=-1, keepdims=True))
        r = np.exp(m_new - m) if inverted else np.exp(m - m_new)
        r = np.where(np.isfinite(m), r, 0.0)  # on the first block l = a = 0: a learner who guards m = -inf
        p = np.exp(s - m_new)
        old = np.where(np.isfinite(m), m, m_new)
        l_new = (l * (r if rescale_l else 1) if keep_l else 0) + (p.sum() if sum_all else p.sum(axis=-1, keepdims=True))
        a_new = (a * (r if rescale_a else 1) if keep_a else 0) + (np.exp(s - old) if a_old_max else p) @ v
        return m_new, l_new, a_new
    return step


def changed(c, **parts) -> dict:
    """The outputs the wrong step changes (lse only depends on m and l)."""
    wrong, right = run(c, stepper(**parts)), run(c)
    return {k: v for k, v in wrong.items() if not np.array_equal(v, right[k], equal_nan=True)}


@mistake("no-rescale", "l and a not rescaled by exp(m - m') when the maximum grows",
         """l and a were summed as exp(s_j - m) against the old maximum m. Once the maximum is m', each of those
         terms must become exp(s_j - m') = exp(s_j - m) exp(m - m'), so both sums are multiplied by
         r = exp(m - m') before the new block is added: l' = l r + sum exp(s - m'), a' = a r + exp(s - m') V""")
def _(c):
    return changed(c, rescale_l=False, rescale_a=False)


@mistake("rescale-l-only", "l rescaled by exp(m - m') but a not",
         """a = sum_j exp(s_j - m) v_j is summed against the same maximum as l, so it needs the same rescale
         exp(m - m') when the maximum grows; out = a / l is only right when both are on the same footing""")
def _(c):
    return changed(c, rescale_a=False)


@mistake("rescale-a-only", "a rescaled by exp(m - m') but l not",
         """l = sum_j exp(s_j - m) is summed against the running maximum like a, so it needs the same rescale
         exp(m - m') when the maximum grows""")
def _(c):
    return changed(c, rescale_l=False)


@mistake("rescale-inverted", "rescaled by exp(m' - m) instead of exp(m - m')",
         """exp(s_j - m') = exp(s_j - m) * exp(m - m'): the old sums shrink when the maximum grows (m' >= m, so
         exp(m - m') <= 1). exp(m' - m) grows them, and can overflow""")
def _(c):
    return changed(c, inverted=True)


@mistake("block-max-only", "m' = max of the new block only, forgetting the running maximum m",
         """m is the largest score seen so far, over every block: m' = max(m, max_j s_j). The block's own
         maximum can be smaller than m, and then exp(m - m') > 1 and the next blocks are summed against a
         maximum that is not the row's; and on a block wholly in a query's future it is -inf, so
         exp(s - m') = exp(-inf + inf) is NaN""")
def _(c):
    return changed(c, block_max=True)


@mistake("no-accumulate", "l or a replaced by the new block's sum instead of added to",
         """l and a are running sums over all the keys seen so far: each block adds its part to the (rescaled)
         sums of the blocks before, l' = l r + sum_j exp(s_j - m'). Without the old part, only the last block's
         keys are counted (none at all for a row whose last block is wholly in its future: then l = 0)""")
def _(c):
    return {k: [changed(c, **parts).get(k) for parts in ({"keep_l": False, "keep_a": False}, {"keep_l": False},
                                                           {"keep_a": False})]
            for k in ("out", "lse")}


@mistake("a-old-maximum", "a's new block weighted by exp(s - m) with the old maximum, l's by exp(s - m')",
         """Every term of l and a must be relative to the same maximum: after the update that is m', so the new
         block enters both as exp(s - m') (and on the first block the old m is -inf)""")
def _(c):
    return changed(c, a_old_max=True)


@mistake("no-division", "out = a: the division by l is missing",
         """a = sum_j exp(s_j - m) v_j is the numerator of softmax(s) V; the softmax's denominator is the sum of
         the same exps, l. out = a / l""")
def _(c):
    return {"out": run(c, finish=lambda m, l, a: (a, (m + np.log(l))[..., 0]))["out"]}


@mistake("lse-without-max", "lse = log(l): the maximum m is missing",
         """l = sum_j exp(s_j - m) = exp(-m) sum_j exp(s_j), so log sum_j exp(s_j) = m + log(l). log(l) alone is
         the log-sum-exp of the shifted scores""")
def _(c):
    return {"lse": run(c, finish=lambda m, l, a: (a / l, np.log(l)[..., 0]))["lse"]}


@mistake("lse-sign", "lse = m - log(l), or log(l) - m",
         """log sum_j exp(s_j) = log(exp(m) l) = m + log(l): the shift comes back with a plus, as a factor exp(m)""")
def _(c):
    return {"lse": [run(c, finish=lambda m, l, a: (a / l, (m - np.log(l))[..., 0]))["lse"],
                    run(c, finish=lambda m, l, a: (a / l, (np.log(l) - m)[..., 0]))["lse"]]}


@mistake("lse-without-log", "lse = m + l, or m * l, or log(m + l): the log of the sum is missing or misplaced",
         """lse is log sum_j exp(s_j) = log(exp(m) l) = m + log(l): the log applies to l alone""")
def _(c):
    return {"lse": [run(c, finish=lambda m, l, a: (a / l, f(m, l)[..., 0]))["lse"]
                    for f in (lambda m, l: m + l, lambda m, l: m * l, lambda m, l: np.log(m + l), lambda m, l: np.log(m * l))]}


@mistake("lse-is-max", "lse = m: the row's maximum, not its log-sum-exp",
         """The maximum is only the shift; the log-sum-exp adds log(l) = log sum_j exp(s_j - m), which is 0 only
         when a single key has all the weight""")
def _(c):
    return {"lse": run(c, finish=lambda m, l, a: (a / l, m[..., 0]))["lse"]}


@mistake("sum-no-axis", "l's new part summed over the whole block (p.sum() without axis=-1, keepdims=True)",
         """l is one number per query row: each row adds the exps of its own scores in the block,
         sum_j exp(s_j - m'), over the key axis (axis=-1, keepdims=True keeps the [B, Tq, 1] shape). p.sum() adds
         every row of every batch element into one number""")
def _(c):
    return changed(c, sum_all=True)
