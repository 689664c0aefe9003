"""RMSNorm, RoPE and SwiGLU backward passes as learners write them."""
import numpy as np
from corpus_tools import right, wrong

# ------------------------------------------------------------------ rms_norm


@wrong("rms_norm", "constant-rstd")
def _(dy, cache):
    x, weight, xhat, rstd = cache
    return dy * weight * rstd, (dy * xhat).sum(axis=(0, 1))


@wrong("rms_norm", "layer-norm-mean-term")
def _(dy, cache):
    x, weight, xhat, rstd = cache
    dxhat = dy * weight
    C = x.shape[-1]
    dx = rstd / C * (C * dxhat - dxhat.sum(-1, keepdims=True) - xhat * (dxhat * xhat).sum(-1, keepdims=True))
    return dx, (dy * xhat).sum(axis=(0, 1))


@wrong("rms_norm", "power-rule")
def _(dy, cache):
    x, weight, xhat, rstd = cache
    dxhat = dy * weight
    C = x.shape[-1]
    drstd = (dxhat * x).sum(-1, keepdims=True)
    dms = drstd * -0.5 * rstd**3
    dx = dxhat * rstd + dms * x / C  # forgot the 2 of d(x^2)/dx
    return dx, (dy * xhat).sum(axis=(0, 1))


@wrong("rms_norm", "sum-not-mean")
def _(dy, cache):
    x, weight, xhat, rstd = cache
    g = dy * weight
    return rstd * (g - xhat * np.sum(g * xhat, axis=-1, keepdims=True)), np.sum(dy * xhat, axis=(0, 1))


@wrong("rms_norm", "no-weight")
def _(dy, cache):
    x, weight, xhat, rstd = cache
    dx = rstd * (dy - xhat * (dy * xhat).mean(-1, keepdims=True))
    return dx, (dy * xhat).sum(axis=(0, 1))


@wrong("rms_norm", "offset-weight")
def _(dy, cache):
    x, weight, xhat, rstd = cache
    g = dy * (1.0 + weight)  # copied from a Gemma implementation
    return rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True)), (dy * xhat).sum(axis=(0, 1))


@wrong("rms_norm", "dweight-mean")
def _(dy, cache):
    x, weight, xhat, rstd = cache
    g = dy * weight
    return rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True)), (dy * xhat).reshape(-1, x.shape[-1]).mean(0)


@wrong("rms_norm", "dweight-sum-axis")
def _(dy, cache):
    x, weight, xhat, rstd = cache
    g = dy * weight
    return rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True)), (dy * xhat).sum(axis=0)


@wrong("rms_norm", "term-sign")
def _(dy, cache):
    x, weight, xhat, rstd = cache
    g = dy * weight
    return rstd * g + rstd * xhat * (g * xhat).mean(-1, keepdims=True), (dy * xhat).sum(axis=(0, 1))


@wrong("rms_norm", "rstd-on-first-term-only")
def _(dy, cache):
    x, weight, xhat, rstd = cache
    g = dy * weight
    return rstd * (g - x * (g * xhat).mean(-1, keepdims=True)), (dy * xhat).sum(axis=(0, 1))


@wrong("rms_norm", "x-for-xhat")
def _(dy, cache):
    x, weight, xhat, rstd = cache
    g = dy * weight
    return rstd * (g - x * (g * x).mean(-1, keepdims=True)), (dy * x).sum(axis=(0, 1))


@wrong("rms_norm", "layer-norm-stats")
def _(dy, cache):
    x, weight, _, _ = cache
    mu = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(x.var(-1, keepdims=True) + 1e-6)   # "recompute the stats to be safe"
    xhat = x * rstd
    g = dy * weight
    return rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True)), (dy * xhat).sum(axis=(0, 1))


@wrong("rms_norm", "no-rstd-factor")
def _(dy, cache):
    x, weight, xhat, rstd = cache
    g = dy * weight
    return g - xhat * (g * xhat).mean(-1, keepdims=True), (dy * xhat).sum(axis=(0, 1))


@right("rms_norm")
def _(dy, cache):
    x, weight, xhat, rstd = cache
    C = x.shape[-1]
    dxhat = dy * weight
    # the chain rule through rstd written out: d rstd / dx_j = -rstd^3 x_j / C
    drstd = np.einsum("btc,btc->bt", dxhat, x)[..., None]
    dx = dxhat * rstd - drstd * rstd**3 * x / C
    return dx, np.einsum("btc,btc->c", dy, xhat)


# ------------------------------------------------------------------ rope


def halves(a):
    h = a.shape[-1] // 2
    return a[..., :h], a[..., h:]


@wrong("rope", "forward-rotation")
def _(dy, cache):
    positions, cos, sin = cache
    g1, g2 = halves(dy)
    rot = np.concatenate([-g2, g1], axis=-1)
    return dy * cos + rot * sin  # "same as the forward"


@wrong("rope", "no-sin-term")
def _(dy, cache):
    positions, cos, sin = cache
    return dy * cos


