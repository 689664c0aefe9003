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
        y = _matmul(x2, weight.T)
        if bias is not None:
            y += bias
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])  # [N, out] -> [..., out]

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved
        g2 = grad.reshape(-1, grad.shape[-1])  # [..., out] -> [N, out]
        grad_x = _matmul(g2, weight).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = _matmul(g2.T, x2) if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(axis=0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _matmul(a, b):
    """a @ b for 2-D arrays, on all cores (backend.matmul)."""
    return _backend(a).matmul(a, b)


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
                = rstd * (dxhat_j - mean(dxhat) - xhat_j * mean(dxhat * xhat)).
    Rows are independent, so both directions run block by block (backend.run_blocks);
    the two parameter gradients are sums over rows: each block adds up its own rows, and
    the blocks' partial sums are added at the end."""

    @staticmethod
    def forward(ctx, x, scale, shift, eps):
        xp = backend_of(x)
        x2 = x.reshape(-1, x.shape[-1])  # [..., C] -> [N, C]
        ctx.x_shape = x.shape
        if (kernels := _kernels(x)) is not None:
            y, xhat, rstd = kernels.layer_norm_forward(x2, scale, shift, eps)
            ctx.save_for_backward(xhat, rstd, scale)
            return y.reshape(x.shape)
        dtype = xp.result_type(x.dtype, scale.dtype, shift.dtype)  # as x * scale + shift would give
        xhat, y = xp.empty(x2.shape, dtype=dtype), xp.empty(x2.shape, dtype=dtype)
        rstd = xp.empty((x2.shape[0], 1), dtype=dtype)

        def block(s):
            mean = x2[s].mean(axis=-1, keepdims=True)
            xp.subtract(x2[s], mean, out=xhat[s])
            var = (xhat[s] * xhat[s]).mean(axis=-1, keepdims=True)
            rstd[s] = 1.0 / xp.sqrt(var + eps)
            xhat[s] *= rstd[s]
            xp.multiply(xhat[s], scale, out=y[s])
            y[s] += shift

        _run_rows(block, x2)
        ctx.save_for_backward(xhat, rstd, scale)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, scale = ctx.saved
        xp = backend_of(grad)
        g2 = grad.reshape(xhat.shape)
        if (kernels := _kernels(grad)) is not None:
            grad_x, grad_scale, grad_shift = kernels.layer_norm_backward(g2, xhat, rstd, scale)
            return grad_x.reshape(ctx.x_shape), grad_scale, grad_shift
        grad_x = xp.empty_like(xhat) if ctx.needs_input_grad[0] else None
        rows = backend.rows_per_block(xhat.shape[1])
        partial_scale = xp.zeros((-(-xhat.shape[0] // rows), xhat.shape[1]), dtype=xhat.dtype)  # one row per block
        partial_shift = xp.zeros_like(partial_scale)

        def block(s):
            i = s.start // rows
            partial_shift[i] = g2[s].sum(axis=0)
            partial_scale[i] = (g2[s] * xhat[s]).sum(axis=0)
            if grad_x is not None:
                dxhat = g2[s] * scale
                xp.subtract(dxhat, dxhat.mean(axis=-1, keepdims=True), out=grad_x[s])
                dxhat *= xhat[s]
                grad_x[s] -= xhat[s] * dxhat.mean(axis=-1, keepdims=True)
                grad_x[s] *= rstd[s]

        _backend(grad).run_blocks(block, xhat.shape[0], rows)
        grad_scale = partial_scale.sum(axis=0) if ctx.needs_input_grad[1] else None
        grad_shift = partial_shift.sum(axis=0) if ctx.needs_input_grad[2] else None
        return None if grad_x is None else grad_x.reshape(ctx.x_shape), grad_scale, grad_shift


def _backend(x) -> backend.Backend:
    """The Backend object that holds array x."""
    return backend.get_backend(backend.device_of(x))


def _kernels(x):
    """The backend's fused kernels for x's device (CUDA), or None: run the array code here."""
    return _backend(x).kernels


def _rows(x):
    """x as a 2-D array of rows, [..., C] -> [N, C] (a 0-d x as one 1 x 1 row)."""
    return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


def _run_rows(block, x2) -> None:
    """block(s) over row blocks of the 2-D array x2, on x2's backend (see run_blocks)."""
    _backend(x2).run_blocks(block, x2.shape[0], backend.rows_per_block(x2.shape[1]))


def layer_norm(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-5) -> Tensor:
    return LayerNorm.apply(x, scale, shift, eps=eps)


# ============================================================================ GELU

_GELU_C = math.sqrt(2.0 / math.pi)


class GELU(Function):
    """y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)   (GPT-2's tanh approximation).

    With t = tanh(u) and dt/du = 1 - t^2:
        dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    Only x is saved; t is recomputed in backward, which costs one tanh but saves a
    full-size buffer (the 4C-wide feed-forward activation is the largest in the block).
    Both directions run block by block, each block's steps in place in a buffer or two
    small enough to stay in cache."""

    @staticmethod
    def forward(ctx, x):
        xp = backend_of(x)
        ctx.save_for_backward(x)
        if (kernels := _kernels(x)) is not None:
            return kernels.gelu_forward(x)
        x2 = _rows(x)
        y = xp.empty_like(x2)

        def block(s):
            xs, t = x2[s], y[s]
            xp.multiply(xs, xs, out=t)   # u = sqrt(2/pi) (x + 0.044715 x^3) = sqrt(2/pi) x (1 + 0.044715 x^2)
            t *= 0.044715
            t += 1.0
            t *= xs
            t *= _GELU_C
            xp.tanh(t, out=t)            # t = tanh(u)
            t += 1.0                     # y = 0.5 x (1 + t)
            t *= xs
            t *= 0.5

        _run_rows(block, x2)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        xp = backend_of(x)
        if (kernels := _kernels(x)) is not None:
            return kernels.gelu_backward(x, grad)
        x2 = _rows(x)
        g2 = grad.reshape(x2.shape)
        dx = xp.empty_like(x2)

        def block(s):
            xs, dydx = x2[s], dx[s]
            x_sq = xs * xs
            xp.multiply(x_sq, 3 * 0.044715, out=dydx)  # 0.5 x sqrt(2/pi) (1 + 3 * 0.044715 x^2)
            dydx += 1.0
            dydx *= xs
            dydx *= 0.5 * _GELU_C
            t = x_sq                                   # reuse: t = tanh(u)
            t *= 0.044715
            t += 1.0
            t *= xs
            t *= _GELU_C
            xp.tanh(t, out=t)
            dydx *= 1.0 - t * t                        # ... * (1 - t^2)
            t += 1.0                                   # + 0.5 (1 + t)
            t *= 0.5
            dydx += t
            dydx *= g2[s]

        _run_rows(block, x2)
        return dx.reshape(x.shape)


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

    The mask is not stored: backward draws it again from the same seed. Row blocks draw
    their parts of the mask from seed + first row, so blocks can run side by side."""

    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = p, seed
        return _apply_mask(x, p, seed)

    @staticmethod
    def backward(ctx, grad):
        return _apply_mask(grad, ctx.p, ctx.seed)


def _apply_mask(x, p: float, seed: int):
    """x * keep / (1 - p), with the mask drawn block by block from seed."""
    xp, device = backend_of(x), backend.device_of(x)
    x2 = _rows(x)
    y = xp.empty_like(x2)

    def block(s):
        xp.multiply(x2[s], _keep_mask(device, x2[s].shape, p, seed + s.start), out=y[s])
        y[s] *= _dropout_scale(p)

    _run_rows(block, x2)
    return y.reshape(x.shape)


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
    from its seed, and masked positions need nothing since P = 0 there.

    Sequences are independent, so both directions run block by block over the batch
    (backend.run_blocks): each block's scores stay small and its products run beside the
    other blocks'. Results are written in [B, T, H, D] memory and returned as [B, H, T, D]
    views, the layout the heads came from, so joining heads afterwards copies nothing."""

    @staticmethod
    def forward(ctx, q, k, v, causal, dropout_p, seed):
        xp, device = backend_of(q), backend.device_of(q)
        (*lead, tq, d), tk, dv = q.shape, k.shape[-2], v.shape[-1]
        scale = 1.0 / math.sqrt(d)
        dtype = xp.result_type(q.dtype, k.dtype, v.dtype)
        probs = xp.empty((*lead, tq, tk), dtype=dtype)
        out = _heads_last(xp, (*lead, tq, dv), dtype)
        kernels = _kernels(q)
        bias = _causal_bias(device, tq, tk, dtype) if causal and kernels is None else None

        def block(s):
            p = probs[s]
            xp.matmul(q[s], xp.swapaxes(k[s], -1, -2), out=p)  # S: [b,H,Tq,D] @ [b,H,D,Tk] -> [b,H,Tq,Tk]
            if kernels is not None:
                kernels.attention_softmax_(p, scale, causal)
            else:
                p *= scale
                if bias is not None:
                    p += bias
                p -= p.max(axis=-1, keepdims=True)  # softmax in place (the scores are not needed afterwards)
                xp.exp(p, out=p)
                p /= p.sum(axis=-1, keepdims=True)
            if dropout_p > 0.0:
                p = p * _keep_mask(device, p.shape, dropout_p, seed + (s.start or 0)) * _dropout_scale(dropout_p)
            out[s] = p @ v[s]  # [b,H,Tq,Tk] @ [b,H,Tk,Dv] -> [b,H,Tq,Dv]

        _run_batch(block, q)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, probs = ctx.saved
        xp, device = backend_of(grad), backend.device_of(grad)
        p_drop, need_q, need_k, need_v = ctx.dropout_p, *ctx.needs_input_grad[:3]
        grad_q = _heads_last(xp, q.shape, q.dtype) if need_q else None
        grad_k = _heads_last(xp, k.shape, k.dtype) if need_k else None
        grad_v = _heads_last(xp, v.shape, v.dtype) if need_v else None
        kernels = _kernels(grad)

        def block(s):
            p, g = probs[s], grad[s]
            keep = _keep_mask(device, p.shape, p_drop, ctx.seed + (s.start or 0)) if p_drop > 0.0 else None
            if need_v:
                dropped = p if keep is None else p * keep * _dropout_scale(p_drop)
                grad_v[s] = xp.swapaxes(dropped, -1, -2) @ g  # Pd^T g
            dscores = g @ xp.swapaxes(v[s], -1, -2)  # dL/dPd: [b,H,Tq,Dv] @ [b,H,Dv,Tk]
            if keep is not None:
                dscores *= keep
                dscores *= _dropout_scale(p_drop)
            if kernels is not None:
                kernels.softmax_backward_(dscores, p, ctx.scale)
            else:
                dscores -= (dscores * p).sum(axis=-1, keepdims=True)
                dscores *= p
                dscores *= ctx.scale
            if need_q:
                grad_q[s] = dscores @ k[s]
            if need_k:
                grad_k[s] = xp.swapaxes(dscores, -1, -2) @ q[s]

        _run_batch(block, probs)
        return grad_q, grad_k, grad_v


def _heads_last(xp, shape, dtype):
    """An empty [..., H, T, D] array laid out in memory as [..., T, H, D]."""
    if len(shape) < 3:
        return xp.empty(shape, dtype=dtype)
    *lead, h, t, d = shape
    return xp.swapaxes(xp.empty((*lead, t, h, d), dtype=dtype), -2, -3)


def _run_batch(block, x) -> None:
    """block(s) over slices of x's first axis, one sequence per block (all of x when it
    has no batch axis)."""
    bk = _backend(x)
    if x.ndim < 3:
        block(slice(None))  # (T, D) inputs: one block
        return
    bk.run_blocks(block, x.shape[0], 1)


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
    softmax as exp(z - logsumexp) directly into the gradient buffer. Both run block by
    block over rows, so a 50,257-way vocabulary needs no full-size temporary besides that
    gradient."""

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
        lse = xp.empty(z.shape[0], dtype=z.dtype)
        kernels = _kernels(z)

        def block(s):  # lse = m + log sum exp(z - m), m = max(z): exp never overflows
            if kernels is not None:
                lse[s] = kernels.logsumexp_rows(z[s])
                return
            m = z[s].max(axis=1, keepdims=True)
            e = z[s] - m
            xp.exp(e, out=e)
            lse[s] = (m + xp.log(e.sum(axis=1, keepdims=True)))[:, 0]

        _run_rows(block, z)
        loss = ((lse - z[xp.arange(z.shape[0]), t]) * counted).sum() / n
        ctx.save_for_backward(z, lse, t, counted)
        ctx.n, ctx.shape = n, logits.shape
        return xp.asarray(loss, dtype=logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, lse, t, counted = ctx.saved
        xp = backend_of(z)
        weight = (grad / ctx.n) * counted[:, None]  # g / n on counted rows, 0 on ignored ones
        if (kernels := _kernels(z)) is not None:
            return kernels.cross_entropy_backward(z, lse, t, weight).reshape(ctx.shape)
        dz = xp.empty_like(z)

        def block(s):
            xp.subtract(z[s], lse[s, None], out=dz[s])
            xp.exp(dz[s], out=dz[s])  # softmax(z)
            rows = xp.arange(s.start, s.stop)
            dz[rows, t[s]] -= 1.0
            dz[s] *= weight[s]

        _run_rows(block, z)
        return dz.reshape(ctx.shape)


def cross_entropy(logits: Tensor, targets, ignore_index: int = -100) -> Tensor:
    """Mean negative log-likelihood of integer `targets` (N,) under `logits` (N, C); rows whose
    target is `ignore_index` are skipped. Leading axes are flattened, so (B, T, C) logits with
    (B, T) targets work too (the class axis is last, unlike PyTorch's (N, C, d1) layout)."""
    if isinstance(targets, Tensor):
        targets = targets.data
    return CrossEntropy.apply(logits, targets=backend.to_device(targets, logits.device), ignore_index=ignore_index)
