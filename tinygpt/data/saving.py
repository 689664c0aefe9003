"""Tokenizers to and from JSON, so a checkpoint carries the tokenizer it was trained with."""

from __future__ import annotations

import json
import os
from typing import Any

import tiktoken

from tinygpt.files import atomic_write_text, read_json
from .bpe import BPETokenizer
from .char import CharTokenizer
from .gpt2 import gpt2_tokenizer


def tokenizer_to_dict(tok: Any) -> dict[str, Any]:
    """{"type": "char" | "bpe" | "gpt2", ...}: GPT-2's ranks are not copied, only named."""
    if isinstance(tok, CharTokenizer):
        return {"type": "char", **tok.to_dict()}
    if isinstance(tok, BPETokenizer):
        return {"type": "bpe", **tok.to_dict()}
    if isinstance(tok, tiktoken.Encoding) and tok.name == "gpt2":
        return {"type": "gpt2"}
    from tinygpt.hf_tokenizer import HFTokenizer  # a Hugging Face folder's tokenizer.json (Llama, Qwen3)

    if isinstance(tok, HFTokenizer):
        return {"type": "hf", **tok.to_dict()}
    raise TypeError(f"cannot save a tokenizer of type {type(tok).__name__}")


def tokenizer_from_dict(d: dict[str, Any], bpe_file: str | os.PathLike | None = None) -> Any:
    kind = d.get("type")
    if kind == "char":
        return CharTokenizer.from_dict(d)
    if kind == "bpe":
        return BPETokenizer.from_dict(d)
    if kind == "gpt2":
        return gpt2_tokenizer(bpe_file)
    if kind == "hf":
        from tinygpt.hf_tokenizer import HFTokenizer

        return HFTokenizer.from_dict(d)
    raise ValueError(f"unknown tokenizer type {kind!r}; expected 'char', 'bpe', 'gpt2' or 'hf'")


def save_tokenizer(tok: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps(tokenizer_to_dict(tok), ensure_ascii=False))


def load_tokenizer(path: str | os.PathLike, bpe_file: str | os.PathLike | None = None) -> Any:
    return tokenizer_from_dict(read_json(path), bpe_file)
