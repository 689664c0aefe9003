"""Turning a model's next-token distributions into text (book chapters 4-5)."""
from __future__ import annotations

from tinygpt import backend
from tinygpt.data import encode_text
from tinygpt.tensor import no_grad


def text_to_token_ids(text: str, tokenizer, device: str | None = None):
    """Token ids of `text` as a (1, T) integer array on `device` (the default device if None)."""
    ids = encode_text(tokenizer, text)
    return backend.make_array([ids], device=device or backend.default_device())


def token_ids_to_text(token_ids, tokenizer) -> str:
    """The text of a (1, T) or (T,) array of ids."""
    return tokenizer.decode(backend.to_host(token_ids).reshape(-1).tolist())


@no_grad()
def generate_text_simple(model, idx, max_new_tokens: int, context_size: int):
    """Greedy decoding as in the book's chapter 4: run the model on the last `context_size`
    tokens, append the most likely next token, repeat. idx: (B, T) integer array."""
    xp = backend.backend_of(idx)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])
        next_id = logits.data[:, -1, :].argmax(axis=-1)  # [B, T, V] -> [B]
        idx = xp.concatenate([idx, next_id.reshape(-1, 1).astype(idx.dtype)], axis=1)
    return idx
