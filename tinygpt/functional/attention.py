"""Scaled dot-product attention, causal or not, with dropout on the attention weights."""
from __future__ import annotations

import math

from tinygpt import backend, op_checks
from tinygpt.backend import backend_of
from tinygpt.functional.dropout import keep_scaled
from tinygpt.functional.gqa import repeat_kv, sum_groups
from tinygpt.tensor import Function, Tensor


def _swap(xp, a):
    """a with its last two axes swapped (the transpose of each matrix in a batch)."""
    return xp.swapaxes(a, -1, -2)


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

    Grouped-query attention: k and v may have H_kv heads, H_kv dividing H. Query head h then
    reads kv head h // n, n = H / H_kv: K_h = K'_(h // n), the kv heads repeated n times in a
    row (gqa.repeat_kv), and the math above runs on the repeated K, V. A kv head j feeds the
    n query heads j n ... j n + n - 1, so its gradient is the sum of theirs:
        dL/dK'_j = sum_{r < n} dL/dK_(j n + r)           (gqa.sum_groups; the same for V)
    Only the unrepeated k and v are kept; backward repeats them again.

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-attention], [DEVICE-attention_dropout],
    [DEVICE-gqa_attention], [DEVICE-gqa_attention_dropout]
    test_torch_parity_ops.py::test_every_op_case_matches_torch[DEVICE-attention-*], [DEVICE-gqa_attention-*]
    test_kernels.py::test_cpu_kernels_match_the_plain_math_element_by_element[*attention*] (in tests/)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, dropout_p, seed):
        xp = backend_of(q)
        ctx.scale, ctx.dropout_p, ctx.seed = 1.0 / math.sqrt(q.shape[-1]), dropout_p, seed
        ctx.group = q.shape[-3] // k.shape[-3] if q.ndim > 2 else 1  # n query heads per kv head
        k_h, v_h = repeat_kv(k, ctx.group), repeat_kv(v, ctx.group)  # [B,H_kv,Tk,D] -> [B,H,Tk,D]
        scores = q @ _swap(xp, k_h) * ctx.scale  # [B,H,Tq,D] @ [B,H,D,Tk] -> [B,H,Tq,Tk]
        if causal:
            scores = xp.where(future_mask(xp, *scores.shape[-2:]), -math.inf, scores)
        probs = xp.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)  # softmax over the keys
        dropped = probs * keep_scaled(probs, dropout_p, seed) if dropout_p > 0.0 else probs
        out = dropped @ v_h  # [B,H,Tq,Tk] @ [B,H,Tk,Dv] -> [B,H,Tq,Dv]
        ctx.save_for_backward(q, k, v, probs)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, probs = ctx.saved
        xp = backend_of(grad)
        k_h, v_h = repeat_kv(k, ctx.group), repeat_kv(v, ctx.group)
        keep = keep_scaled(probs, ctx.dropout_p, ctx.seed) if ctx.dropout_p > 0.0 else 1.0
        grad_v = _swap(xp, probs * keep) @ grad  # Pd^T g: [B,H,Tk,Tq] @ [B,H,Tq,Dv] -> [B,H,Tk,Dv]
        grad_probs = (grad @ _swap(xp, v_h)) * keep  # [B,H,Tq,Dv] @ [B,H,Dv,Tk] -> [B,H,Tq,Tk]
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(axis=-1, keepdims=True))
        grad_q = grad_scores @ k_h * ctx.scale  # [B,H,Tq,Tk] @ [B,H,Tk,D] -> [B,H,Tq,D]
        grad_k = _swap(xp, grad_scores) @ q * ctx.scale  # [B,H,Tk,Tq] @ [B,H,Tq,D] -> [B,H,Tk,D]
        return grad_q, sum_groups(grad_k, ctx.group), sum_groups(grad_v, ctx.group)  # [B,H,Tk,D] -> [B,H_kv,Tk,D]


def future_mask(xp, tq: int, tk: int):
    """True where key j is in the future of query i: j > i + (tk - tq). Query i sits at
    position tk - tq + i, the last tq of tk positions (as when decoding with a KV cache)."""
    return xp.arange(tk).reshape(1, -1) > xp.arange(tq).reshape(-1, 1) + (tk - tq)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, dropout_p: float = 0.0) -> Tensor:
    """Attention over q, k, v of shape (B, H, T, D); `causal` hides future keys.
    Pass dropout_p=0 at evaluation time (as with PyTorch's function of the same name).
    k and v may have fewer heads, H_kv dividing H (grouped-query attention): each is then
    shared by H / H_kv consecutive query heads, read in place (no repeated copy is kept)."""
    op_checks.attention(q, k, v, causal, dropout_p)
    seed = backend.get_backend(q.device).random_seed() if dropout_p > 0.0 else 0
    return ScaledDotProductAttention.apply(q, k, v, causal=causal, dropout_p=dropout_p, seed=seed)
