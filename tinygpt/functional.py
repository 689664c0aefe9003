"""The fused operations a GPT is built from, each with a hand-derived backward.

Each op is a `Function` whose docstring states its forward in one line of math, then derives
its backward. The code under it is that math on whole arrays: the backward is computed in
closed form from a few saved arrays, and no op here builds a graph of smaller ops. Shapes use
B batch, T tokens, C channels, H heads, D head size, V vocabulary, N rows (all axes but the
last, flattened).

This plain math is the reference. A faster version of an op, for the CPU (blocked, on every
core) or for CUDA (fused kernels), lives in tinygpt/kernels/ under the same name and is
tested against it; `fast = kernels.for_array(x)` picks it, and is None on the strict backend
or with TINYGPT_KERNELS=plain, when the math below is what runs.
"""
from __future__ import annotations

import math

from tinygpt import backend, kernels, op_checks
from tinygpt.backend import backend_of
from tinygpt.kernels import GELU_CUBIC, SQRT_2_OVER_PI
from tinygpt.tensor import Function, Tensor


def _swap(xp, a):
    """a with its last two axes swapped (the transpose of each matrix in a batch)."""
    return xp.swapaxes(a, -1, -2)


# ============================================================================ linear


class Linear(Function):
    """y = x W^T + b, with W stored as (out_features, in_features) like PyTorch.

    Flatten x to rows x_r (N = everything but the last axis): y_r = W x_r + b, so
        dL/dx = dL/dy W              [N, out] @ [out, in] -> [N, in]
        dL/dW = (dL/dy)^T x          [out, N] @ [N, in]   -> [out, in]
        dL/db = sum_r dL/dy_r
    Working on 2-D rows keeps every product one large matrix product.

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-linear], [DEVICE-mlp_chain]
    test_torch_parity_ops.py::test_linear_matches_torch
    test_kernels.py::test_cpu_kernels_match_the_plain_math_element_by_element[linear*] (in tests/)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        matmul = kernels.matmul_for(x)
        x2 = x.reshape(-1, x.shape[-1])  # [..., in] -> [N, in]
        y = matmul(x2, weight.T)  # [N, in] @ [in, out] -> [N, out]
        if bias is not None:
            y += bias
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])  # [N, out] -> [..., out]

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved
        matmul = kernels.matmul_for(grad)
        g2 = grad.reshape(-1, grad.shape[-1])  # [..., out] -> [N, out]
        grad_x = matmul(g2, weight).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = matmul(g2.T, x2) if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(axis=0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b for x (..., in_features), weight (out_features, in_features), bias (out_features,)."""
    op_checks.linear(x, weight, bias)
    return Linear.apply(x, weight, bias)


# ============================================================================ embedding


class Embedding(Function):
    """y[..., :] = W[ids[...], :]   (row lookup).

    Each output row is a copy of one row of W, so dL/dW[v] is the sum of dL/dy over every
    position whose id is v: a scatter-add, which counts repeated ids once per occurrence.

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-embedding]
    test_torch_parity_ops.py::test_embedding_matches_torch_with_repeated_ids
    test_kernels.py::test_cpu_kernels_match_the_plain_math_element_by_element[embedding*] (in tests/)."""

    @staticmethod
    def forward(ctx, weight, ids):
        ctx.ids, ctx.vocab = ids, weight.shape[0]
        return weight[ids]  # [...] -> [..., C]

    @staticmethod
    def backward(ctx, grad):
        ids, g2 = ctx.ids.reshape(-1), grad.reshape(-1, grad.shape[-1])  # [...] -> [N], [..., C] -> [N, C]
        if (fast := kernels.for_array(grad)) is not None:
            return fast.embedding_backward(ids, g2, ctx.vocab)
        grad_w = backend_of(grad).zeros((ctx.vocab, g2.shape[1]), dtype=g2.dtype)
        backend.index_add(grad_w, ids, g2)  # grad_w[ids[r]] += g2[r] for every row r, repeats included
        return grad_w


