"""A character-level tokenizer: one id per distinct character of a corpus.

The simplest tokenizer that works for tiny models (e.g. Shakespeare-sized corpora): the vocabulary
is the sorted set of characters seen in training text, so it is deterministic and readable. Id 0
is reserved for `<unk>`, so text with a character the corpus never had can still be encoded
(`errors="replace"`, the default), or refused with its position (`errors="strict"`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from tinygpt.files import atomic_write_text, check_format, read_json

UNK = "<unk>"
_FORMAT = "tinygpt-char"
_VERSION = 1


class CharTokenizer:
    """Maps characters to ids: `<unk>` is 0, the vocabulary characters follow in the given order."""

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars: list[str] = list(chars)
        for i, ch in enumerate(self.chars):
            if not isinstance(ch, str) or len(ch) != 1:
                raise ValueError(
                    f"vocabulary entry {i} is {ch!r}; every entry must be one character"
                )
        if len(set(self.chars)) != len(self.chars):
            dupes = sorted(ch for ch, n in Counter(self.chars).items() if n > 1)
            raise ValueError(f"vocabulary has repeated characters: {dupes!r}")
        self.unk_id = 0
        self.itos: list[str] = [UNK, *self.chars]
        self.stoi: dict[str, int] = {ch: i for i, ch in enumerate(self.itos) if i != self.unk_id}
        self.n_vocab = len(self.itos)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Build the vocabulary from a corpus: its distinct characters, sorted by code point."""
        if not text:
            raise ValueError("cannot build a character vocabulary from empty text")
        return cls(sorted(set(text)))

    def encode(self, text: str, errors: str = "replace") -> list[int]:
        """Return one id per character. Unknown characters become `unk_id` ("replace") or raise
        ValueError naming the character and its position ("strict")."""
        if errors not in ("replace", "strict"):
            raise ValueError(f"errors must be 'replace' or 'strict', got {errors!r}")
        ids = [self.stoi.get(ch, self.unk_id) for ch in text]
        if errors == "strict" and self.unk_id in ids:
            pos = ids.index(self.unk_id)
            raise ValueError(
                f"character {text[pos]!r} (U+{ord(text[pos]):04X}) at position {pos} "
                f"is not in the vocabulary of {self.n_vocab} ids"
            )
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Join the characters of `ids`; `unk_id` decodes to the visible marker "<unk>"."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.n_vocab:
                raise ValueError(
                    f"token id {i} is out of range for a vocabulary of {self.n_vocab} ids"
                )
            out.append(self.itos[i])
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description: the characters in id order (`<unk>` = 0 is implied)."""
        return {"format": _FORMAT, "version": _VERSION, "unk": UNK, "chars": list(self.chars)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharTokenizer:
        """Inverse of `to_dict`; the ids come out exactly as they were."""
        check_format(d, _FORMAT, _VERSION, "char tokenizer")
        chars: Sequence[str] = d["chars"]
        return cls(chars)

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as UTF-8 JSON atomically (temp file in the same folder + rename)."""
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        """Read a vocabulary written by `save`."""
        return cls.from_dict(read_json(path))

    def __repr__(self) -> str:
        return f"CharTokenizer(n_vocab={self.n_vocab})"
