"""Name the mistake behind a wrong gradient from the pattern of its error.

Each recogniser looks at `theirs` against `expected` (the engine's gradient) and returns a
one-line hint, or None when the pattern is not its own. They are tried from the most
specific to the most general; `hint` returns the first that fits."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from fractions import Fraction

import numpy as np


GENERIC = "no simple pattern"  # how the hint starts when no recogniser fits


@dataclass
class Case:
    """What a recogniser may look at besides the two gradients."""
    grad: str           # the gradient's name, e.g. "dW"
    dims: dict          # the named sizes of the check, e.g. {"B": 2, "T": 3}
    inputs: dict        # the forward's inputs
    dout: object        # the upstream gradient


def same(a, b) -> bool:
    """a equals b up to the rounding of a correct float64 (or careful float32) computation."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False
    finite = np.isfinite(b)  # an inf in b must not make the tolerance infinite: non-finite values must be equal
    scale = max(float(np.abs(b[finite]).max(initial=0.0)), 1e-12)
    with np.errstate(invalid="ignore"):
        close = np.abs(a - b) <= 1e-6 * scale + 1e-5 * np.abs(b)
    return bool(np.all(np.where(finite, close, a == b)))


def hint(theirs: np.ndarray, expected: np.ndarray, case: Case, extra=()) -> str | None:
    """The first recogniser's hint that fits, or None."""
    if theirs.shape != expected.shape:
        found = shape_hint(theirs, expected, case)
        return None if found.startswith("wrong shape") else found
    for recognise in (all_zero, *extra, constant_factor, transposed, chain_rule):
        found = recognise(theirs, expected, case)
        if found:
            return found
    return None


def dtype_problem(name: str, dtype) -> tuple:
    """(problem, note) for a gradient of this dtype: float64 is what the check expects."""
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        return (f"{name} is complex ({dtype}): the gradient of a real loss is real. Where do complex numbers come "
                "from (np.sqrt of a negative number, a 1j)? Return a float64 array"), None
    if dtype.kind in "biu":
        return (f"{name} has dtype {dtype}: integers cannot hold a gradient (np.zeros_like of an integer array?). "
                "Make it float64, the dtype of dy"), None
    if dtype.kind != "f":
        return f"{name} has dtype {dtype}: not floating-point numbers. Make it float64, the dtype of dy", None
    if dtype.kind == "f" and dtype.itemsize < 4:
        return (f"{name} is {dtype}: half precision keeps about 3 digits, too few for a gradient to be checked "
                "(or trusted). Compute it in float64, the dtype of dy"), None
    if dtype == np.float32:
        return None, (f"{name} is float32: accepted, but dy and the cache are float64, so somewhere yours was cast "
                      "down; it is compared to float32's 7 digits")
    return None, None


def transposed(theirs, expected, case: Case):
    """Every order of the axes that keeps the shape, tried."""
    for perm in itertools.permutations(range(theirs.ndim)):
        if list(perm) != sorted(perm) and theirs.transpose(perm).shape == expected.shape and same(theirs.transpose(perm), expected):
            what = "yours.T" if theirs.ndim == 2 else f"yours.transpose{perm}"
            return f"transposed: {what} is the right gradient. Check the order of the factors in the matrix product"
    return None


# ------------------------------------------------------------------ wrong shape


def shape_hint(theirs, expected, case: Case) -> str:
    shapes = f"yours has shape {theirs.shape}, {case.grad} must have shape {expected.shape}"
    if theirs.ndim == expected.ndim and theirs.ndim > 1:
        for perm in itertools.permutations(range(theirs.ndim)):
            if theirs.transpose(perm).shape == expected.shape and same(theirs.transpose(perm), expected):
                what = "yours.T" if theirs.ndim == 2 else f"yours.transpose{perm}"
                return f"transposed: {shapes}, and {what} is the right gradient. Check the order in your matrix product"
    axes = _broadcast_axes(theirs.shape, expected.shape)
    if axes is not None and same(theirs.sum(axis=axes).reshape(expected.shape), expected):
        sizes = ", ".join(f"{theirs.shape[a]}{_dim_name(theirs.shape[a], case)}" for a in axes)
        return (f"missing the sum over a broadcast axis: {shapes}; summed over axis {', '.join(map(str, axes))} "
                f"(size {sizes}) it is right. The forward used the value at every position along that axis, so its "
                f"gradient adds up all of them")
    axes = _broadcast_axes(expected.shape, theirs.shape)
    if axes is not None and same(expected.sum(axis=axes).reshape(theirs.shape), theirs):
        return f"summed over an axis that must stay: {shapes}; yours is the right gradient summed over axis {', '.join(map(str, axes))}"
    if theirs.size == expected.size and same(theirs.reshape(expected.shape), expected):
        return f"right numbers, wrong shape: {shapes}. Reshape it (or drop keepdims) to {expected.shape}"
    return f"wrong shape: {shapes}"