def embedding(ids, weight: Tensor) -> Tensor:
    """Rows of `weight` (vocab, C) selected by integer `ids` (array or Tensor, any shape)."""
    ids = backend.to_device(ids.data if isinstance(ids, Tensor) else ids, weight.device)
    op_checks.embedding(ids, weight)
    return Embedding.apply(weight, ids=ids)


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

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-layer_norm], [DEVICE-mlp_chain]
    test_torch_parity_ops.py::test_layer_norm_matches_torch
    test_kernels.py::test_cpu_kernels_match_the_plain_math_element_by_element[layer_norm*] (in tests/)."""

    @staticmethod
    def forward(ctx, x, scale, shift, eps):
        xp = backend_of(x)
        x2 = x.reshape(-1, x.shape[-1])  # [..., C] -> [N, C]
        if (fast := kernels.for_array(x)) is not None:
            y, xhat, rstd = fast.layer_norm_forward(x2, scale, shift, eps)
        else:
            mean = x2.mean(axis=-1, keepdims=True)  # [N, 1]
            var = ((x2 - mean) ** 2).mean(axis=-1, keepdims=True)
            rstd = 1.0 / xp.sqrt(var + eps)
            xhat = (x2 - mean) * rstd
            y = xhat * scale + shift
        ctx.save_for_backward(xhat, rstd, scale)
        ctx.x_shape = x.shape
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, scale = ctx.saved
        g2 = grad.reshape(xhat.shape)  # [..., C] -> [N, C]
        if (fast := kernels.for_array(grad)) is not None:
            grad_x, grad_scale, grad_shift = fast.layer_norm_backward(g2, xhat, rstd, scale)
        else:
            grad_shift = g2.sum(axis=0)  # [N, C] -> [C]
            grad_scale = (g2 * xhat).sum(axis=0)
            dxhat = g2 * scale
            grad_x = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        return grad_x.reshape(ctx.x_shape), grad_scale, grad_shift


def layer_norm(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalise x (..., C) over its last axis, then scale and shift, both (C,)."""
    op_checks.layer_norm(x, scale, shift, eps)
    return LayerNorm.apply(x, scale, shift, eps=eps)


# ============================================================================ GELU


class GELU(Function):
    """y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)   (GPT-2's tanh approximation).

    With t = tanh(u) and dt/du = 1 - t^2:
        dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,   du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    Only x is saved; t is recomputed in backward, which costs one tanh but saves a
    full-size buffer (the 4C-wide feed-forward activation is the largest in the block).
    (x * x * x, not x**3: NumPy computes a power of 3 with the general pow, 40 times slower.)

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-gelu], [DEVICE-mlp_chain]
    test_torch_parity_ops.py::test_gelu_matches_torch_tanh_approximation
    test_kernels.py::test_cpu_kernels_match_the_plain_math_element_by_element[gelu*] (in tests/)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        if (fast := kernels.for_array(x)) is not None:
            return fast.gelu_forward(x)
        return 0.5 * x * (1.0 + backend_of(x).tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        if (fast := kernels.for_array(x)) is not None:
            return fast.gelu_backward(x, grad)
        t = backend_of(x).tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x))
        du_dx = SQRT_2_OVER_PI * (1.0 + 3 * GELU_CUBIC * x**2)
        return grad * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * du_dx)


def gelu(x: Tensor) -> Tensor:
    return GELU.apply(x)


# ============================================================================ softmax


class Softmax(Function):
    """y_i = exp(x_i) / sum_j exp(x_j)   along `axis`,
    computed as exp(x_i - max) / sum_j exp(x_j - max): the same value, but exp never sees a
    positive argument, so it cannot overflow.

    dy_i/dx_j = y_i (delta_ij - y_j), so dL/dx_j = sum_i g_i y_i (delta_ij - y_j)
              = y_j (g_j - sum_i g_i y_i).

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-softmax]
    test_torch_parity_ops.py::test_softmax_and_log_softmax_match_torch (in tests/)."""

    @staticmethod
    def forward(ctx, x, axis):
        y = backend_of(x).exp(x - x.max(axis=axis, keepdims=True))
        y /= y.sum(axis=axis, keepdims=True)
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return y * (grad - (grad * y).sum(axis=ctx.axis, keepdims=True))


class LogSoftmax(Function):
    """y_i = x_i - log sum_j exp(x_j)   along `axis` (with the max subtracted first, as in softmax).

    dy_i/dx_j = delta_ij - softmax_j, so dL/dx_j = g_j - softmax_j sum_i g_i,
    with softmax = exp(y).

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-log_softmax]
    test_torch_parity_ops.py::test_softmax_and_log_softmax_match_torch (in tests/)."""

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
    op_checks.axis("softmax", x, axis)
    return Softmax.apply(x, axis=axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    op_checks.axis("log_softmax", x, axis)
    return LogSoftmax.apply(x, axis=axis)


# ============================================================================ dropout


def _keep_scaled(x, p: float, seed: int):
    """keep / (1 - p) for an array shaped like x, keep = (uniform >= p) drawn from `seed`:
    the mask is never stored, backward draws it again from the same seed. (A data-parallel
    rank draws its rows' part of the whole batch's mask: backend.batch_shard.)"""
    keep = backend.get_backend(backend.device_of(x)).uniform(x.shape, seed, backend.mask_start(x.shape)) >= p
    return (keep * (0.0 if p == 1.0 else 1.0 / (1.0 - p))).astype(x.dtype)


class Dropout(Function):
    """y = x * keep / (1 - p),  keep ~ Bernoulli(1 - p) per element.   dL/dx = g * keep / (1 - p).

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-dropout-P]
    test_kernels.py::test_cpu_kernels_match_the_plain_math_element_by_element[dropout*] (in tests/)."""

    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = p, seed
        if (fast := kernels.for_array(x)) is not None:
            return fast.dropout(x, p, seed)
        return x * _keep_scaled(x, p, seed)

    @staticmethod
    def backward(ctx, grad):
        if (fast := kernels.for_array(grad)) is not None:
            return fast.dropout(grad, ctx.p, ctx.seed)
        return grad * _keep_scaled(grad, ctx.p, ctx.seed)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p); identity when
    not training or p == 0."""
    op_checks.dropout_p(p)
    if not training or p == 0.0:
        return x
    return Dropout.apply(x, p=p, seed=backend.get_backend(x.device).random_seed())


