"""Cross-entropy: the loss of next-token prediction."""
from __future__ import annotations

from tinygpt import backend, op_checks
from tinygpt.backend import backend_of
from tinygpt.tensor import Function, Tensor

IGNORE_INDEX = -100  # a target equal to this is not scored (PyTorch's default, the book's prompt masking)


def rows_and_targets(xp, logits, targets, ignore_index: int):
    """The logits as rows z [N, V], the targets t [N] (ignored ones pointed at class 0, which
    they then count 0 times), which rows count, and how many."""
    z, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)  # [..., V] -> [N, V], [...] -> [N]
    counted = t != ignore_index
    return z, xp.where(counted, t, 0), counted, int(counted.sum())


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
        z, t, counted, n = rows_and_targets(xp, logits, targets, ignore_index)
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
        dz = xp.exp(z - lse[:, None])  # softmax(z): [N, V]
        dz[xp.arange(z.shape[0]), t] -= 1.0  # - onehot(t)
        dz *= weight
        return dz.reshape(ctx.shape)


def cross_entropy(logits: Tensor, targets, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean negative log-likelihood of integer `targets` (N,) under `logits` (N, C); rows whose
    target is `ignore_index` are skipped. Leading axes are flattened, so (B, T, C) logits with
    (B, T) targets work too (the class axis is last, unlike PyTorch's (N, C, d1) layout)."""
    targets = backend.to_device(targets.data if isinstance(targets, Tensor) else targets, logits.device)
    op_checks.cross_entropy(logits, targets, ignore_index)
    return CrossEntropy.apply(logits, targets=targets, ignore_index=ignore_index)