def _broadcast_axes(big, small):
    """The axes of shape `big` that broadcasting `small` to it would expand, or None when
    small does not broadcast to big (or expands nothing)."""
    if len(small) > len(big):
        return None
    padded = (1,) * (len(big) - len(small)) + tuple(small)
    if any(s not in (1, b) for s, b in zip(padded, big)):
        return None
    axes = tuple(i for i, (s, b) in enumerate(zip(padded, big)) if s == 1 and b > 1)
    return axes or None


def _dim_name(n: int, case: Case) -> str:
    names = [name for name, size in _products(case.dims) if size == n]
    return f" = {names[0]}" if names else ""


def _products(dims: dict):
    """(name, size) for every product of distinct named sizes: ("B", 2), ..., ("B*T", 6), ..."""
    for r in range(1, len(dims) + 1):
        for combo in itertools.combinations(dims.items(), r):
            yield "*".join(n for n, _ in combo), int(np.prod([s for _, s in combo]))


# ------------------------------------------------------------------ right shape


def all_zero(theirs, expected, case: Case):
    if not np.any(theirs) and np.any(expected):
        return "yours is all zeros: is the gradient computed but never written into the array you return?"
    return None


def constant_factor(theirs, expected, case: Case):
    """theirs = k * expected for one number k: name k (sign, 1/N for a dim N, sqrt(D), ...)."""
    k = float((theirs * expected).sum() / (expected * expected).sum())
    if not np.isfinite(k) or abs(k) < 1e-12 or not same(theirs, k * expected):
        return None
    if abs(k + 1) < 1e-6:
        return "sign flipped: yours = -expected. Check the sign of each term you subtract"
    if np.ndim(case.dout) == 0 and abs(k * float(case.dout) - 1) < 1e-6:
        return f"off by the upstream gradient: yours = expected / dloss ({float(case.dout):g}). Multiply by dloss: the chain rule"
    for name, n in _products(case.dims):
        if n > 2 and abs(k * n - 1) < 1e-6:  # a 2 is as likely a dropped 0.5 as a size
            return (f"off by a factor 1/{n} ({n} = {name}): yours = expected / {n}. A division by {name} too many: "
                    f"a mean where the math has a sum, or a mean divided a second time?")
    sign = "-" if k < 0 else ""
    for name, n in _products(case.dims):
        for root, value in ((f"sqrt({name})", np.sqrt(n)), (f"1/sqrt({name})", 1 / np.sqrt(n))):
            if abs(abs(k) - value) < 1e-6 * value and not _simple_fraction(value):  # 2 = sqrt(4) is named 2
                return f"off by a constant factor {sign}{root}: yours = {sign}{root} x expected. Is a scale applied twice, or missing?"
    meaning = next((f" ({n} = {name}: a sum where the forward takes a mean over {name}?)" for name, n in _products(case.dims)
                    if n > 2 and abs(abs(k) - n) < 1e-6 * n), "")
    return (f"off by a constant factor {_nice(k)}: yours = {_nice(k)} x expected{meaning}. Look for a constant "
            f"(0.5, 2, 1/N) you dropped or added")


def _simple_fraction(k: float) -> Fraction | None:
    f = Fraction(k).limit_denominator(12)
    return f if abs(float(f) - k) < 1e-6 * abs(k) else None


def _nice(k: float) -> str:
    return str(_simple_fraction(k) or f"{k:.6g}")


def chain_rule(theirs, expected, case: Case):
    dout = np.asarray(case.dout)
    if dout.shape == theirs.shape and same(theirs * dout, expected):
        return "missing the chain rule: yours is the local derivative dy/dx; multiply it by the upstream gradient dy"
    return None


# ------------------------------------------------------------------ exercise-specific


def repeated_ids(theirs, expected, case: Case):
    """embedding: right except on the rows of ids that occur more than once."""
    ids, counts = np.unique(case.inputs["ids"], return_counts=True)
    repeated = set(ids[counts > 1].tolist())
    wrong_rows = set(np.nonzero(~np.isclose(theirs, expected).all(axis=1))[0].tolist())
    if wrong_rows and wrong_rows <= repeated:
        return (f"missing the sum over repeated ids: only rows {sorted(wrong_rows)} are wrong, and those ids occur "
                f"more than once. dW[ids] += dy keeps one position per id; np.add.at(dW, ids, dy) adds them all")
    return None


