"""Layer-norm and cross-entropy backward passes as learners write them."""
import numpy as np
from corpus_tools import right, wrong

# ---------------------------------------------------------------- layer_norm


def sums(dy, xhat):
    return (dy * xhat).sum(axis=(0, 1)), dy.sum(axis=(0, 1))


@wrong("layer_norm", "constant-stats", must_not=("transposed",))
def _(dy, cache):
    x, scale, xhat, rstd = cache
    return (dy * scale) * rstd, *sums(dy, xhat)


@wrong("layer_norm", "no-rstd-path")
def _(dy, cache):
    x, scale, xhat, rstd = cache
    g = dy * scale
    return rstd * (g - g.mean(-1, keepdims=True)), *sums(dy, xhat)


@wrong("layer_norm", "no-mean-path")
def _(dy, cache):
    x, scale, xhat, rstd = cache
    g = dy * scale
    return rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True)), *sums(dy, xhat)


@wrong("layer_norm", "no-scale")
def _(dy, cache):
    x, scale, xhat, rstd = cache
    dx = rstd * (dy - dy.mean(-1, keepdims=True) - xhat * (dy * xhat).mean(-1, keepdims=True))
    return dx, *sums(dy, xhat)


@wrong("layer_norm", "unbiased-variance")
def _(dy, cache):
    x, scale, xhat, rstd = cache
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, ddof=1, keepdims=True)
    inv = 1 / np.sqrt(var + 1e-5)
    xh = (x - mu) * inv
    g = dy * scale
    dx = inv * (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True))
    return dx, *sums(dy, xhat)


@wrong("layer_norm", "sum-not-mean")
def _(dy, cache):
    x, scale, xhat, rstd = cache
    g = dy * scale
    dx = rstd * (g - g.sum(-1, keepdims=True) - xhat * (g * xhat).sum(-1, keepdims=True))
    return dx, *sums(dy, xhat)


@wrong("layer_norm", "rstd-term-sign")
def _(dy, cache):
    x, scale, xhat, rstd = cache
    g = dy * scale
    dx = rstd * (g - g.mean(-1, keepdims=True) + xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, *sums(dy, xhat)


@wrong("layer_norm", "std-for-rstd")
def _(dy, cache):
    x, scale, xhat, rstd = cache
    g = dy * scale
    std = 1 / rstd
    dx = std * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, *sums(dy, xhat)


@wrong("layer_norm", "param-sum-axis")
def _(dy, cache):
    x, scale, xhat, rstd = cache
    g = dy * scale
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


@wrong("layer_norm", "dscale-no-xhat")
def _(dy, cache):
    x, scale, xhat, rstd = cache
    g = dy * scale
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, dy.sum(axis=(0, 1)), dy.sum(axis=(0, 1))


@wrong("layer_norm", "x-for-xhat")
def _(dy, cache):
    x, scale, xhat, rstd = cache
    g = dy * scale
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, (dy * x).sum(axis=(0, 1)), dy.sum(axis=(0, 1))


@wrong("layer_norm", "swapped")
def _(dy, cache):
    x, scale, xhat, rstd = cache
    g = dy * scale
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    dscale, dshift = sums(dy, xhat)
    return dx, dshift, dscale


@wrong("layer_norm", "param-mean")
def _(dy, cache):
    x, scale, xhat, rstd = cache
    g = dy * scale
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, (dy * xhat).mean(axis=(0, 1)), dy.mean(axis=(0, 1))


@right("layer_norm")
def _(dy, cache):
    x, scale, xhat, rstd = cache
    C = x.shape[-1]
    g = dy * scale
    dx = (rstd / C) * (C * g - g.sum(-1, keepdims=True) - xhat * np.einsum("btc,btc->bt", g, xhat)[..., None])
    return dx, np.einsum("btc,btc->c", dy, xhat), np.einsum("btc->c", dy)


# ---------------------------------------------------------------- cross_entropy


def probs(logits, logsumexp):
    return np.exp(logits - logsumexp[:, None])


@wrong("cross_entropy", "no-mean", must_not=("transposed",))
def _(dloss, cache):
    logits, targets, lse = cache
    p = probs(logits, lse)
    p[np.arange(len(targets)), targets] -= 1
    return p * dloss


@wrong("cross_entropy", "mean-twice", must_not=("does not average",))
def _(dloss, cache):
    logits, targets, lse = cache
    N = len(targets)
    p = probs(logits, lse)
    p[np.arange(N), targets] -= 1
    return p * dloss / N / N


@wrong("cross_entropy", "no-dloss")
def _(dloss, cache):
    logits, targets, lse = cache
    p = probs(logits, lse)
    p[np.arange(len(targets)), targets] -= 1
    return p / len(targets)


@wrong("cross_entropy", "no-one-hot")
def _(dloss, cache):
    logits, targets, lse = cache
    return probs(logits, lse) * dloss / len(targets)


@wrong("cross_entropy", "column-index")
def _(dloss, cache):
    logits, targets, lse = cache
    p = probs(logits, lse)
    p[:, targets] -= 1
    return p * dloss / len(targets)


@wrong("cross_entropy", "plus-one")
def _(dloss, cache):
    logits, targets, lse = cache
    p = probs(logits, lse)
    p[np.arange(len(targets)), targets] += 1
    return p * dloss / len(targets)


@wrong("cross_entropy", "log-probs")
def _(dloss, cache):
    logits, targets, lse = cache
    logp = logits - lse[:, None]
    logp[np.arange(len(targets)), targets] -= 1
    return logp * dloss / len(targets)


@wrong("cross_entropy", "onehot-minus-p")
def _(dloss, cache):
    logits, targets, lse = cache
    onehot = np.eye(logits.shape[1])[targets]
    return (onehot - probs(logits, lse)) * dloss / len(targets)


@wrong("cross_entropy", "logits-not-probs")
def _(dloss, cache):
    logits, targets, lse = cache
    onehot = np.eye(logits.shape[1])[targets]
    return (logits - onehot) * dloss / len(targets)


@wrong("cross_entropy", "only-target-term")
def _(dloss, cache):
    logits, targets, lse = cache
    g = np.zeros_like(logits)
    g[np.arange(len(targets)), targets] = -1
    return g * dloss / len(targets)


@wrong("cross_entropy", "softmax-wrong-axis")
def _(dloss, cache):
    logits, targets, lse = cache
    e = np.exp(logits - logits.max(axis=0))
    p = e / e.sum(axis=0)
    p[range(len(targets)), targets] -= 1
    return p * dloss / len(targets)


@wrong("cross_entropy", "unnormalised-exp")
def _(dloss, cache):
    logits, targets, lse = cache
    p = np.exp(logits)
    p[range(len(targets)), targets] -= 1
    return p * dloss / len(targets)


@wrong("cross_entropy", "mean-over-classes")
def _(dloss, cache):
    logits, targets, lse = cache
    p = probs(logits, lse)
    p[range(len(targets)), targets] -= 1
    return p * dloss / p.size


@right("cross_entropy")
def _(dloss, cache):
    logits, targets, lse = cache
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    onehot = (np.arange(logits.shape[1]) == targets[:, None]).astype(float)
    return dloss * (p - onehot) / logits.shape[0]


@wrong("layer_norm", "rstd-on-first-term-only")
def _(dy, cache):
    x, scale, xhat, rstd = cache
    g = dy * scale
    return g * rstd - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True), *sums(dy, xhat)


@wrong("cross_entropy", "scale-on-one-term")
def _(dloss, cache):
    logits, targets, lse = cache
    g = probs(logits, lse) * dloss / len(targets)
    g[np.arange(len(targets)), targets] -= 1
    return g
