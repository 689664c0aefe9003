"""Train a byte-level BPE vocabulary (GPT-2 style) and encode with it at tiktoken speed.

Training is the classic algorithm (Sennrich et al. 2016, byte-level as in GPT-2):

1. Split the corpus on the special tokens (they are never merged into ordinary text), then
   pre-split each piece with the regex (GPT-2's by default), so merges never cross a word boundary.
2. Count the distinct chunks; each chunk starts as its UTF-8 bytes, i.e. ids 0..255.
3. Count adjacent pairs over the distinct chunks, weighted by how often each chunk occurs.
4. Merge the most frequent pair into a new token everywhere; ties go to the smallest (left, right)
   id pair, so training is deterministic. Repeat until the vocabulary is full.

Step 4 is incremental: only chunks containing the merged pair are rewritten, the pair counts
change by the difference between their old and new pairs, and a max-heap with lazy deletion (stale
entries are skipped when popped) finds the next pair, so a merge costs about the size of the chunks
it touches instead of a recount of the whole corpus.

The result is handed to tiktoken as `mergeable_ranks` (token bytes -> rank, rank = token id).
tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank, which replays
the learned merges in the order they were learned.
"""

from __future__ import annotations

import base64
import heapq
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

import regex
import tiktoken

from tinygpt.files import atomic_write_text, check_format, read_json
from .gpt2 import ENDOFTEXT, GPT2_PATTERN

_FORMAT = "tinygpt-bpe"
_VERSION = 1
Pair = tuple[int, int]