def softmax_row_term(theirs, expected, case: Case):
    """softmax: dx = y (dy - s) with s = sum_i dy_i y_i per row. When the error is y times a
    constant per row, the mistake is in s: say how yours compares."""
    x, dy = case.inputs["x"], np.asarray(case.dout)
    y = np.exp(x - x.max(axis=-1, keepdims=True))
    y /= y.sum(axis=-1, keepdims=True)
    s = (dy * y).sum(axis=-1, keepdims=True)
    if same(theirs, y * (dy - dy * y)):
        return "missing the sum over the softmax axis: yours uses dy_j y_j where the math has sum_i dy_i y_i (every y_i depends on x_j)"
    implied = s - (theirs - expected) / y  # the s yours used, row by row
    per_row = implied.mean(axis=-1, keepdims=True)
    tolerance = 1e-6 * float(np.abs(s).max())  # implied is s minus a difference: its rounding is s's, not its own
    if np.abs(implied - per_row).max() > tolerance:
        return None
    implied = per_row
    ratio = float((implied[..., 0] * s[..., 0]).sum() / (s[..., 0] ** 2).sum())
    if np.abs(implied - ratio * s).max() > tolerance:
        return None
    if abs(ratio * x.shape[-1] - 1) < 1e-6:
        return f"mean instead of sum: your sum_i dy_i y_i is divided by C = {x.shape[-1]}; it is a sum over the row, not a mean"
    if abs(ratio) < 1e-6:
        return "missing the term - sum_i dy_i y_i: every y_i depends on x_j, not only y_j"
    return f"the per-row term sum_i dy_i y_i is off: yours is {_nice(ratio)} times it"


def layer_norm_paths(theirs, expected, case: Case):
    """layer_norm: dx = rstd dxhat - rstd mean(dxhat) - rstd xhat mean(dxhat xhat), one term
    per path from x to xhat (direct, through mean, through rstd). Name the path left out."""
    if case.grad != "dx":
        return None
    x, scale, dy = case.inputs["x"], case.inputs["scale"], np.asarray(case.dout)
    xc = x - x.mean(axis=-1, keepdims=True)
    rstd = 1 / np.sqrt((xc**2).mean(axis=-1, keepdims=True) + 1e-5)
    xhat, dxhat = xc * rstd, dy * scale
    direct = rstd * dxhat
    via_mean = -rstd * dxhat.mean(axis=-1, keepdims=True)
    via_rstd = -rstd * xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    if same(theirs, direct + via_mean):
        return "missing the path through rstd: the variance depends on x too, which adds - rstd * xhat * mean(dxhat * xhat)"
    if same(theirs, direct + via_rstd):
        return "missing the path through mean: the mean depends on every x_j, which adds - rstd * mean(dxhat)"
    if same(theirs, direct):
        return "mean and rstd treated as constants: both depend on x, and each adds a term to dx"
    return None


def attention_scores(theirs, expected, case: Case):
    """attention: dq = dS k / sqrt(D) and dk = dS^T q / sqrt(D). With T <= D, the learner's dS can be
    recovered from their dq (or dk) exactly; say where it differs from the right dS."""
    q, k, v = (case.inputs[n] for n in ("q", "k", "v"))
    D, T = q.shape[-1], q.shape[-2]
    if case.grad not in ("dq", "dk") or T > D:
        return None
    other = k if case.grad == "dq" else q
    dS = theirs @ np.linalg.pinv(other) * np.sqrt(D)  # [.., T, D] @ [.., D, T]
    if case.grad == "dk":
        dS = dS.swapaxes(-1, -2)
    if not same(_scores_to(dS, other, case.grad, D), theirs):
        return None
    right = _attention_dS(q, k, v, np.asarray(case.dout))
    bad = ~np.isclose(dS, right, rtol=1e-5, atol=1e-6 * float(np.abs(right).max()))
    future = np.broadcast_to(np.triu(np.ones((T, T), dtype=bool), k=1), bad.shape)
    if bad.any() and not bad[~future].any():
        return (f"your dS (recovered from your {case.grad}) is right except at masked positions (a key after its query), "
                f"where it is not 0: those scores were replaced by -inf, so nothing flows through them")
    if not bad.any():
        return f"your dS (recovered from your {case.grad}) is right: the mistake is in the last step, from dS to {case.grad}"
    return None


def _scores_to(dS, other, grad, D):
    return (dS if grad == "dq" else dS.swapaxes(-1, -2)) @ other / np.sqrt(D)


def _attention_dS(q, k, v, dout):
    T, D = q.shape[-2], q.shape[-1]
    S = np.where(np.triu(np.ones((T, T), dtype=bool), k=1), -np.inf, q @ k.swapaxes(-1, -2) / np.sqrt(D))
    P = np.exp(S - S.max(axis=-1, keepdims=True))
    P /= P.sum(axis=-1, keepdims=True)
    dP = dout @ v.swapaxes(-1, -2)
    return P * (dP - (dP * P).sum(axis=-1, keepdims=True))
