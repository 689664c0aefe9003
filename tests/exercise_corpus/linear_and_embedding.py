"""Linear and embedding backward passes as learners write them."""
import numpy as np
from corpus_tools import right, wrong

# ---------------------------------------------------------------- linear


@wrong("linear", "dW-transposed")
def _(dy, cache):
    x, W, b = cache
    x2, dy2 = x.reshape(-1, 4), dy.reshape(-1, 5)
    return dy @ W, x2.T @ dy2, dy.sum(axis=(0, 1))


@wrong("linear", "dW-one-row", must_not=("transposed",))
def _(dy, cache):
    x, W, b = cache
    return dy @ W, dy[0].T @ x[0], dy.sum(axis=(0, 1))


@wrong("linear", "dW-one-row")
def _(dy, cache):
    x, W, b = cache
    for i in range(x.shape[0]):
        dW = dy[i].T @ x[i]  # should be +=
    return dy @ W, dW, dy.sum(axis=(0, 1))


@wrong("linear", "dW-mean")
def _(dy, cache):
    x, W, b = cache
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return dy @ W, dy2.T @ x2 / len(x2), dy.sum(axis=(0, 1))


@wrong("linear", "no-dy")
def _(dy, cache):
    x, W, b = cache
    dx = np.ones_like(dy) @ W
    return dx, dy.reshape(-1, 5).T @ x.reshape(-1, 4), dy.sum(axis=(0, 1))


@wrong("linear", "dx-times-x")
def _(dy, cache):
    x, W, b = cache
    return x * (dy @ W), np.einsum("bto,bti->oi", dy, x), dy.sum(axis=(0, 1))


@wrong("linear", "db-some-axes")
def _(dy, cache):
    x, W, b = cache
    return dy @ W, np.einsum("bto,bti->oi", dy, x), dy.sum(0)


@wrong("linear", "db-sum-all")
def _(dy, cache):
    x, W, b = cache
    return dy @ W, np.einsum("bto,bti->oi", dy, x), np.sum(dy)


@wrong("linear", "db-mean")
def _(dy, cache):
    x, W, b = cache
    return dy @ W, np.einsum("bto,bti->oi", dy, x), dy.mean(axis=(0, 1))


@wrong("linear", "db-wrong-axis")
def _(dy, cache):
    x, W, b = cache
    return dy @ W, np.einsum("bto,bti->oi", dy, x), dy.sum(axis=-1)


@wrong("linear", "no-dy")
def _(dy, cache):
    x, W, b = cache
    return dy @ W, np.einsum("bto,bti->oi", dy, x), np.ones_like(b)


@wrong("linear", "dW-from-W")
def _(dy, cache):
    x, W, b = cache
    return dy @ W, W * np.einsum("bto,bti->oi", dy, x), dy.sum(axis=(0, 1))


@right("linear")
def _(dy, cache):
    x, W, b = cache
    dx = np.einsum("bto,oi->bti", dy, W)
    dW = np.zeros_like(W)
    for bb in range(x.shape[0]):
        for t in range(x.shape[1]):
            dW += np.outer(dy[bb, t], x[bb, t])
    return dx, dW, dy.sum(axis=0).sum(axis=0)


@right("linear")
def _(dy, cache):
    x, W, b = cache
    return (W.T @ dy.reshape(-1, 5).T).T.reshape(x.shape), (x.reshape(-1, 4).T @ dy.reshape(-1, 5)).T, dy.reshape(-1, 5).sum(0)


# ---------------------------------------------------------------- embedding


@wrong("embedding", "no-add-at", must_not=("transposed",))
def _(dy, cache):
    W, ids = cache
    dW = np.zeros_like(W)
    dW[ids] += dy
    return dW


@wrong("embedding", "no-add-at")
def _(dy, cache):
    W, ids = cache
    dW = np.zeros_like(W)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            dW[ids[b, t]] = dy[b, t]  # = instead of +=
    return dW


@wrong("embedding", "dW-is-dy")
def _(dy, cache):
    W, ids = cache
    return dy


@wrong("embedding", "times-W")
def _(dy, cache):
    W, ids = cache
    dW = np.zeros_like(W)
    np.add.at(dW, ids, dy * W[ids])
    return dW


@wrong("embedding", "misaligned")
def _(dy, cache):
    W, ids = cache
    dW = np.zeros_like(W)
    np.add.at(dW, ids.T.reshape(-1), dy.reshape(-1, W.shape[1]))
    return dW


@wrong("embedding", "mean-over-uses")
def _(dy, cache):
    W, ids = cache
    dW = np.zeros_like(W)
    np.add.at(dW, ids, dy)
    counts = np.bincount(ids.ravel(), minlength=len(W))
    return dW / np.maximum(counts, 1)[:, None]


@wrong("embedding", "counts-not-dy")
def _(dy, cache):
    W, ids = cache
    dW = np.zeros_like(W)
    np.add.at(dW, ids, 1.0)
    return dW


@wrong("embedding", "one-batch-row")
def _(dy, cache):
    W, ids = cache
    for b in range(ids.shape[0]):
        dW = np.zeros_like(W)
        np.add.at(dW, ids[b], dy[b])
    return dW


@wrong("embedding", "mean-over-positions")
def _(dy, cache):
    W, ids = cache
    dW = np.zeros_like(W)
    np.add.at(dW, ids, dy)
    return dW / ids.size


@wrong("embedding", "one-hot-transposed")
def _(dy, cache):
    W, ids = cache
    onehot = np.eye(W.shape[0])[ids.reshape(-1)]
    return dy.reshape(-1, W.shape[1]).T @ onehot


@wrong("embedding", "starts-from-W")
def _(dy, cache):
    W, ids = cache
    dW = W.copy()
    np.add.at(dW, ids, dy)
    return dW


@right("embedding")
def _(dy, cache):
    W, ids = cache
    onehot = np.eye(W.shape[0])[ids.reshape(-1)]  # [B*T, V]
    return onehot.T @ dy.reshape(-1, W.shape[1])


@right("embedding")
def _(dy, cache):
    W, ids = cache
    dW = np.zeros(W.shape)
    for v in range(W.shape[0]):
        dW[v] = dy[ids == v].sum(axis=0)
    return dW


@wrong("linear", "recogniser")
def _(dy, cache):
    x, W, b = cache
    return dy @ W, np.einsum("bto,bti->oi", dy, x), dy.sum(axis=(0, 1), keepdims=True)
