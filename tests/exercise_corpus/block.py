"""Block backward passes as learners write them: one learner's full backward, and the one line
each entry writes differently (`wrong_line`). Later steps are computed from the learner's own
earlier gradients, so a mistake flows on down the block as it would in their file."""
import numpy as np
from corpus_tools import right, wrong

EPS = 1e-5


def ln_back(dy, x, scale, wrong_line=None):
    mu = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + EPS)
    xhat = (x - mu) * rstd
    g = dy * scale if wrong_line != "ln-no-scale" else dy
    if wrong_line == "ln-no-rstd-path":
        dx = rstd * (g - g.mean(-1, keepdims=True))
    else:
        dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    dscale = (dy * (x if wrong_line == "ln-scale-uses-x" else xhat)).sum(axis=(0, 1) if wrong_line != "ln-param-some-axes" else 0)
    dshift = dy.sum(axis=(0, 1))
    return dx, dscale, dshift


def gelu_back(dy, h, wrong_line=None):
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (h + 0.044715 * h**3))
    three = 1 if wrong_line == "gelu-no-3" else 3
    dt = 1 - t if wrong_line == "gelu-one-minus-t" else 1 - t**2
    first = 0 if wrong_line == "gelu-no-first-term" else 0.5 * (1 + t)
    local = first + 0.5 * h * dt * c * (1 + three * 0.044715 * h**2)
    return local if wrong_line == "gelu-no-upstream" else dy * local


def learner_block(dout, c, wrong_line=None):
    p = c["p"]
    B, T, C = c["x"].shape
    H = 2
    D = C // H
    d = {"ff_out": dout}
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    d["W_2"] = flat(d["ff_out"]).T @ flat(c["act"])
    if wrong_line == "weight-transposed":
        d["W_2"] = d["W_2"].T
    d["b_2"] = d["ff_out"].sum(axis=(0, 1)) if wrong_line != "bias-some-axes" else d["ff_out"].sum(axis=0)
    d["act"] = d["ff_out"] @ p["W_2"]
    d["h"] = gelu_back(d["act"], c["h"], wrong_line)
    d["W_1"] = flat(d["h"]).T @ flat(c["ln2"])
    d["b_1"] = d["h"].sum(axis=(0, 1)) if wrong_line != "bias-mean" else d["h"].mean(axis=(0, 1))
    d["ln2"] = d["h"] @ p["W_1"]
    dx1_norm, d["scale2"], d["shift2"] = ln_back(d["ln2"], c["x1"], p["scale2"], wrong_line)
    d["x1"] = {"residual-missing": dx1_norm, "norm-path-missing": dout}.get(wrong_line, dout + dx1_norm)
    d["att_out"] = d["x1"] if wrong_line != "att-out-from-dout" else dout
    d["W_o"] = flat(d["att_out"]).T @ flat(c["ctx"])
    d["b_o"] = d["att_out"].sum(axis=(0, 1))
    d["ctx"] = d["att_out"] @ (p["W_o"].T if wrong_line == "input-weight-transposed" else p["W_o"])
    if wrong_line == "heads-no-transpose":
        dheads = d["ctx"].reshape(B, H, T, D)
    else:
        dheads = d["ctx"].reshape(B, T, H, D).transpose(0, 2, 1, 3)
    d["att"] = dheads @ c["v"].swapaxes(-1, -2)
    d["v"] = (c["att"] if wrong_line == "v-att-not-transposed" else c["att"].swapaxes(-1, -2)) @ dheads
    att = c["att"]
    if wrong_line == "softmax-no-P":
        d["scores"] = d["att"] - (d["att"] * att).sum(-1, keepdims=True)
    elif wrong_line == "softmax-no-sum-term":
        d["scores"] = att * d["att"]
    elif wrong_line == "softmax-skipped":
        d["scores"] = d["att"]
    elif wrong_line == "softmax-wrong-axis":
        d["scores"] = att * (d["att"] - (d["att"] * att).sum(-2, keepdims=True))
    else:
        d["scores"] = att * (d["att"] - (d["att"] * att).sum(-1, keepdims=True))
    if wrong_line == "masked-gets-gradient":
        d["scores"] = np.where(np.triu(np.ones((T, T), dtype=bool), 1), d["att"], d["scores"])
    scale = 1.0 if wrong_line == "no-scale" else 1 / np.sqrt(D)
    d["q"] = d["scores"] @ c["k"] * scale
    d["k"] = (d["scores"] if wrong_line == "k-not-transposed" else d["scores"].swapaxes(-1, -2)) @ c["q"] * scale
    d["ln1"] = np.zeros_like(c["ln1"])
    for n in "qkv":
        if wrong_line == "merge-no-transpose":
            merged = d[n].reshape(B, T, C)
        else:
            merged = d[n].transpose(0, 2, 1, 3).reshape(B, T, C)
        d[f"W_{n}"] = flat(merged).T @ flat(c["ln1"])
        if wrong_line == "ln1-one-use":
            d["ln1"] = merged @ p[f"W_{n}"]  # = where += belongs: only v's use is kept
        else:
            d["ln1"] = d["ln1"] + merged @ p[f"W_{n}"]
    dx_norm, d["scale1"], d["shift1"] = ln_back(d["ln1"], c["x"], p["scale1"], wrong_line)
    d["x"] = {"residual-missing": dx_norm, "norm-path-missing": d["x1"]}.get(wrong_line, dx_norm + d["x1"])
    if wrong_line == "swapped":
        d["W_q"], d["W_k"] = d["W_k"], d["W_q"]
    return d


LINES = ["weight-transposed", "bias-some-axes", "bias-mean", "gelu-no-3", "gelu-one-minus-t", "gelu-no-first-term",
         "gelu-no-upstream", "ln-no-scale", "ln-no-rstd-path", "ln-scale-uses-x", "ln-param-some-axes", "residual-missing",
         "norm-path-missing", "input-weight-transposed", "heads-no-transpose", "v-att-not-transposed", "softmax-no-P",
         "softmax-no-sum-term", "softmax-wrong-axis", "masked-gets-gradient", "no-scale", "k-not-transposed",
         "merge-no-transpose", "ln1-one-use", "swapped", "att-out-from-dout", "softmax-skipped"]
for _line in LINES:
    def _backward(dout, cache, _line=_line):
        return learner_block(dout, cache, _line)
    wrong("block", _line, must_not=("may only inherit",))(_backward)


@right("block")
def _(dout, cache):
    return {"d" + name: grad for name, grad in learner_block(dout, cache).items()}