@wrong("rope", "positions-from-zero")
def _(dy, cache):
    _, cos, sin = cache
    T, D = dy.shape[-2], dy.shape[-1]
    freqs = 100.0 ** (-np.arange(0, D, 2) / D)
    ang = np.arange(T)[:, None] * freqs
    ang = np.concatenate([ang, ang], -1)
    g1, g2 = halves(dy)
    return dy * np.cos(ang) - np.concatenate([-g2, g1], -1) * np.sin(ang)


@wrong("rope", "positions-from-zero", must_not=("sign flipped",))
def _(dy, cache):
    positions, cos, sin = cache
    pos = positions - positions[0] + 1  # 1-based positions
    D = dy.shape[-1]
    a = pos[:, None] * 100.0 ** (-np.arange(0, D, 2) / D)
    a = np.concatenate([a, a], -1)
    g1, g2 = halves(dy)
    return dy * np.cos(a) + np.concatenate([g2, -g1], -1) * np.sin(a)


@wrong("rope", "positions-from-zero")
def _(dy, cache):
    positions, cos, sin = cache
    from tinygpt.exercises.sheets.rope import cos_sin, rotate_half
    cache_len = positions[0]
    c, s = cos_sin(positions + cache_len, dy.shape[-1])  # "offset by the cache"
    return dy * c - rotate_half(dy) * s


@wrong("rope", "rotate-half-no-minus")
def _(dy, cache):
    positions, cos, sin = cache
    g1, g2 = halves(dy)
    return dy * cos - np.concatenate([g2, g1], -1) * sin