# ============================================================================ attention


class ScaledDotProductAttention(Function):
    """out = dropout(P) V,  P = softmax(S),  S = Q K^T / sqrt(D) (-inf where a key is in the
    query's future, when causal).

    Backward, with Pd = P * keep / (1 - p) the dropped-out weights and g = dL/dout:
        dL/dV  = Pd^T g                                  [B,H,Tk,Tq] @ [B,H,Tq,Dv]
        dL/dPd = g V^T,  dL/dP = dL/dPd * keep / (1 - p)
        dL/dS  = P * (dL/dP - rowsum(dL/dP * P))         (softmax backward, row by row)
        dL/dQ  = dL/dS K / sqrt(D),   dL/dK = dL/dS^T Q / sqrt(D)
    Only P (one [B,H,Tq,Tk] buffer) is kept for backward; the dropout mask is redrawn
    from its seed, and masked positions need nothing since P = 0 there.

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-attention], [DEVICE-attention_dropout]
    test_torch_parity_ops.py::test_scaled_dot_product_attention_matches_torch
    test_kernels.py::test_cpu_kernels_match_the_plain_math_element_by_element[*attention*] (in tests/)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, dropout_p, seed):
        xp = backend_of(q)
        ctx.scale, ctx.dropout_p, ctx.seed = 1.0 / math.sqrt(q.shape[-1]), dropout_p, seed
        if (fast := kernels.for_array(q)) is not None:
            out, probs = fast.attention_forward(q, k, v, causal, dropout_p, seed)
        else:
            scores = q @ _swap(xp, k) * ctx.scale  # [B,H,Tq,D] @ [B,H,D,Tk] -> [B,H,Tq,Tk]
            if causal:
                scores = xp.where(_future(xp, *scores.shape[-2:]), -math.inf, scores)
            probs = xp.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)  # softmax over the keys
            dropped = probs * _keep_scaled(probs, dropout_p, seed) if dropout_p > 0.0 else probs
            out = dropped @ v  # [B,H,Tq,Tk] @ [B,H,Tk,Dv] -> [B,H,Tq,Dv]
        ctx.save_for_backward(q, k, v, probs)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, probs = ctx.saved
        xp = backend_of(grad)
        if (fast := kernels.for_array(grad)) is not None:
            return fast.attention_backward(grad, q, k, v, probs, ctx.dropout_p, ctx.seed, ctx.needs_input_grad[:3])
        keep = _keep_scaled(probs, ctx.dropout_p, ctx.seed) if ctx.dropout_p > 0.0 else 1.0
        grad_v = _swap(xp, probs * keep) @ grad  # Pd^T g: [B,H,Tk,Tq] @ [B,H,Tq,Dv] -> [B,H,Tk,Dv]
        grad_probs = (grad @ _swap(xp, v)) * keep  # [B,H,Tq,Dv] @ [B,H,Dv,Tk] -> [B,H,Tq,Tk]
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(axis=-1, keepdims=True))
        grad_q = grad_scores @ k * ctx.scale  # [B,H,Tq,Tk] @ [B,H,Tk,D] -> [B,H,Tq,D]
        grad_k = _swap(xp, grad_scores) @ q * ctx.scale  # [B,H,Tk,Tq] @ [B,H,Tq,D] -> [B,H,Tk,D]
        return grad_q, grad_k, grad_v


def _future(xp, tq: int, tk: int):
    """True where key j is in the future of query i: j > i + (tk - tq). Query i sits at
    position tk - tq + i, the last tq of tk positions (as when decoding with a KV cache)."""
    return xp.arange(tk).reshape(1, -1) > xp.arange(tq).reshape(-1, 1) + (tk - tq)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, dropout_p: float = 0.0) -> Tensor:
    """Attention over q, k, v of shape (B, H, T, D); `causal` hides future keys.
    Pass dropout_p=0 at evaluation time (as with PyTorch's function of the same name)."""
    op_checks.attention(q, k, v, causal, dropout_p)
    seed = backend.get_backend(q.device).random_seed() if dropout_p > 0.0 else 0
    return ScaledDotProductAttention.apply(q, k, v, causal=causal, dropout_p=dropout_p, seed=seed)


# ============================================================================ cross-entropy


class CrossEntropy(Function):
    """loss = mean over rows r with t_r != ignore_index of  -log softmax(z_r)[t_r]
            = mean_r (logsumexp(z_r) - z_r[t_r]),
    logsumexp(z) = m + log sum_c exp(z_c - m), m = max_c z_c (exp never overflows).

    d/dz_rc of logsumexp(z_r) - z_r[t_r] is softmax(z_r)_c - [c == t_r], so
        dL/dz_r = (softmax(z_r) - onehot(t_r)) * g / n   for counted rows, 0 for ignored ones.
    Forward keeps only logsumexp per row (the logits are alive anyway); backward rebuilds
    softmax from it as exp(z - logsumexp).

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-cross_entropy], [DEVICE-mlp_chain]
    test_torch_parity_ops.py::test_cross_entropy_matches_torch_with_ignored_targets
    test_kernels.py::test_cpu_kernels_match_the_plain_math_element_by_element[cross_entropy*] (in tests/)."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        xp = backend_of(logits)
        z, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)  # [..., V] -> [N, V], [...] -> [N]
        counted = t != ignore_index
        n = int(counted.sum())
        t = xp.where(counted, t, 0)  # ignored rows look at class 0, then count 0 times
        if (fast := kernels.for_array(z)) is not None:
            lse = fast.logsumexp_rows(z)
        else:
            m = z.max(axis=1, keepdims=True)  # [N, 1]
            lse = (m + xp.log(xp.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]  # [N]
        loss = ((lse - z[xp.arange(z.shape[0]), t]) * counted).sum() / n
        ctx.save_for_backward(z, lse, t, counted)
        ctx.n, ctx.shape = n, logits.shape
        return xp.asarray(loss, dtype=logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, lse, t, counted = ctx.saved
        xp = backend_of(z)
        weight = (grad / ctx.n) * counted[:, None]  # g / n on counted rows, 0 on ignored ones: [N, 1]
        if (fast := kernels.for_array(z)) is not None:
            return fast.cross_entropy_backward(z, lse, t, weight).reshape(ctx.shape)
        dz = xp.exp(z - lse[:, None])  # softmax(z): [N, V]
        dz[xp.arange(z.shape[0]), t] -= 1.0  # - onehot(t)
        dz *= weight
        return dz.reshape(ctx.shape)


def cross_entropy(logits: Tensor, targets, ignore_index: int = -100) -> Tensor:
    """Mean negative log-likelihood of integer `targets` (N,) under `logits` (N, C); rows whose
    target is `ignore_index` are skipped. Leading axes are flattened, so (B, T, C) logits with
    (B, T) targets work too (the class axis is last, unlike PyTorch's (N, C, d1) layout)."""
    targets = backend.to_device(targets.data if isinstance(targets, Tensor) else targets, logits.device)
    op_checks.cross_entropy(logits, targets, ignore_index)
    return CrossEntropy.apply(logits, targets=targets, ignore_index=ignore_index)
