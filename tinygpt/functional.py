"""The fused operations a GPT is built from, each with a hand-derived backward.

Each op is a `Function` whose forward is one line of math in its docstring, followed by
the derivation of its backward. The backward is computed in closed form from a few saved
arrays; no op here builds a graph of smaller ops. Shapes use B batch, T tokens, C
channels, H heads, D head size, V vocabulary.
"""
from __future__ import annotations

import functools
import math

from tinygpt import backend
from tinygpt.backend import backend_of
from tinygpt.tensor import Function, Tensor

# ============================================================================ linear


class Linear(Function):
    """y = x W^T + b, with W stored as (out_features, in_features) like PyTorch.

    Flatten x to rows x_r (N = everything but the last axis): y_r = W x_r + b, so
        dL/dx = dL/dy W              [N, out] @ [out, in] -> [N, in]
        dL/dW = (dL/dy)^T x          [out, N] @ [N, in]   -> [out, in]
        dL/db = sum_r dL/dy_r
    Working on 2-D row blocks keeps every product one large BLAS call."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear: input shape {tuple(x.shape)} does not match weight shape {tuple(weight.shape)} (in_features {weight.shape[1]})")
        x2 = x.reshape(-1, x.shape[-1])  # [..., in] -> [N, in]
        y = x2 @ weight.T
        if bias is not None:
            y += bias
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])  # [N, out] -> [..., out]

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved
        g2 = grad.reshape(-1, grad.shape[-1])  # [..., out] -> [N, out]
        grad_x = (g2 @ weight).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = g2.T @ x2 if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(axis=0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return Linear.apply(x, weight, bias)


# ============================================================================ embedding


class Embedding(Function):
    """y[..., :] = W[ids[...], :]   (row lookup).

    Each output row is a copy of one row of W, so dL/dW[v] is the sum of dL/dy over every
    position whose id is v: a scatter-add, which counts repeated ids once per occurrence."""

    @staticmethod
    def forward(ctx, weight, ids):
        if ids.dtype.kind not in "iu":
            raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
        vocab = weight.shape[0]
        if ids.size:  # CuPy indexing wraps out-of-range ids silently, so check on every backend
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab:
                bad = low if low < 0 else high
                raise IndexError(f"embedding: id {bad} is out of range for a vocabulary of {vocab} (valid ids are 0..{vocab - 1})")
        ctx.ids, ctx.weight_shape, ctx.dtype = ids, weight.shape, weight.dtype
        return weight[ids]  # [...] -> [..., dim]

    @staticmethod
    def backward(ctx, grad):
        grad_w = backend_of(grad).zeros(ctx.weight_shape, dtype=ctx.dtype)
        backend.index_add(grad_w, ctx.ids.reshape(-1), grad.reshape(-1, ctx.weight_shape[1]))
        return grad_w


def embedding(ids, weight: Tensor) -> Tensor:
    """Rows of `weight` selected by integer `ids` (array or Tensor, any shape)."""
    if isinstance(ids, Tensor):
        ids = ids.data
    return Embedding.apply(weight, ids=backend.to_device(ids, weight.device))


# ============================================================================ layer norm


class LayerNorm(Function):
    """y = xhat * scale + shift, xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps),
    mean and biased var taken over the last axis (C values per row).

    Backward, per row. The easy ones: dL/dshift = sum_rows g, dL/dscale = sum_rows g * xhat.
    For x, let dxhat = g * scale. xhat_i depends on x_j directly and through mean and rstd:
        d mean / dx_j = 1/C,   d rstd / dx_j = -rstd^3 (x_j - mean) / C = -rstd^2 xhat_j / C
        d xhat_i / dx_j = rstd (delta_ij - 1/C) - rstd xhat_i xhat_j / C
    so  dL/dx_j = sum_i dxhat_i d xhat_i / dx_j
                = rstd * (dxhat_j - mean(dxhat) - xhat_j * mean(dxhat * xhat))."""

    @staticmethod
    def forward(ctx, x, scale, shift, eps):
        xp = backend_of(x)
        mean = x.mean(axis=-1, keepdims=True)  # [..., C] -> [..., 1]
        xhat = x - mean
        var = (xhat * xhat).mean(axis=-1, keepdims=True)
        rstd = 1.0 / xp.sqrt(var + eps)
        xhat *= rstd
        ctx.save_for_backward(xhat, rstd, scale)
        return xhat * scale + shift

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, scale = ctx.saved
        rows = tuple(range(grad.ndim - 1))
        grad_shift = grad.sum(axis=rows) if ctx.needs_input_grad[2] else None
        grad_scale = (grad * xhat).sum(axis=rows) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            dxhat = grad * scale
            grad_x = dxhat - dxhat.mean(axis=-1, keepdims=True)
            grad_x -= xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
            grad_x *= rstd
        return grad_x, grad_scale, grad_shift


def layer_norm(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-5) -> Tensor:
    return LayerNorm.apply(x, scale, shift, eps=eps)


# ============================================================================ GELU

_GELU_C = math.sqrt(2.0 / math.pi)


class GELU(Function):
    """y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)   (GPT-2's tanh approximation).

    With t = tanh(u) and dt/du = 1 - t^2:
        dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    Only x is saved; t is recomputed in backward, which costs one tanh but saves a
    full-size buffer (the 4C-wide feed-forward activation is the largest in the block)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        t = backend_of(x).tanh(_GELU_C * (x + 0.044715 * x * x * x))
        t += 1.0
        t *= x
        t *= 0.5
        return t

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        xp = backend_of(x)
        # the formula above, evaluated in place in three buffers (large temporaries are slow)
        x2 = x * x
        t = x2 * 0.044715
        t += 1.0
        t *= x
        t *= _GELU_C
        xp.tanh(t, out=t)                 # t = tanh(u)
        dydx = x2                         # reuse: 0.5 x sqrt(2/pi) (1 + 3 * 0.044715 x^2)
        dydx *= 3 * 0.044715
        dydx += 1.0
        dydx *= x
        dydx *= 0.5 * _GELU_C
        sech2 = t * t                     # 1 - t^2
        sech2 *= -1.0
        sech2 += 1.0
        dydx *= sech2
        t += 1.0                          # + 0.5 (1 + t)
        t *= 0.5
        dydx += t
        dydx *= grad
        return dydx


def gelu(x: Tensor) -> Tensor:
    return GELU.apply(x)


# ============================================================================ softmax


def _softmax(x, axis: int):
    """exp(x - max) / sum exp(x - max): the same value as exp(x)/sum exp(x), but exp never
    sees a positive argument, so it cannot overflow."""
    xp = backend_of(x)
    e = x - x.max(axis=axis, keepdims=True)
    xp.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


class Softmax(Function):
    """y_i = exp(x_i) / sum_j exp(x_j)   along `axis`.

    dy_i/dx_j = y_i (delta_ij - y_j), so dL/dx_j = sum_i g_i y_i (delta_ij - y_j)
              = y_j (g_j - sum_i g_i y_i)."""

    @staticmethod
    def forward(ctx, x, axis):
        y = _softmax(x, axis)
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return y * (grad - (grad * y).sum(axis=ctx.axis, keepdims=True))


class LogSoftmax(Function):
    """y_i = x_i - log sum_j exp(x_j)   along `axis`.

    dy_i/dx_j = delta_ij - softmax_j, so dL/dx_j = g_j - softmax_j sum_i g_i,
    with softmax = exp(y)."""

    @staticmethod
    def forward(ctx, x, axis):
        xp = backend_of(x)
        shifted = x - x.max(axis=axis, keepdims=True)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return grad - backend_of(y).exp(y) * grad.sum(axis=ctx.axis, keepdims=True)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return Softmax.apply(x, axis=axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return LogSoftmax.apply(x, axis=axis)


# ============================================================================ dropout


def _keep_mask(device: str, shape, p: float, seed: int):
    """The dropout mask for `seed`: True where an element is kept (probability 1 - p)."""
    return backend.get_backend(device).uniform(shape, seed) >= p


class Dropout(Function):
    """y = x * keep / (1 - p),  keep ~ Bernoulli(1 - p) per element.   dL/dx = g * keep / (1 - p).

    The mask is not stored: backward draws it again from the same seed."""

    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = p, seed
        return x * _keep_mask(backend.device_of(x), x.shape, p, seed) * _dropout_scale(p)

    @staticmethod
    def backward(ctx, grad):
        return grad * _keep_mask(backend.device_of(grad), grad.shape, ctx.p, ctx.seed) * _dropout_scale(ctx.p)


def _dropout_scale(p: float) -> float:
    return 0.0 if p == 1.0 else 1.0 / (1.0 - p)


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p); identity when
    not training or p == 0."""
    _check_p(p)
    if not training or p == 0.0:
        return x
    return Dropout.apply(x, p=p, seed=backend.get_backend(x.device).random_seed())


# ============================================================================ attention


@functools.lru_cache(maxsize=16)
def _causal_bias(device: str, tq: int, tk: int, dtype):
    """0 where query i may look at key j, -inf where j is in its future. Query i sits at
    position tk - tq + i (the last tq of tk positions, as when decoding with a KV cache).
    Cached: a training run asks for the same (T, T) mask at every layer and step."""
    xp = backend.get_backend(device).xp
    query_pos = xp.arange(tq).reshape(-1, 1) + (tk - tq)
    return xp.where(xp.arange(tk).reshape(1, -1) > query_pos, -math.inf, 0.0).astype(dtype)


class ScaledDotProductAttention(Function):
    """out = dropout(P) V,  P = softmax(S),  S = Q K^T / sqrt(D) (+ -inf above the diagonal).

    Backward, with Pd = P * keep / (1 - p) the dropped-out weights and g = dL/dout:
        dL/dV  = Pd^T g                                  [B,H,Tk,Tq] @ [B,H,Tq,Dv]
        dL/dPd = g V^T,  dL/dP = dL/dPd * keep / (1 - p)
        dL/dS  = P * (dL/dP - rowsum(dL/dP * P))         (softmax backward, row by row)
        dL/dQ  = dL/dS K / sqrt(D),   dL/dK = dL/dS^T Q / sqrt(D)
    Only P (one [B,H,Tq,Tk] buffer) is kept for backward; the dropout mask is redrawn
    from its seed, and masked positions need nothing since P = 0 there."""

    @staticmethod
    def forward(ctx, q, k, v, causal, dropout_p, seed):
        xp = backend_of(q)
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = q @ xp.swapaxes(k, -1, -2)  # [B,H,Tq,D] @ [B,H,D,Tk] -> [B,H,Tq,Tk]
        scores *= scale
        if causal:
            scores += _causal_bias(backend.device_of(q), q.shape[-2], k.shape[-2], scores.dtype)
        probs = scores  # softmax in place: the scores are not needed afterwards
        probs -= probs.max(axis=-1, keepdims=True)
        xp.exp(probs, out=probs)
        probs /= probs.sum(axis=-1, keepdims=True)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        if dropout_p > 0.0:
            probs = probs * _keep_mask(backend.device_of(q), probs.shape, dropout_p, seed) * _dropout_scale(dropout_p)
        return probs @ v  # [B,H,Tq,Tk] @ [B,H,Tk,Dv] -> [B,H,Tq,Dv]

    @staticmethod
    def backward(ctx, grad):
        q, k, v, probs = ctx.saved
        xp = backend_of(grad)
        p = ctx.dropout_p
        keep = _keep_mask(backend.device_of(grad), probs.shape, p, ctx.seed) if p > 0.0 else None
        grad_v = None
        if ctx.needs_input_grad[2]:
            dropped = probs if keep is None else probs * keep * _dropout_scale(p)
            grad_v = xp.swapaxes(dropped, -1, -2) @ grad
            del dropped
        dscores = grad @ xp.swapaxes(v, -1, -2)  # dL/dPd: [B,H,Tq,Dv] @ [B,H,Dv,Tk]
        if keep is not None:
            dscores *= keep
            dscores *= _dropout_scale(p)
            del keep
        dscores -= (dscores * probs).sum(axis=-1, keepdims=True)
        dscores *= probs
        dscores *= ctx.scale
        grad_q = dscores @ k if ctx.needs_input_grad[0] else None
        grad_k = xp.swapaxes(dscores, -1, -2) @ q if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, grad_v


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, dropout_p: float = 0.0) -> Tensor:
    """Attention over q, k, v of shape (B, H, T, D); `causal` hides future keys.
    Pass dropout_p=0 at evaluation time (as with PyTorch's function of the same name)."""
    if not (q.ndim == k.ndim == v.ndim) or q.ndim < 2 or q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2] \
            or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not agree; "
                         "expected (..., Tq, D), (..., Tk, D), (..., Tk, Dv) with equal leading axes")
    if causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(f"attention: causal attention needs at least as many keys ({k.shape[-2]}) as queries ({q.shape[-2]})")
    _check_p(dropout_p)
    seed = backend.get_backend(q.device).random_seed() if dropout_p > 0.0 else 0
    return ScaledDotProductAttention.apply(q, k, v, causal=causal, dropout_p=dropout_p, seed=seed)