@wrong("rope", "interleaved-pairs")
def _(dy, cache):
    positions, cos, sin = cache
    D = dy.shape[-1]
    c, s = cos[:, : D // 2], sin[:, : D // 2]
    dx = np.empty_like(dy)
    dx[..., ::2] = dy[..., ::2] * c + dy[..., 1::2] * s
    dx[..., 1::2] = dy[..., 1::2] * c - dy[..., ::2] * s
    return dx


@wrong("rope", "cos-sin-swapped")
def _(dy, cache):
    positions, cos, sin = cache
    g1, g2 = halves(dy)
    return dy * sin - np.concatenate([-g2, g1], -1) * cos


@wrong("rope", "rotate-half-no-minus")
def _(dy, cache):
    positions, cos, sin = cache
    g1, g2 = halves(dy)
    c, s = halves(cos)[0], halves(sin)[0]
    return np.concatenate([g1 * c + g2 * s, g2 * c + g1 * s], axis=-1)


@wrong("rope", "identity")
def _(dy, cache):
    return dy.copy()  # a rotation keeps lengths, so...


@wrong("rope", "frequencies")
def _(dy, cache):
    positions, _, _ = cache
    D = dy.shape[-1]
    f = 100.0 ** (-np.arange(D // 2) / D)  # forgot the 2
    a = np.concatenate([positions[:, None] * f] * 2, -1)
    g1, g2 = halves(dy)
    return dy * np.cos(a) - np.concatenate([-g2, g1], -1) * np.sin(a)


@right("rope")
def _(dy, cache):
    positions, cos, sin = cache
    g1, g2 = halves(dy)
    c, s = halves(cos)[0], halves(sin)[0]
    # R(a)^T applied to each pair (g1, g2)
    return np.concatenate([g1 * c + g2 * s, g2 * c - g1 * s], axis=-1)


@right("rope")
def _(dy, cache):
    positions, cos, sin = cache
    D = dy.shape[-1]
    dx = np.zeros_like(dy)
    for i in range(D // 2):  # one pair at a time, as a 2x2 rotation matrix
        for t in range(dy.shape[-2]):
            c, s = cos[t, i], sin[t, i]
            R = np.array([[c, -s], [s, c]])
            pair = np.stack([dy[..., t, i], dy[..., t, i + D // 2]], -1)
            back = pair @ R  # R^T applied to column vectors = row vector times R
            dx[..., t, i], dx[..., t, i + D // 2] = back[..., 0], back[..., 1]
    return dx


# ------------------------------------------------------------------ swiglu


def sig(z):
    return 1 / (1 + np.exp(-z))


def tail(c, dgate, dup):
    x2 = c["x"].reshape(-1, c["x"].shape[-1])
    return (dgate @ c["W_gate"] + dup @ c["W_up"], dgate.reshape(-1, dgate.shape[-1]).T @ x2,
            dup.reshape(-1, dup.shape[-1]).T @ x2)


def dW_down(dy, c):
    return dy.reshape(-1, dy.shape[-1]).T @ c["h"].reshape(-1, c["h"].shape[-1])


@wrong("swiglu", "silu-sigmoid-only")
def _(dy, c):
    dh = dy @ c["W_down"]
    dgate = dh * c["up"] * sig(c["gate"])
    return (*tail(c, dgate, dh * c["act"]), dW_down(dy, c))


@wrong("swiglu", "silu-sigmoid-slope")
def _(dy, c):
    dh = dy @ c["W_down"]
    s = sig(c["gate"])
    return (*tail(c, dh * c["up"] * s * (1 - s), dh * c["act"]), dW_down(dy, c))


@wrong("swiglu", "silu-slope-form")
def _(dy, c):
    dh = dy @ c["W_down"]
    s = sig(c["gate"])
    return (*tail(c, dh * c["up"] * (s + c["gate"] * (1 - s)), dh * c["act"]), dW_down(dy, c))


@wrong("swiglu", "dup-no-act")
def _(dy, c):
    dh = dy @ c["W_down"]
    s = sig(c["gate"])
    return (*tail(c, dh * c["up"] * s * (1 + c["gate"] * (1 - s)), dh), dW_down(dy, c))


@wrong("swiglu", "dup-uses-gate")
def _(dy, c):
    dh = dy @ c["W_down"]
    s = sig(c["gate"])
    return (*tail(c, dh * c["up"] * s * (1 + c["gate"] * (1 - s)), dh * c["gate"]), dW_down(dy, c))


@wrong("swiglu", "dx-one-path")
def _(dy, c):
    dh = dy @ c["W_down"]
    s = sig(c["gate"])
    dgate = dh * c["up"] * s * (1 + c["gate"] * (1 - s))
    dup = dh * c["act"]
    _, dWg, dWu = tail(c, dgate, dup)
    return dgate @ c["W_gate"], dWg, dWu, dW_down(dy, c)


@wrong("swiglu", "dx-paths-crossed")
def _(dy, c):
    dh = dy @ c["W_down"]
    s = sig(c["gate"])
    dgate = dh * c["up"] * s * (1 + c["gate"] * (1 - s))
    dup = dh * c["act"]
    _, dWg, dWu = tail(c, dgate, dup)
    return dgate @ c["W_up"] + dup @ c["W_gate"], dWg, dWu, dW_down(dy, c)


@wrong("swiglu", "dW-transposed")
def _(dy, c):
    dh = dy @ c["W_down"]
    s = sig(c["gate"])
    dgate = dh * c["up"] * s * (1 + c["gate"] * (1 - s))
    dx, dWg, dWu = tail(c, dgate, dh * c["act"])
    dWd = np.einsum("bth,btc->hc", c["h"], dy)  # [HID, C]: like a [in, out] weight
    return dx, dWg, dWu, dWd


@wrong("swiglu", "dW-down-from-act")
def _(dy, c):
    dh = dy @ c["W_down"]
    s = sig(c["gate"])
    dx, dWg, dWu = tail(c, dh * c["up"] * s * (1 + c["gate"] * (1 - s)), dh * c["act"])
    return dx, dWg, dWu, np.einsum("btc,bth->ch", dy, c["act"])


@wrong("swiglu", "product-factors-swapped")
def _(dy, c):
    dh = dy @ c["W_down"]
    s = sig(c["gate"])
    dact, dup = dh * c["act"], dh * c["up"]
    return (*tail(c, dact * s * (1 + c["gate"] * (1 - s)), dup), dW_down(dy, c))


@wrong("swiglu", "dW-one-row")
def _(dy, c):
    dh = dy @ c["W_down"]
    s = sig(c["gate"])
    dgate = dh * c["up"] * s * (1 + c["gate"] * (1 - s))
    dup = dh * c["act"]
    dx = dgate @ c["W_gate"] + dup @ c["W_up"]
    return dx, dgate[0].T @ c["x"][0], dup[0].T @ c["x"][0], dy[0].T @ c["h"][0]


@wrong("swiglu", "silu-skipped")
def _(dy, c):
    dh = dy @ c["W_down"]
    dact, dup = dh * c["up"], dh * c["act"]
    return (*tail(c, dact, dup), dW_down(dy, c))  # forgot the activation's derivative


@wrong("swiglu", "silu-slope-form")
def _(dy, c):
    dh = dy @ c["W_down"]
    s = sig(c["gate"])
    return (*tail(c, dh * c["up"] * s * (1 + c["act"] * (1 - s)), dh * c["act"]), dW_down(dy, c))


@right("swiglu")
def _(dy, c):
    dh = dy @ c["W_down"]
    s = sig(c["gate"])
    dgate = dh * c["up"] * (s + c["act"] * (1 - s))  # silu' = s + g s (1 - s), and g s is act
    return (*tail(c, dgate, dh * c["act"]), dW_down(dy, c))


@right("swiglu")
def _(dy, c):
    dh = np.einsum("btc,ch->bth", dy, c["W_down"])
    s = sig(c["gate"])
    dsilu = s + c["gate"] * s * (1 - s)  # product rule on gate * sigmoid(gate)
    dgate, dup = dh * c["up"] * dsilu, dh * c["act"]
    dx = np.einsum("bth,hc->btc", dgate, c["W_gate"]) + np.einsum("bth,hc->btc", dup, c["W_up"])
    return {"x": dx, "W_gate": np.einsum("bth,btc->hc", dgate, c["x"]), "W_up": np.einsum("bth,btc->hc", dup, c["x"]),
            "W_down": np.einsum("btc,bth->ch", dy, c["h"])}
