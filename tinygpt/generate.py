"""Turning a model's next-token distributions into text (book chapters 4-5)."""
from __future__ import annotations

import numbers

from tinygpt import backend
from tinygpt.data import encode_text
from tinygpt.tensor import Tensor, no_grad


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


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int) -> None:
    if not temperature >= 0:  # also catches NaN
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be between 1 and the vocabulary size {vocab_size}, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    """One token id per row of logits [B, V].

    temperature 0 picks the most likely token. Otherwise the logits are divided by the
    temperature (below 1 sharpens, above 1 flattens), restricted to the top_k most likely
    tokens and/or to the smallest set whose probability reaches top_p (nucleus), and a token
    is drawn from the softmax of what remains, with the library's seeded generator."""
    xp = backend.backend_of(logits)
    if temperature == 0.0:
        return logits.argmax(axis=-1)
    z = logits.astype(xp.float64)
    z -= z.max(axis=-1, keepdims=True)  # max first: the best token sits at 0 and exp never overflows,
    z /= temperature                    # even when a tiny temperature sends the rest to -inf
    if top_k is not None:
        kth = xp.sort(z, axis=-1)[:, -top_k][:, None]
        z = xp.where(z < kth, -xp.inf, z)
    probs = xp.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None:
        order = xp.argsort(-probs, axis=-1)
        sorted_probs = xp.take_along_axis(probs, order, axis=-1)
        # drop a token when the more likely tokens before it already reach top_p
        drop_sorted = (xp.cumsum(sorted_probs, axis=-1) - sorted_probs) >= top_p
        drop = xp.take_along_axis(drop_sorted, xp.argsort(order, axis=-1), axis=-1)
        probs = xp.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    # inverse-CDF sampling: the first token whose cumulative probability exceeds u ~ U[0, 1)
    u = backend.get_backend(backend.device_of(logits)).rand((logits.shape[0], 1), xp.float64)
    choice = (xp.cumsum(probs, axis=-1) <= u).sum(axis=-1)
    return xp.minimum(choice, logits.shape[-1] - 1)  # guards against rounding in the last cumsum


@no_grad()
def generate(model, idx, max_new_tokens: int, context_size: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None, use_cache: bool = True, on_token=None):
    """Continue each row of prompt ids idx [B, T] by up to max_new_tokens tokens; returns [B, T + new].

    Greedy when temperature is 0, else sampled (see sample_next). A row that produces eos_id
    is finished: it is padded with eos_id while the other rows go on, and generation stops
    early when every row is finished. The model sees at most the last context_size tokens.

    With use_cache, the prompt goes through the model once and each new token costs one
    position: its keys and values join a KV cache. The model's positions are absolute, so
    once the window is full and must slide, every cached key would sit at a new position;
    from then on each step recomputes the window, exactly as without the cache.
    `on_token(ids)` is called with each new column of ids [B] (for streaming)."""
    xp = backend.backend_of(model.tok_emb.weight.data)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1, got {context_size}")
    _check_sampling(temperature, top_k, top_p, model.cfg["vocab_size"])
    if eos_id is not None and not (isinstance(eos_id, numbers.Integral) and 0 <= eos_id < model.cfg["vocab_size"]):
        raise ValueError(f"eos_id must be a token id in 0..{model.cfg['vocab_size'] - 1}, got {eos_id!r}")
    idx = backend.to_device(idx.data if isinstance(idx, Tensor) else idx, model.tok_emb.weight.device)
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"the prompt must be a non-empty (batch, tokens) array of ids, got shape {tuple(idx.shape)}")
    context_size = min(context_size, model.cfg["context_length"])
    batch, start = idx.shape
    # one buffer for prompt and output: appending a token costs the same at token 10 and at 100,000
    out = xp.empty((batch, start + max_new_tokens), dtype=idx.dtype)
    out[:, :start] = idx
    end = start  # out[:, :end] holds the ids so far
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(batch, context_size) if use_cache else None
        if cache is not None and not cache.layers:  # a model of no blocks has nothing to cache (and no length to keep)
            cache = None
        logits = model(out[:, max(0, end - context_size):end], cache=cache).data[:, -1]
        finished = xp.zeros(batch, dtype=bool)
        for step in range(max_new_tokens):
            next_id = sample_next(logits, temperature, top_k, top_p).astype(idx.dtype)
            if eos_id is not None:
                next_id = xp.where(finished, eos_id, next_id)
                finished |= next_id == eos_id
            out[:, end] = next_id
            end += 1
            if on_token is not None:
                on_token(next_id)
            if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                break
            if cache is not None and cache.length < context_size:
                logits = model(next_id.reshape(-1, 1), cache=cache).data[:, -1]
            else:
                logits = model(out[:, max(0, end - context_size):end]).data[:, -1]
    finally:
        model.train(was_training)
    return out[:, :end]


class StreamPrinter:
    """Prints generated tokens as they come (`on_token` of generate for one row). A token can
    hold half of a UTF-8 character, so the tokens not yet printed are decoded together and
    held back while their text ends in a broken character; only those are decoded each
    time, so the cost per token stays the same however long the output. Nothing is printed
    from `stop_id` on."""

    HOLD_AT_MOST = 16  # tokens; past that, a broken character is printed as it is (U+FFFD)

    def __init__(self, tokenizer, stop_id: int | None = None, write=None):
        import sys

        self.tokenizer, self.stop_id = tokenizer, stop_id
        self.write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        self.ids: list[int] = []
        self.pending: list[int] = []  # ids whose text is not printed yet
        self.stopped = False

    def __call__(self, column) -> None:
        token = int(column[0])
        self.stopped = self.stopped or token == self.stop_id
        if self.stopped:
            return
        self.ids.append(token)
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if not text.endswith("\ufffd") or len(self.pending) > self.HOLD_AT_MOST:
            self.write(text)
            self.pending = []

    def finish(self) -> None:
        """Print what a half-finished character held back."""
        if self.pending:
            self.write(self.tokenizer.decode(self.pending))
            self.pending = []
