"""Warm-up backward passes as learners write them."""
import numpy as np
from corpus_tools import right, wrong


@wrong("add", "db-not-summed")
def _(dout, cache):
    a, b = cache
    return dout, dout


@wrong("add", "db-wrong-axis")
def _(dout, cache):
    a, b = cache
    return dout, dout.sum(axis=1)


@wrong("add", "ones")
def _(dout, cache):
    a, b = cache
    return np.ones_like(a), np.ones_like(b)


@wrong("add", "db-mean")
def _(dout, cache):
    a, b = cache
    return dout, dout.mean(0)


@wrong("mul", "same-factor")
def _(dout, cache):
    a, b = cache
    return dout * a, dout * a


@wrong("mul", "swapped")
def _(dout, cache):
    a, b = cache
    return dout * a, dout * b


@wrong("mul", "no-dout")
def _(dout, cache):
    a, b = cache
    return b, a


@wrong("mul", "product")
def _(dout, cache):
    a, b = cache
    out = a * b
    return dout * out, dout * out


@wrong("div", "db-plus")
def _(dout, cache):
    a, b = cache
    return dout / b, dout * a / b**2


@wrong("div", "db-no-a")
def _(dout, cache):
    a, b = cache
    return dout / b, -dout / (b * b)


@wrong("div", "db-not-squared")
def _(dout, cache):
    a, b = cache
    return dout / b, -dout * a / b


@wrong("div", "da-times-b")
def _(dout, cache):
    a, b = cache
    return dout * b, -dout * a / b**2


@wrong("pow", "no-exponent")
def _(dout, cache):
    (a,) = cache
    return dout * a**2


@wrong("pow", "exponent-not-lowered")
def _(dout, cache):
    (a,) = cache
    return 3 * a**3 * dout


@wrong("pow", "no-dout")
def _(dout, cache):
    (a,) = cache
    return 3 * a**2


@wrong("exp", "times-a")
def _(dout, cache):
    a, out = cache
    return dout * a


@wrong("exp", "no-dout")
def _(dout, cache):
    a, out = cache
    return np.exp(a)


@wrong("exp", "dout-only")
def _(dout, cache):
    a, out = cache
    return dout.copy()


@wrong("log", "times-a")
def _(dout, cache):
    (a,) = cache
    return dout * a


@wrong("log", "minus-or-square")
def _(dout, cache):
    (a,) = cache
    return -dout / a**2


@wrong("log", "log-again")
def _(dout, cache):
    (a,) = cache
    return dout * np.log(a)


@wrong("tanh", "not-squared")
def _(dout, cache):
    a, out = cache
    return dout * (1 - out)


@wrong("tanh", "a-for-out")
def _(dout, cache):
    a, out = cache
    return dout * (1 - a**2)


@wrong("tanh", "no-dout")
def _(dout, cache):
    a, out = cache
    return 1 - np.tanh(a) ** 2


@wrong("sum", "ones")
def _(dout, cache):
    (a,) = cache
    return np.ones_like(a)


@wrong("sum", "mean")
def _(dout, cache):
    (a,) = cache
    return np.repeat(dout[:, None], a.shape[1], axis=1) / a.shape[1]


@wrong("sum", "total")
def _(dout, cache):
    (a,) = cache
    return np.full_like(a, dout.sum())


@wrong("mean", "no-divide")
def _(dout, cache):
    (a,) = cache
    return np.tile(dout, (a.shape[0], 1))


@wrong("mean", "wrong-count")
def _(dout, cache):
    (a,) = cache
    return np.ones_like(a) * dout / a.shape[1]


@wrong("mean", "no-dout")
def _(dout, cache):
    (a,) = cache
    return np.ones_like(a) / len(a)


@wrong("reshape_transpose", "no-transpose")
def _(dout, cache):
    (a,) = cache
    return dout.reshape(a.shape)


@wrong("reshape_transpose", "wrong-order")
def _(dout, cache):
    (a,) = cache
    return dout.reshape(2, 3, 4).transpose(0, 2, 1).reshape(2, 3, 4)


@wrong("getitem", "no-add-at")
def _(dout, cache):
    a, rows = cache
    da = np.zeros_like(a)
    da[rows] += dout
    return da


@wrong("getitem", "dout-shape")
def _(dout, cache):
    a, rows = cache
    return dout


@wrong("getitem", "counts")
def _(dout, cache):
    a, rows = cache
    da = np.zeros_like(a)
    for r in rows:
        da[r] += 1
    return da


@wrong("matmul", "transposed")
def _(dout, cache):
    a, b = cache
    return dout @ b.T, dout.T @ a


@wrong("matmul", "transposed")
def _(dout, cache):
    a, b = cache
    return b @ dout.T, a.T @ dout


@wrong("matmul", "no-dout")
def _(dout, cache):
    a, b = cache
    return np.ones_like(dout) @ b.T, a.T @ np.ones_like(dout)


@right("matmul")
def _(dout, cache):
    a, b = cache
    return np.einsum("nm,km->nk", dout, b), np.einsum("nk,nm->km", a, dout)


@right("sum")
def _(dout, cache):
    (a,) = cache
    return dout[:, None] * np.ones_like(a)


@right("getitem")
def _(dout, cache):
    a, rows = cache
    da = np.zeros_like(a)
    for n, r in enumerate(rows):
        da[r] = da[r] + dout[n]
    return da


# ---------------------------------------------------------------- the MLP


def learner_mlp(dlogits, c, wrong_line=None):
    d = {"logits": dlogits}
    d["W2"] = c["h"].T @ dlogits if wrong_line != "weight-transposed" else dlogits.T @ c["h"]
    d["b2"] = dlogits.sum(0) if wrong_line != "bias-not-summed" else dlogits.mean(0)
    d["h"] = dlogits @ c["W2"].T
    d["h_pre"] = {"tanh-not-squared": d["h"] * (1 - c["h"]), "tanh-uses-pre": d["h"] * (1 - c["h_pre"] ** 2),
                  "tanh-no-upstream": 1 - c["h"] ** 2, "tanh-skipped": d["h"]}.get(wrong_line, d["h"] * (1 - c["h"] ** 2))
    d["W1"] = c["x"].T @ d["h_pre"]
    d["b1"] = d["h_pre"].sum(0)
    d["x"] = d["h_pre"] @ c["W1"].T
    if wrong_line == "swapped":
        d["W1"], d["b1"] = d["b1"], d["W1"]
    return d


for _line in ("weight-transposed", "bias-not-summed", "tanh-not-squared", "tanh-uses-pre", "tanh-no-upstream",
              "tanh-skipped"):
    def _backward(dlogits, cache, _line=_line):
        return learner_mlp(dlogits, cache, _line)
    wrong("mlp", _line, must_not=("may only inherit",))(_backward)


@right("mlp")
def _(dlogits, cache):
    return {"d" + k: v for k, v in learner_mlp(dlogits, cache).items()}
