"""Instruction finetuning data (book chapter 7): Alpaca-style prompts, the dataset, and the
collate function that pads a batch and hides padding from the loss."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tinygpt.data import encode_text

RESPONSE_MARKER = "### Response:"


def format_input(entry: dict[str, str]) -> str:
    """The book's Alpaca-style prompt: a fixed preamble, the instruction, and the input when
    there is one. The response text follows as "\\n\\n### Response:\\n" + output."""
    instruction_text = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text


def format_response(entry: dict[str, str]) -> str:
    return f"\n\n{RESPONSE_MARKER}\n{entry['output']}"


def load_instruction_data(path: str | os.PathLike) -> list[dict[str, str]]:
    """Records with "instruction" and "output" (and optionally "input") from a JSON list;
    a malformed record raises ValueError naming the file and the record's index."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of records")
    for i, r in enumerate(records):
        missing = [k for k in ("instruction", "output") if not isinstance(r, dict) or not isinstance(r.get(k), str)]
        if missing:
            raise ValueError(f"{path}: record {i} has no text for {', '.join(repr(k) for k in missing)}")
    return records


class InstructionDataset:
    """Each record as token ids of prompt + response, with the prompt's length (for masking)."""

    def __init__(self, records: Sequence[dict[str, str]], tokenizer: Any):
        self.items = []
        for entry in records:
            prompt = encode_text(tokenizer, format_input(entry))
            self.items.append((prompt + encode_text(tokenizer, format_response(entry)), len(prompt)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> list[int]:
        return self.items[i][0]

    def prompt_length(self, i: int) -> int:
        return self.items[i][1]


def instruction_collate(batch: Sequence[Sequence[int]], pad_token_id: int = 50256, ignore_index: int = -100,
                        allowed_max_length: int | None = None, prompt_lengths: Sequence[int] | None = None):
    """(inputs, targets) int64 arrays [B, L] from token lists of different lengths (the book's
    custom_collate_fn).

    Each sequence gets one <|endoftext|> (pad_token_id) and is padded with it to the longest
    sequence + 1; inputs drop the last token and targets the first (next-token targets). In
    the targets the first end-of-text stays, so the model learns to stop, and every padding
    position after it becomes ignore_index, so the loss skips it. With prompt_lengths, the
    targets that predict prompt tokens are ignored too, so only the response is scored.
    allowed_max_length truncates both to that many tokens."""
    length = max(len(item) + 1 for item in batch)
    inputs = np.full((len(batch), length - 1), pad_token_id, dtype=np.int64)
    targets = np.full((len(batch), length - 1), ignore_index, dtype=np.int64)
    for row, item in enumerate(batch):
        padded = list(item) + [pad_token_id] * (length - len(item))
        inputs[row] = padded[:-1]
        n = len(item)  # targets[:n] are real next tokens; targets[n - 1] is the end-of-text
        targets[row, :n] = padded[1:n + 1]
        if prompt_lengths is not None:
            targets[row, :prompt_lengths[row] - 1] = ignore_index
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs, targets


def extract_response(generated_text: str, prompt: str | None = None) -> str:
    """The model's answer: the text after the response marker (or after `prompt`), stripped."""
    text = generated_text[len(prompt):] if prompt is not None and generated_text.startswith(prompt) else generated_text
    if RESPONSE_MARKER in text:
        text = text.split(RESPONSE_MARKER, 1)[1]
    return text.replace("<|endoftext|>", "").strip()
