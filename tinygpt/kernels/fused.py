"""The fused ops, fast: functional's op classes under the same names, computed by the kernels
of the array's device (cpu.py or cuda.py, which have the same functions: see kernels/__init__).

Each class subclasses the plain op and replaces its forward and/or backward with the same
signature, so `Function.apply` can run either one (dispatch.implementation picks). What a
method saves for backward is its own business: the forward and backward of one call always
come from the same class. The docstrings of the plain ops have the math.
"""
from __future__ import annotations

from tinygpt import functional as F
from tinygpt import dispatch, kernels
from tinygpt.backend import backend_of, device_of
from tinygpt.functional.loss import rows_and_targets


def _on(x):
    """The kernel module (cpu or cuda) for the device of array x."""
    return kernels.module_of(device_of(x))


@dispatch.register
class Linear(F.Linear):
    """Matrix products split across the CPU's threads (cuBLAS already uses the whole GPU)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])  # [..., in] -> [N, in]
        y = _on(x).matmul(x2, weight.T)
        if bias is not None:
            y += bias
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved
        matmul = _on(grad).matmul
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = matmul(g2, weight).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = _weight_grad(matmul, g2, x2) if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(axis=0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _weight_grad(matmul, g2, x2):
    """dW = g^T x, as the product whose rows are the larger of W's two sizes. A weight with few
    output rows (a grouped-query key or value projection: 192) would make g^T x a product of
    fewer than threads.FEW_ROWS rows, run on BLAS's own threads; those threads keep spinning
    after it and take a core from the thread pool's next products (measured in a SmolLM2
    training step: every Linear backward 1.5-2x slower). (x^T g)^T has more rows: the pool runs it."""
    if g2.shape[1] < x2.shape[1]:
        return backend_of(g2).ascontiguousarray(matmul(x2.T, g2).T)
    return matmul(g2.T, x2)


@dispatch.register
class Embedding(F.Embedding):
    """The forward is a plain lookup; the backward's scatter-add is a sort and a segmented sum
    on the CPU and atomic adds on the GPU."""

    @staticmethod
    def backward(ctx, grad):
        ids, g2 = ctx.ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        return _on(grad).embedding_backward(ids, g2, ctx.vocab)


@dispatch.register
class LayerNorm(F.LayerNorm):
    @staticmethod
    def forward(ctx, x, scale, shift, eps):
        y, xhat, rstd = _on(x).layer_norm_forward(x.reshape(-1, x.shape[-1]), scale, shift, eps)
        ctx.save_for_backward(xhat, rstd, scale)
        ctx.x_shape = x.shape
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, scale = ctx.saved
        grad_x, grad_scale, grad_shift = _on(grad).layer_norm_backward(grad.reshape(xhat.shape), xhat, rstd, scale)
        return grad_x.reshape(ctx.x_shape), grad_scale, grad_shift


@dispatch.register
class GELU(F.GELU):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _on(x).gelu_forward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        return _on(x).gelu_backward(x, grad)


@dispatch.register
class RMSNorm(F.RMSNorm):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        w = 1.0 + weight if offset else weight
        y, xhat, rstd = _on(x).rms_norm_forward(x.reshape(-1, x.shape[-1]), w, eps)
        ctx.save_for_backward(xhat, rstd, w)
        ctx.x_shape = x.shape
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, w = ctx.saved
        grad_x, grad_w = _on(grad).rms_norm_backward(grad.reshape(xhat.shape), xhat, rstd, w)
        return grad_x.reshape(ctx.x_shape), grad_w


@dispatch.register
class SwiGLU(F.SwiGLU):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _on(a).swiglu_forward(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        return _on(a).swiglu_backward(a, b, grad, ctx.needs_input_grad[0])


@dispatch.register
class Dropout(F.Dropout):
    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = p, seed
        return _on(x).dropout(x, p, seed)

    @staticmethod
    def backward(ctx, grad):
        return _on(grad).dropout(grad, ctx.p, ctx.seed)


@dispatch.register
class ScaledDotProductAttention(F.ScaledDotProductAttention):
    """Tiled over blocks of queries (FlashAttention-2's scheme: functional/flash_attention.py
    derives it): forward keeps each query's log-sum-exp [..., Tq] instead of the probabilities
    [..., Tq, Tk], backward rebuilds them block by block, so a step's memory grows with T, not
    T^2. Grouped-query k and v are read per group, never repeated. Kept: q, k, v, the
    log-sum-exps, the output (which the next op holds anyway; backward's rowsum(dP * P) is
    dL/dout . out) and, when the kernel keeps it, the dropout mask as bits (else backward draws
    it again from its seed). Under no_grad nothing is kept."""

    @staticmethod
    def forward(ctx, q, k, v, causal, dropout_p, seed):
        out, lse, mask = _on(q).attention_forward(q, k, v, causal, dropout_p, seed)
        ctx.causal, ctx.dropout_p, ctx.seed = causal, dropout_p, seed
        ctx.save_for_backward(q, k, v, lse, out, mask)  # kept only when a backward will run
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, lse, out, mask = ctx.saved
        return _on(grad).attention_backward(grad, q, k, v, out, lse, mask, ctx.causal, ctx.dropout_p, ctx.seed,
                                            ctx.needs_input_grad[:3])


@dispatch.register
class CrossEntropy(F.CrossEntropy):
    """logsumexp of the rows and the backward's softmax - onehot, blocked."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        xp = backend_of(logits)
        z, t, counted, n = rows_and_targets(xp, logits, targets, ignore_index)
        lse = _on(z).logsumexp_rows(z)
        loss = ((lse - z[xp.arange(z.shape[0]), t]) * counted).sum() / n
        ctx.save_for_backward(z, lse, t, counted)
        ctx.n, ctx.shape = n, logits.shape
        return xp.asarray(loss, dtype=logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, lse, t, counted = ctx.saved
        weight = (grad / ctx.n) * counted[:, None]
        return _on(z).cross_entropy_backward(z, lse, t, weight).reshape(ctx.shape)


@dispatch.register
def adamw_step_(w, g, m, v, **hyperparameters) -> None:
    """optim.adamw_step_, one pass over the parameter's memory (blocked on the CPU, one kernel on the GPU)."""
    _on(w).adamw_step_(w, g, m, v, **hyperparameters)
