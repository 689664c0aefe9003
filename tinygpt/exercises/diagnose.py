"""Name the mistake behind each wrong gradient, and say only what was verified.

For each wrong gradient, in this order:
  1. not finite: where the NaN / inf is, and the learner's line where numpy first made one;
  2. in an exercise of several steps (the block, the MLP): right given the gradients it is
     computed from? Then it only inherits their error (the data flow of the forward decides
     which those are: a parameter's gradient feeds nothing);
  3. two gradients swapped;
  4. the exercise's catalogue of known mistakes, one at a time and in pairs;
  5. the pattern recognisers of hints.py (a factor, a transpose, a missing sum, ...);
  6. otherwise: where the wrong elements lie, and what was tried.
Each gradient gets `where` (hint level 1) and `hint` (level 2)."""
from __future__ import annotations

import itertools

import numpy as np

from tinygpt.exercises import catalogue, hints
from tinygpt.exercises.catalogue import Context


def diagnose(exercise, grads: list, theirs: dict, expected: dict, inputs, dout, fp) -> str | None:
    """Fill in where / hint / mistake / inherits of every wrong GradResult in `grads`; return
    the first gradient, in data-flow order, that is wrong on its own (None for one-step ops)."""
    wrong = [g for g in grads if g.status == "wrong"]
    if not wrong:
        return None
    module = catalogue.load(exercise.name)
    ctx = module.context(inputs, dout) if module else Context(dy=np.asarray(dout))
    usable = {n: a for n, a in theirs.items() if a is not None and a.shape == expected[n].shape and np.isfinite(a).all()}
    ctx.d = {"out": np.asarray(dout), **{n: usable.get(n, expected[n]) for n in expected}}
    flow = exercise.flow or {}
    local = {n: flow[n][1](ctx.d, ctx) if n in flow else expected[n] for n in expected}
    wrong_names = {g.name for g in wrong}
    candidates = _Candidates(module, ctx)
    for g in wrong:
        if g.problem:
            continue
        case = hints.Case(g.name, exercise.dims, inputs, dout)
        t, e = theirs[g.name], local[g.name]
        regions = exercise.regions(g.name, inputs) if exercise.regions else []
        g.where = where(t, e, case, regions)
        if not np.isfinite(t).all():
            g.where = not_finite(t, case, regions)
            fed = [u for u in flow.get(g.name, ((), None))[0] if theirs.get(u) is not None and not np.isfinite(theirs[u]).all()]
            if fed:
                g.inherits = tuple(fed)
                g.where += f"; it is computed from your {_names(fed)}, which {'is' if len(fed) == 1 else 'are'} not finite either"
            g.hint = g.where + (f"; numpy first reported {fp}" if fp and not fed else "")
            found = None if fed else candidates.not_finite_match(g.name, t)
            if found is not None:
                g.hint += f". A catalogued mistake gives these very numbers, non-finite ones included: {found.text()}"
                g.mistake = found.key
            continue
        upstream = [u for u in flow.get(g.name, ((), None))[0] if u in wrong_names]
        if upstream and hints.same(t, e):
            g.inherits = tuple(upstream)
            g.where = g.hint = (f"right given your {_names(upstream)}: {g.name} is computed from "
                                f"{'it' if len(upstream) == 1 else 'them'} and only inherits the error")
            continue
        g.hint, g.mistake = _swapped(g.name, t, theirs, expected, wrong_names, flow, both_ways=True)
        if g.hint is None:
            g.hint, g.mistake = candidates.match(g.name, t, e, case)
        if g.hint is None:
            g.hint, g.mistake = _swapped(g.name, t, theirs, expected, wrong_names, flow, both_ways=False)
        if g.hint is None:
            g.hint = hints.hint(t, e, case, exercise.hints) or _fallback(g.name, t, e, g.where, candidates)
    origins = [g.name for g in wrong if not g.inherits]
    return origins[0] if flow and origins else None


def _names(names) -> str:
    return " and ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " and " + names[-1]


def _swapped(name, t, theirs, expected, wrong_names, flow, both_ways: bool):
    """Yours `name` is the (right) gradient of another one: both ways round is a swap. A step
    that passes its gradient on unchanged (att_out = x1's) is no candidate."""
    for other in sorted((wrong_names if both_ways else set(expected)) - {name}):
        if other in flow.get(name, ((),))[0] or name in flow.get(other, ((),))[0]:
            continue
        o = theirs.get(other)
        if t.shape == expected[other].shape and hints.same(t, expected[other]):
            if o is not None and o.shape == expected[name].shape and hints.same(o, expected[name]):
                return (f"{name} and {other} are swapped: yours {name} is the gradient of {other}, and yours {other} is "
                        f"the gradient of {name}. Check the order you return them in (or which input each line uses)"), "swapped"
            if not both_ways:
                return (f"yours {name} is the gradient of {other}: is it computed from the wrong input, or returned in "
                        "its place?"), "swapped"
    return None, None


