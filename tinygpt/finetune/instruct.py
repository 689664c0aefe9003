"""Instruction finetuning (book chapter 7): Alpaca-style prompts, the dataset, the collate
function that pads a batch and hides padding from the loss, training, and the responses of
the finetuned model to held-out instructions."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import numpy as np

from tinygpt import backend
from tinygpt.data import encode_text
from tinygpt.files import atomic_write_text, read_json
from tinygpt.generate import generate
from tinygpt.train import Trainer

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
    records = read_json(path)
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of records")
    for i, r in enumerate(records):
        missing = [k for k in ("instruction", "output") if not isinstance(r, dict) or not isinstance(r.get(k), str)]
        if missing:
            raise ValueError(f"{path}: record {i} has no text for {', '.join(repr(k) for k in missing)}")
    return records


def split_instruction_data(records: Sequence[dict], train_frac: float = 0.85, test_frac: float = 0.1) -> tuple[list, list, list]:
    """(train, val, test) as the book splits them, in file order: the first 85 % train, the
    next 10 % test, and the remaining 5 % validate."""
    if not (0 < train_frac and 0 <= test_frac and train_frac + test_frac < 1):
        raise ValueError(f"train fraction {train_frac} and test fraction {test_frac} must be positive and leave some "
                         f"records for validation (their sum must be below 1)")
    n_train, n_test = int(len(records) * train_frac), int(len(records) * test_frac)
    train, test, val = records[:n_train], records[n_train:n_train + n_test], records[n_train + n_test:]
    for name, part in (("training", train), ("validation", val)):
        if not part:
            raise ValueError(f"{len(records)} records leave no {name} records with train fraction {train_frac} and "
                             f"test fraction {test_frac}")
    return list(train), list(val), list(test)


class InstructionDataset:
    """Each record as token ids of prompt + response, with the prompt's length (for masking).
    `batch(indices)` collates records into (inputs, targets), so a DataLoader can serve it.

    A record that would keep no target after truncation to allowed_max_length (with
    mask_prompt, a prompt that fills the whole length) is dropped, and counted in `dropped`:
    a batch of such records alone would have no loss to learn from."""

    def __init__(self, records: Sequence[dict[str, str]], tokenizer: Any, pad_token_id: int = 50256,
                 allowed_max_length: int | None = None, mask_prompt: bool = False):
        self.items, self.dropped = [], 0
        for entry in records:
            prompt = encode_text(tokenizer, format_input(entry))
            ids = prompt + encode_text(tokenizer, format_response(entry))
            # targets[t] predicts token t + 1; the scored ones run from first_scored to len(ids) - 1
            first_scored = len(prompt) - 1 if mask_prompt else 0
            if allowed_max_length is not None and first_scored >= min(len(ids), allowed_max_length):
                self.dropped += 1
                continue
            self.items.append((ids, len(prompt)))
        self.pad_token_id, self.allowed_max_length, self.mask_prompt = pad_token_id, allowed_max_length, mask_prompt

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> list[int]:
        return self.items[i][0]

    def prompt_length(self, i: int) -> int:
        return self.items[i][1]

    def batch(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        indices = [int(i) for i in indices]
        return instruction_collate([self[i] for i in indices], self.pad_token_id, allowed_max_length=self.allowed_max_length,
                                   prompt_lengths=[self.prompt_length(i) for i in indices] if self.mask_prompt else None)


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


def generate_response(model, tokenizer: Any, entry: dict[str, str], max_new_tokens: int = 256, temperature: float = 0.0,
                      top_k: int | None = None, on_token: Callable | None = None) -> str:
    """The model's answer to one record's instruction (and input): generation from the
    prompt plus the response marker, stopped at end-of-text, as in the book."""
    prompt = format_input(entry) + f"\n\n{RESPONSE_MARKER}\n"
    ids = encode_text(tokenizer, prompt)
    context = model.cfg["context_length"]
    if len(ids) >= context:
        raise ValueError(f"the prompt has {len(ids)} tokens but context_length is {context}: no room for a response")
    out = generate(model, np.array([ids]), min(max_new_tokens, context - len(ids)), context, temperature=temperature,
                   top_k=top_k, eos_id=getattr(tokenizer, "eot_token", None), on_token=on_token)
    return extract_response(tokenizer.decode([int(t) for t in backend.to_host(out)[0, len(ids):]]))


def template_response(model, tokenizer: Any, entry: dict[str, str], max_new_tokens: int = 256,
                      temperature: float = 0.0, top_k: int | None = None, on_token=None) -> str:
    """An instruct model's answer to {"instruction": ..., "input": ...} (`tinygpt chat` on a
    Hugging Face folder): the instruction (and input, on the next lines) as the user's turn,
    rendered by the folder's chat template with the assistant's turn opened, tokenized without
    adding special tokens (the template writes them, as transformers' apply_chat_template
    tokenizes), continued until the end-of-text token."""
    content = entry["instruction"] + (f"\n\n{entry['input']}" if entry.get("input") else "")
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": content}]), add_special_tokens=False)
    context = model.cfg["context_length"]
    if len(ids) >= context:
        raise ValueError(f"the prompt has {len(ids)} tokens but context_length is {context}: no room for a response")
    out = generate(model, np.array([ids]), min(max_new_tokens, context - len(ids)), context, temperature=temperature,
                   top_k=top_k, eos_id=tokenizer.eot_token, on_token=on_token)
    return tokenizer.decode([int(t) for t in backend.to_host(out)[0, len(ids):]], skip_special_tokens=True)


def write_responses(path: str | os.PathLike, records: Sequence[dict], model, tokenizer: Any, max_new_tokens: int = 256,
                    show: Callable | None = None) -> list[dict]:
    """Each record with the model's answer added as "model_response" (the book's key),
    written to `path` as JSON atomically; returns the records."""
    answered = []
    for i, entry in enumerate(records):
        try:
            response = generate_response(model, tokenizer, entry, max_new_tokens)
        except ValueError as e:  # the prompt leaves no room in the context
            response, entry = "", {**entry, "error": str(e)}
        answered.append({**entry, "model_response": response})
        if show is not None:
            show(f"response {i + 1}/{len(records)}: {answered[-1]['model_response'][:70]!r}")
    atomic_write_text(path, json.dumps(answered, indent=2, ensure_ascii=False))
    return answered


class InstructionTrainer(Trainer):
    """The pretraining loop on instruction batches; its samples answer a held-out record."""

    def __init__(self, *args, sample_entry: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sample_entry = sample_entry

    def sample(self) -> str:
        if self.sample_entry is None:
            return ""
        try:
            text = generate_response(self.model, self.tokenizer, self.sample_entry, self.config.sample_tokens)
        except ValueError as e:  # a prompt longer than the context: training goes on without samples
            self.show(f"  no sample: {e}")
            return ""
        self.show(f"  response to {self.sample_entry['instruction'][:50]!r}: {text[:200]!r}")
        return text
