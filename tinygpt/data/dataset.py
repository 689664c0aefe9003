"""Next-token training data: a sliding-window dataset over token ids and a small batch loader.

As in the book (chapter 2), window i starts at s = i * stride; its input is `ids[s : s+L]`, its
target is the same window shifted by one token, `ids[s+1 : s+L+1]`, so position t of the target is
the token that follows position t of the input. The ids live in one int64 array; windows are views
into it (`sliding_window_view`), so no window is ever copied until a batch is gathered.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from .gpt2 import ENDOFTEXT

Batch = tuple[np.ndarray, np.ndarray]
T = TypeVar("T", str, Sequence[int], np.ndarray)


class Encoder(Protocol):
    """Anything with an `encode` method: tiktoken encodings, CharTokenizer, BPETokenizer."""

    def encode(self, text: str) -> list[int]: ...


class GPTDataset:
    """Input/target windows of `max_length` tokens every `stride` tokens of `token_ids`.

    Window starts are `range(0, len(ids) - max_length, stride)`, exactly the book's loop, so the
    last token of the corpus is only ever a target.
    """

    def __init__(self, token_ids: Sequence[int] | np.ndarray, max_length: int, stride: int) -> None:
        if max_length < 1 or stride < 1:
            raise ValueError(
                f"max_length and stride must be >= 1, got max_length={max_length}, stride={stride}"
            )
        self.ids = np.ascontiguousarray(token_ids, dtype=np.int64)
        if self.ids.ndim != 1:
            raise ValueError(f"token_ids must be one-dimensional, got shape {self.ids.shape}")
        if len(self.ids) <= max_length:
            raise ValueError(
                f"text has {len(self.ids)} tokens but max_length is {max_length}: one input/target "
                f"window needs at least {max_length + 1} tokens"
            )
        self.max_length = max_length
        self.stride = stride
        # (n_windows, max_length + 1) view: row i holds the input and, shifted by one, the target.
        # There are len - max_length windows of max_length + 1 tokens, starting at 0, 1, ..., so
        # taking every stride-th one gives the starts range(0, len - max_length, stride).
        all_windows = np.lib.stride_tricks.sliding_window_view(self.ids, max_length + 1)
        self.windows = all_windows[::stride]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> Batch:
        """Window i as `(input, target)`, two read-only views of shape (max_length,)."""
        n = len(self.windows)
        if not -n <= i < n:
            raise IndexError(f"window index {i} is out of range for {n} windows")
        w = self.windows[i]
        return w[:-1], w[1:]

    def batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Gather windows into `(x, y)`, new int64 arrays of shape (len(indices), max_length)."""
        rows = self.windows[np.asarray(indices, dtype=np.int64)]  # [B, L+1], one copy
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])


class BatchSource(Protocol):
    """What DataLoader serves from: a length and a way to gather rows into a batch
    (GPTDataset here; the finetuning datasets too)."""

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> tuple: ...


class DataLoader:
    """Batches of a `GPTDataset` (or any `BatchSource`), optionally shuffled, resumable mid-epoch.

    Each epoch's order is a permutation drawn from `np.random.default_rng([seed, epoch])`, so every
    epoch differs, the same seed repeats the same sequence of epochs, and resuming needs only
    `(seed, epoch, position)`: see `state_dict()`. `position` counts the batches already handed out
    in the current epoch; a `for` loop that runs to the end moves on to the next epoch.
    """

    def __init__(
        self,
        dataset: BatchSource,
        batch_size: int = 1,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        # Without a seed, draw one now and keep it, so even an unseeded run can be resumed.
        self.seed = int(np.random.SeedSequence().entropy) if seed is None else int(seed)
        self.epoch = 0
        self.position = 0
        if len(self) == 0:
            raise ValueError(
                f"dataset has {len(dataset)} examples but batch_size is {batch_size} with "
                f"drop_last=True: no batch would be produced"
            )

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """The window indices of `epoch`, in the order they are served."""
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def iter_epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """The batches of `epoch` without touching the loader's own position (for evaluation)."""
        order = self.order(epoch)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield self.dataset.batch(order[start : start + self.batch_size])

    def __iter__(self) -> Iterator[Batch]:
        if self.position >= len(self):  # stopped right after an epoch's last batch
            self.epoch, self.position = self.epoch + 1, 0
        order = self.order(self.epoch)
        while self.position < len(self):
            start = self.position * self.batch_size
            self.position += 1  # counted before yielding: a checkpoint taken now resumes after it
            yield self.dataset.batch(order[start : start + self.batch_size])
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """Where the loader is: enough to resume the exact same batch sequence."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; the saved seed replaces this loader's."""
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(
                f"position {position} is out of range for {len(self)} batches per epoch"
            )
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), position


def create_dataloader(
    text: str,
    tok: Encoder,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int | None = 123,
) -> DataLoader:
    """Tokenise `text` with `tok` and serve `(x, y)` batches of shape (batch_size, max_length).

    `<|endoftext|>` in the text is encoded as the special token when `tok.encode` takes tiktoken's
    `allowed_special` keyword (GPT-2 and trained BPE tokenizers); other tokenizers get plain text.
    """
    ids = encode_text(tok, text)
    return DataLoader(GPTDataset(ids, max_length, stride), batch_size, shuffle, drop_last, seed)


def train_val_split(text_or_ids: T, train_ratio: float = 0.9) -> tuple[T, T]:
    """Split at `int(train_ratio * len)` as in the book: first part to train, rest to validate."""
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be strictly between 0 and 1, got {train_ratio}")
    split = int(train_ratio * len(text_or_ids))
    return text_or_ids[:split], text_or_ids[split:]


def encode_text(tok: Encoder, text: str) -> list[int]:
    """`tok.encode(text)`, letting `<|endoftext|>` through as the special token where the
    tokenizer supports it (tiktoken refuses special tokens in text by default)."""
    try:
        params = inspect.signature(tok.encode).parameters
    except (TypeError, ValueError):  # some callables have no introspectable signature
        params = {}
    if "allowed_special" in params:
        return tok.encode(text, allowed_special={ENDOFTEXT})
    return tok.encode(text)
