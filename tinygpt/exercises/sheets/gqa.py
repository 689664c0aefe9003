"""Exercise: the backward pass of grouped-query attention (GQA: Llama 3, Qwen3, SmolLM2).

H query heads share H_kv key/value heads (H_kv divides H): query head h reads key/value
head h // n, n = H / H_kv, so consecutive query heads form a group around one shared head
(Hugging Face's repeat_kv). The KV cache then holds H_kv heads instead of H.

Forward, for each batch element:
    k_rep = repeat(k, n, axis=1)        [B, H_kv, T, D] -> [B, H, T, D]: head j repeated n times in a row
    v_rep = repeat(v, n, axis=1)
    then causal attention of q against k_rep and v_rep, as in the attention exercise:
    S = q k_rep^T / sqrt(D),  S = -inf where a key is after its query,  P = softmax(S),  out = P v_rep

Shapes: q, out and dout [B, H, T, D]; k and v [B, H_kv, T, D]; P [B, H, T, T]
with B = 3, H = 4, H_kv = 2, T = 5, D = 7 in the check.

Your task: write backward(dout, cache) returning (dq, dk, dv). The attention part is the
one you wrote before, now against k_rep and v_rep: it gives dq, dk_rep and dv_rep. The new
step is the repeat: head j of k is used by the n query heads j n, ..., j n + n - 1, and a
value used n times receives the sum of its n gradients:
    dk[:, j] = sum_{r < n} dk_rep[:, j n + r]        (the same for v)

Check it with:  tinygpt exercise check gqa gqa.py
"""
import numpy as np


def forward(q, k, v):
    n = q.shape[1] // k.shape[1]                                       # query heads per key/value head
    k_rep, v_rep = np.repeat(k, n, axis=1), np.repeat(v, n, axis=1)    # [B, H_kv, T, D] -> [B, H, T, D]
    D, T = q.shape[-1], q.shape[-2]
    S = q @ k_rep.swapaxes(-1, -2) / np.sqrt(D)                        # [B, H, T, T]
    S = np.where(np.triu(np.ones((T, T), dtype=bool), k=1), -np.inf, S)
    e = np.exp(S - S.max(axis=-1, keepdims=True))
    P = e / e.sum(axis=-1, keepdims=True)
    out = P @ v_rep                                                    # [B, H, T, D]
    cache = (q, k_rep, v_rep, P, n)
    return out, cache


def backward(dout, cache):
    """dout: dL/dout [B, H, T, D] -> (dq [B, H, T, D], dk [B, H_kv, T, D], dv [B, H_kv, T, D])."""
    q, k_rep, v_rep, P, n = cache
    raise NotImplementedError("write dq, dk and dv, then return them")


if __name__ == "__main__":  # `python gqa.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("gqa", __file__))
