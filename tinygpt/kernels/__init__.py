"""Fast versions of the fused ops of functional.py, and the one place that picks which runs.

functional.py writes every op as plain whole-array math. That is the reference: what a
learner reads and steps through, and what runs on the strict backend. The code here computes
the same numbers faster, and tests/test_kernels.py checks each of them element by element
against the plain op:

    fused.py  the fast ops, under the names of functional's op classes (LayerNorm, GELU, ...),
              each a subclass of the plain op with the same forward(ctx, ...) and
              backward(ctx, grad), computed by the array functions of the device's module:
    cpu.py    NumPy, blocked: rows split into cache-sized blocks on a thread pool, BLAS held
              to one thread while they run, matrix products split across the threads
              (threads.py holds that machinery; memory.py keeps freed memory in the process
              for the next step's arrays; cpu_attention.py is the tiled attention).
    cuda.py   CuPy: one fused CUDA kernel per op direction instead of a chain of launches
              (RMSNorm: CuPy array operations, for now; cuda_sources.py holds the sources).
    decode.py one cached decoding step of the GPT on arrays, no graph: the same math as the
              modules, without ~250 op calls a token (GPTModel.forward hands it the step).

cpu.py and cuda.py have these functions (arrays in and out, no Tensors):

    matmul(a, b)                                   2-D product
    embedding_backward(ids, grad_rows, vocab)      scatter-add of [N, C] rows into [vocab, C]
    layer_norm_forward(x2, scale, shift, eps)      -> y, xhat, rstd          (x2: [N, C])
    layer_norm_backward(g2, xhat, rstd, scale)     -> dx, dscale, dshift
    rms_norm_forward(x2, w, eps)                   -> y, xhat, rstd          (x2: [N, C]; w: weight or 1 + weight)
    rms_norm_backward(g2, xhat, rstd, w)           -> dx, dw
    gelu_forward(x), gelu_backward(x, grad)
    swiglu_forward(a, b), swiglu_backward(a, b, grad, need_a) -> da (None unless need_a), db
    dropout(x, p, seed)                            x * keep / (1 - p), the mask of backend.uniform
    attention_forward(q, k, v, causal, dropout_p, seed)            -> out, lse, mask   (tiled; lse [..., Tq] float64;
                                            k, v may have H_kv heads, H_kv dividing H; mask: dropout bits or None)
    attention_backward(grad, q, k, v, out, lse, mask, causal, dropout_p, seed, needs) -> dq, dk, dv
    logsumexp_rows(z)                              [N, V] -> [N]
    cross_entropy_backward(z, lse, t, weight)      (softmax(z) - onehot(t)) * weight
    adamw_step_(w, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step_size, rsqrt_correction)

fused.py registers each fast op with tinygpt.dispatch, which chooses between the plain op
and its fast version (and holds the TINYGPT_KERNELS=plain switch).
"""
from __future__ import annotations

import functools

INTERFACE = ("matmul", "embedding_backward", "layer_norm_forward", "layer_norm_backward", "gelu_forward", "gelu_backward",
             "swiglu_forward", "swiglu_backward", "rms_norm_forward", "rms_norm_backward", "dropout", "attention_forward", "attention_backward", "logsumexp_rows", "cross_entropy_backward", "adamw_step_")

@functools.cache
def module_of(device: str):
    """kernels.cpu or kernels.cuda, imported on first use (CuPy only when a GPU is asked for)."""
    if device == "cpu":
        from tinygpt.kernels import cpu, memory

        memory.keep_freed_memory()  # a step's big arrays reuse the memory the last one freed (see memory.py)
        return cpu
    from tinygpt.kernels import cuda

    return cuda