class BPETokenizer:
    """A trained byte-level BPE vocabulary, encoding through a `tiktoken.Encoding` (`.encoding`).

    `tokens[i]` is the byte string of id i; ids 0..255 are the single bytes, so every text can be
    encoded. Special tokens take the ids right after the last ordinary token.
    `merges[k] = (left, right)` is the k-th merge learned, kept as a record of training.
    """

    def __init__(
        self,
        tokens: Sequence[bytes],
        special_tokens: Sequence[str] = (ENDOFTEXT,),
        pattern: str = GPT2_PATTERN,
        merges: Iterable[Pair] = (),
    ) -> None:
        self.tokens: list[bytes] = [bytes(t) for t in tokens]
        if self.tokens[:256] != [bytes([b]) for b in range(256)]:
            raise ValueError("tokens 0..255 must be the 256 single bytes in order")
        ranks = {t: i for i, t in enumerate(self.tokens)}
        if len(ranks) != len(self.tokens):
            raise ValueError(f"{len(self.tokens) - len(ranks)} token byte strings are repeated")
        self.merges: list[Pair] = [(int(a), int(b)) for a, b in merges]
        for k, (a, b) in enumerate(self.merges):
            if not (0 <= a < len(self.tokens) and 0 <= b < len(self.tokens)):
                raise ValueError(
                    f"merge {k} ({a}, {b}) refers to ids outside 0..{len(self.tokens) - 1}"
                )
            if self.tokens[a] + self.tokens[b] not in ranks:
                raise ValueError(f"merge {k} ({a}, {b}) produces bytes that are not a token")
        _check_special_tokens(special_tokens)
        self.pattern = pattern
        self.special_tokens: dict[str, int] = {
            s: len(self.tokens) + i for i, s in enumerate(special_tokens)
        }
        self.encoding = tiktoken.Encoding(
            name=f"tinygpt-bpe-{len(self.tokens) + len(self.special_tokens)}",
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )

    @property
    def n_vocab(self) -> int:
        """Number of ids: ordinary tokens plus special tokens."""
        return self.encoding.n_vocab

    def encode(
        self,
        text: str,
        *,
        allowed_special: Iterable[str] | str = frozenset(),
        disallowed_special: Iterable[str] | str = "all",
    ) -> list[int]:
        """Encode with tiktoken; special-token handling has tiktoken's meaning and defaults."""
        if not isinstance(allowed_special, str):
            allowed_special = set(allowed_special)
        if not isinstance(disallowed_special, str):
            disallowed_special = set(disallowed_special)
        return self.encoding.encode(
            text, allowed_special=allowed_special, disallowed_special=disallowed_special
        )

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text (bytes that are not valid UTF-8 become U+FFFD)."""
        return self.encoding.decode([int(i) for i in ids])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: token bytes in id order (base64), special tokens, pattern, merges."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "pattern": self.pattern,
            "special_tokens": list(self.special_tokens),
            "tokens": [base64.b64encode(t).decode("ascii") for t in self.tokens],
            "merges": [list(m) for m in self.merges],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BPETokenizer:
        """Inverse of `to_dict`; gives the same ids for every text."""
        check_format(d, _FORMAT, _VERSION, "BPE tokenizer")
        return cls(
            tokens=[base64.b64decode(t) for t in d["tokens"]],
            special_tokens=d["special_tokens"],
            pattern=d["pattern"],
            merges=[tuple(m) for m in d["merges"]],
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON, atomically (temp file in the same folder + rename)."""
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a tokenizer written by `save`."""
        return cls.from_dict(read_json(path))

    def __repr__(self) -> str:
        return f"BPETokenizer(n_vocab={self.n_vocab}, merges={len(self.merges)})"


def train_bpe(
    text: str,
    vocab_size: int,
    pattern: str = GPT2_PATTERN,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
) -> BPETokenizer:
    """Learn byte-level BPE merges on `text` until there are `vocab_size` ids (specials included).

    Stops early, with a smaller vocabulary, if every chunk of the corpus is already one token.
    A merge whose bytes already exist as a token (reached by another split) reuses that id.
    """
    special_tokens = list(special_tokens)
    _check_special_tokens(special_tokens)
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size {vocab_size} is below the minimum {minimum} "
            f"(256 byte tokens + {len(special_tokens)} special tokens)"
        )
    words, counts = _count_chunks(text, pattern, special_tokens)
    pair_counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)  # pair -> indices of chunks containing it
    for w, (ids, c) in enumerate(zip(words, counts, strict=True)):
        for pair in pairwise(ids):
            pair_counts[pair] += c
            where[pair].add(w)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    tokens = [bytes([b]) for b in range(256)]
    rank = {t: i for i, t in enumerate(tokens)}
    merges: list[Pair] = []
    while len(tokens) < vocab_size - len(special_tokens) and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -neg_count:
            continue  # stale heap entry: the count changed after it was pushed
        merged = tokens[pair[0]] + tokens[pair[1]]
        if merged not in rank:
            rank[merged] = len(tokens)
            tokens.append(merged)
        merges.append(pair)
        delta = _merge_everywhere(pair, rank[merged], words, counts, where)
        for p, d in delta.items():
            if d == 0:
                continue
            n = pair_counts.get(p, 0) + d
            if n > 0:
                pair_counts[p] = n
                heapq.heappush(heap, (-n, p))
            else:
                pair_counts.pop(p, None)
                where.pop(p, None)
    return BPETokenizer(tokens, special_tokens, pattern, merges)


def _merge_everywhere(pair: Pair, new_id: int, words: list, counts: list, where: dict) -> dict[Pair, int]:
    """Replace `pair` by `new_id` in every chunk that holds it (updating `where`); return how
    the count of each pair changes, weighted by how often each chunk occurs."""
    delta: dict[Pair, int] = defaultdict(int)
    for w in where.pop(pair):
        old, c = words[w], counts[w]
        new = _merge(old, pair, new_id)
        old_pairs, new_pairs = list(pairwise(old)), list(pairwise(new))
        for p in old_pairs:
            delta[p] -= c
        for p in new_pairs:
            delta[p] += c
        for p in set(old_pairs) - set(new_pairs):
            if p != pair:
                where[p].discard(w)
        for p in new_pairs:
            where[p].add(w)
        words[w] = new
    return delta


def _count_chunks(
    text: str, pattern: str, special_tokens: Sequence[str]
) -> tuple[list[list[int]], list[int]]:
    """Distinct pre-tokenised chunks of `text` as byte-id lists, with how often each occurs."""
    if special_tokens:
        # Longest first, so a special token that extends another is matched whole.
        alternation = "|".join(
            regex.escape(s) for s in sorted(special_tokens, key=len, reverse=True)
        )
        pieces = regex.split(alternation, text)
    else:
        pieces = [text]
    splitter = regex.compile(pattern)
    chunks = Counter(m.group(0) for piece in pieces for m in splitter.finditer(piece))
    return [list(chunk.encode("utf-8")) for chunk in chunks], list(chunks.values())


def _merge(ids: list[int], pair: Pair, new_id: int) -> list[int]:
    """Replace each non-overlapping occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _check_special_tokens(special_tokens: Sequence[str]) -> None:
    for s in special_tokens:
        if not isinstance(s, str) or not s:
            raise ValueError(f"special tokens must be non-empty strings, got {s!r}")
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special tokens are repeated: {list(special_tokens)!r}")