# ============================================================================ cross-entropy


class CrossEntropy(Function):
    """loss = mean over rows r with t_r != ignore_index of  -log softmax(z_r)[t_r]
            = mean_r (logsumexp(z_r) - z_r[t_r]).

    d/dz_rc of logsumexp(z_r) - z_r[t_r] is softmax(z_r)_c - [c == t_r], so
        dL/dz_r = (softmax(z_r) - onehot(t_r)) * g / n   for counted rows, 0 for ignored ones.
    Forward keeps only logsumexp per row (the logits are alive anyway); backward rebuilds
    softmax as exp(z - logsumexp) directly into the gradient buffer, so a 50,257-way
    vocabulary costs one extra full-size array, not three."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        xp = backend_of(logits)
        classes = logits.shape[-1]
        z = logits.reshape(-1, classes)  # [..., V] -> [N, V]
        t = targets.reshape(-1)
        if z.shape[0] != t.shape[0]:
            raise ValueError(f"cross_entropy: logits shape {tuple(logits.shape)} and targets shape {tuple(targets.shape)} do not match")
        counted = t != ignore_index
        n = int(counted.sum())
        if n == 0:
            raise ValueError(f"cross_entropy: every target equals ignore_index ({ignore_index}); the mean over no targets is undefined")
        t = xp.where(counted, t, 0)
        low, high = int(t.min()), int(t.max())
        if low < 0 or high >= classes:
            raise IndexError(f"cross_entropy: target {low if low < 0 else high} is out of range for {classes} classes")
        rows = xp.arange(z.shape[0])
        m = z.max(axis=1, keepdims=True)
        lse = (m + xp.log(xp.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
        loss = ((lse - z[rows, t]) * counted).sum() / n
        ctx.save_for_backward(z, lse, t, counted)
        ctx.n, ctx.shape = n, logits.shape
        return xp.asarray(loss, dtype=logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, lse, t, counted = ctx.saved
        xp = backend_of(z)
        dz = z - lse[:, None]
        xp.exp(dz, out=dz)  # softmax(z)
        dz[xp.arange(z.shape[0]), t] -= 1.0
        dz *= (grad / ctx.n) * counted[:, None]
        return dz.reshape(ctx.shape)


def cross_entropy(logits: Tensor, targets, ignore_index: int = -100) -> Tensor:
    """Mean negative log-likelihood of integer `targets` (N,) under `logits` (N, C); rows whose
    target is `ignore_index` are skipped. Leading axes are flattened, so (B, T, C) logits with
    (B, T) targets work too (the class axis is last, unlike PyTorch's (N, C, d1) layout)."""
    if isinstance(targets, Tensor):
        targets = targets.data
    return CrossEntropy.apply(logits, targets=backend.to_device(targets, logits.device), ignore_index=ignore_index)