class _Candidates:
    """The catalogue's wrong gradients on the check's inputs, computed once, then matched."""

    def __init__(self, module, ctx):
        self.mistakes = list(module.MISTAKES) if module else []
        self.ctx, self._cache = ctx, None

    def of(self, name: str, finite: bool = True) -> list:
        """(mistake, value) for `name`: the finite values, or (finite=False) those with a NaN or inf."""
        if self._cache is None:
            with np.errstate(all="ignore"):
                self._cache = [(m, m.wrong(self.ctx)) for m in self.mistakes]
        out = []
        for m, wrong in self._cache:
            value = wrong.get(name)
            for v in value if isinstance(value, list) else [] if value is None else [value]:
                v = np.asarray(v, dtype=np.float64)
                if np.isfinite(v).all() == finite:  # a mistake that makes NaN or inf cannot match a finite gradient
                    out.append((m, v))
        return out

    def not_finite_match(self, name: str, t):
        """The mistake whose value has NaN and inf exactly where yours has them, and yours elsewhere."""
        for m, v in self.of(name, finite=False):
            if v.shape == t.shape and np.array_equal(np.isnan(v), np.isnan(t)):
                finite = np.isfinite(v)
                if np.array_equal(finite, np.isfinite(t)) and np.array_equal(v[np.isinf(v)], t[np.isinf(t)]) \
                        and hints.same(t[finite], v[finite]):
                    return m
        return None

    def match(self, name: str, t, e, case=None) -> tuple:
        singles = self.of(name)
        for m, v in singles:
            if v.shape == t.shape and hints.same(t, v):
                return m.text(), m.key
        same_shape = [(m, v) for m, v in singles if v.shape == e.shape == t.shape]
        for (m1, v1), (m2, v2) in itertools.combinations(same_shape, 2):
            if m1.key != m2.key and hints.same(t, v1 + v2 - e):
                return (f"two mistakes at once: {m1.title}; and {m2.title}. {m1.lesson} {m2.lesson}",
                        f"{m1.key}+{m2.key}")
        return self._scaled(t, e, singles, case)

    @staticmethod
    def _scaled(t, e, singles, case) -> tuple:
        """A catalogued mistake times a constant the recogniser can name (a sign, 1/N, 2, ...),
        for mistakes that are not themselves a constant times the right gradient."""
        for m, v in singles:
            if v.shape != t.shape or v.shape != e.shape or not np.any(v) or hints.constant_factor(v, e, case):
                continue
            factor = hints.constant_factor(t, v, case)
            if factor and not factor.startswith("off by the upstream"):
                return f"{m.title}, and on top of it {factor.replace('expected', 'that')}. {m.lesson}", m.key
        return None, None

    def count(self, name: str) -> int:
        return len({m.key for m, _ in self.of(name)})


def _fallback(name, t, e, where_text, candidates) -> str:
    tried = ["a constant factor", "every transpose that keeps its shape", "a missing chain-rule factor"]
    if candidates.count(name):
        tried.insert(0, f"the {candidates.count(name)} catalogued mistakes for {name} (one at a time and in pairs)")
    if t.shape != e.shape:
        tried = ["every transpose", "a sum over a broadcast axis", "a reshape"] + tried[:1]
    return (f"{hints.GENERIC}: {where_text}. Tried {_names(tried)}: none gives yours. Work out the worst element by "
            "hand from the forward's math")


# ------------------------------------------------------------------ where the wrong elements are


def where(t, e, case, regions: list) -> str:
    """Where the wrong elements lie: a named region, the diagonal, one index of one axis, or how many."""
    if t.shape != e.shape:
        return f"wrong shape: yours has shape {t.shape}, {case.grad} must have shape {e.shape}"
    scale = max(float(np.abs(e).max(initial=0.0)), 1e-12)
    bad = ~(np.abs(t - e) <= 1e-6 * scale + 1e-5 * np.abs(e))
    zeros = " (yours is 0 at every one of them: computed but never written there?)" if bad.any() and not t[bad].any() else ""
    return _locate(bad, case, regions, "wrong") + zeros


def not_finite(t, case, regions) -> str:
    bad = ~np.isfinite(t)
    kinds = " and ".join(k for k, m in (("NaN", np.isnan(t)), ("inf", np.isinf(t))) if m.any())
    first = [int(i) for i in np.argwhere(bad)[0]]
    return f"not finite ({kinds}): {_locate(bad, case, regions, 'not finite')}; the first at {first}"


def _locate(bad, case, regions, word: str) -> str:
    n, total = int(bad.sum()), bad.size
    if n == total:
        return f"all {total} elements are {word}"
    for label, mask in regions:
        if np.array_equal(bad, mask):
            return f"exactly {label} are {word} ({n} of {total} elements), the rest is right"
        if not bad[~mask].any():
            return f"{n} of {total} elements are {word}, all of them {label}"
    if bad.ndim >= 2 and bad.shape[-1] == bad.shape[-2]:
        diagonal = np.broadcast_to(np.eye(bad.shape[-1], dtype=bool), bad.shape)
        if not bad[~diagonal].any():
            return f"{n} of {total} elements are {word}, all on the diagonal of the last two axes"
    for axis in range(bad.ndim):
        index = np.unique(np.nonzero(bad)[axis])
        if len(index) == 1 and bad.shape[axis] > 1:
            size = bad.shape[axis]
            name = hints._dim_name(size, case).removeprefix(" = ")
            what = {"B": "batch row", "N": "row", "H": "head", "T": "position", "V": "row"}.get(name, "index")
            return (f"{n} of {total} elements are {word}, all in {what} {int(index[0])} of axis {axis} "
                    f"(size {size}{' = ' + name if name else ''}); the other {what}s are right")
    return f"{n} of {total} elements are {word}, at more than one index of every axis"
