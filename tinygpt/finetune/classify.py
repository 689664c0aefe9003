"""Text classification by finetuning a GPT (book chapter 6).

The language-model head (emb_dim -> vocab_size) is replaced by a small one (emb_dim ->
num_classes). Because attention is causal, only the last real token of a text has seen the
whole text, so its output is the one classified; padding after it is never looked at.
Most of the network stays frozen: by default only the last transformer block, the final
LayerNorm and the new head train, which is quick and works well (the book's choice).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from tinygpt import backend, distributed, nn
from tinygpt import functional as F
from tinygpt.data import encode_text
from tinygpt.tensor import Tensor, no_grad
from tinygpt.train import Trainer


def make_classifier(model, num_classes: int, trainable_blocks: int | None = 1):
    """Turn a GPTModel into a classifier in place: freeze everything, put a new Linear head
    (emb_dim -> num_classes) on top, and unfreeze the last `trainable_blocks` transformer
    blocks (None: the whole model), the final LayerNorm and the head."""
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    with backend.device_scope(model.tok_emb.weight.device):
        model.out_head = nn.Linear(model.cfg["emb_dim"], num_classes)
    model.cfg.update(num_classes=num_classes, tie_weights=False)
    return train_only_the_top(model, trainable_blocks)


def train_only_the_top(model, trainable_blocks: int | None = 1):
    """Freeze the model except its last `trainable_blocks` transformer blocks, the final
    LayerNorm and the output head; None trains the whole model, embeddings included."""
    blocks = list(model.trf_blocks)
    if trainable_blocks is None:
        return model.requires_grad_(True)
    if not 0 <= trainable_blocks <= len(blocks):
        raise ValueError(f"trainable_blocks is {trainable_blocks} but the model has {len(blocks)} transformer blocks")
    model.requires_grad_(False)
    for block in blocks[len(blocks) - trainable_blocks:]:
        block.requires_grad_(True)
    model.final_norm.requires_grad_(True)
    model.out_head.requires_grad_(True)
    return model


def read_labelled_file(path: str | os.PathLike, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """Texts and labels from a CSV file (tab-separated when the name ends in .tsv) with a
    header row. Missing columns, an empty file or an empty text raise ValueError naming the
    file (and the row)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        if not reader.fieldnames:
            raise ValueError(f"{path} is empty: expected a header row with {text_column!r} and {label_column!r}")
        missing = [c for c in (text_column, label_column) if c not in reader.fieldnames]
        if missing:
            raise ValueError(f"{path} has no column {', '.join(map(repr, missing))}; its columns are {reader.fieldnames}")
        texts, labels = [], []
        for row in reader:
            line = reader.line_num  # as an editor shows it (a quoted text may span lines)
            missing = [c for c in (text_column, label_column) if row.get(c) is None]
            if missing:
                raise ValueError(f"{path}, line {line}: no value for column {missing[0]!r} "
                                 f"(the row has {len([x for x in row.values() if x is not None])} of {len(reader.fieldnames)} fields)")
            if not row[text_column].strip():
                raise ValueError(f"{path}, line {line}: empty text")
            if not row[label_column].strip():
                raise ValueError(f"{path}, line {line}: empty label")
            texts.append(row[text_column])
            labels.append(row[label_column])
    if not texts:
        raise ValueError(f"{path} has a header but no rows")
    return texts, labels


def balance_classes(texts: Sequence[str], labels: Sequence[str], seed: int = 123) -> tuple[list[str], list[str]]:
    """Undersample every class to the size of the smallest (seeded), keeping the file order."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    smallest = min(int((labels_arr == c).sum()) for c in set(labels))
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels_arr == c), smallest, replace=False)
                                   for c in sorted(set(labels))]))
    return [texts[i] for i in keep], [labels[i] for i in keep]


def random_split(n: int, train_frac: float = 0.7, val_frac: float = 0.1, seed: int = 123) -> tuple[np.ndarray, ...]:
    """Shuffled (train, validation, test) index arrays; the test set takes the rest."""
    if not (0 < train_frac and 0 <= val_frac and train_frac + val_frac <= 1):
        raise ValueError(f"split fractions train {train_frac} and val {val_frac} must be positive and add up to at most 1")
    order = np.random.default_rng(seed).permutation(n)
    a = int(n * train_frac)
    b = a + int(n * val_frac)  # as the book: separate roundings, so 0.7 + 0.1 of 10 is 7 + 1
    return order[:a], order[a:b], order[b:]


class ClassificationDataset:
    """Token ids padded to one length (the longest text, or max_length, truncating longer
    ones), each text's real length, and its label id."""

    def __init__(self, texts: Sequence[str], labels: Sequence[str], tokenizer: Any, label_names: Sequence[str],
                 max_length: int | None = None, pad_token_id: int = 50256):
        label_ids = {name: i for i, name in enumerate(label_names)}
        for row, label in enumerate(labels):
            if label not in label_ids:
                raise ValueError(f"label {label!r} of example {row} is not one of the known labels {list(label_names)}")
        encoded = [encode_text(tokenizer, t) for t in texts]
        self.max_length = max_length or max(len(e) for e in encoded)
        self.ids = np.full((len(encoded), self.max_length), pad_token_id, dtype=np.int64)
        self.lengths = np.empty(len(encoded), dtype=np.int64)
        for i, e in enumerate(encoded):
            e = e[: self.max_length]
            if not e:
                raise ValueError(f"example {i} has no tokens")
            self.ids[i, : len(e)] = e
            self.lengths[i] = len(e)
        self.labels = np.array([label_ids[label] for label in labels], dtype=np.int64)
        self.label_names = list(label_names)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 123, epoch: int = 0,
                drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(ids, lengths, labels) batches; shuffled per epoch from (seed, epoch)."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self)) if shuffle else np.arange(len(self))
        stop = len(self) - len(self) % batch_size if drop_last else len(self)
        for start in range(0, stop, batch_size):
            yield self.batch(order[start:start + batch_size])

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids [B, max_length], lengths [B], labels [B]) of these examples (for DataLoader)."""
        return self.ids[indices], self.lengths[indices], self.labels[indices]


def class_logits(model, ids, lengths) -> Tensor:
    """Logits [B, num_classes] at each row's last real token: position lengths - 1."""
    device = model.tok_emb.weight.device
    logits = model(backend.to_device(ids, device))  # [B, T, C]
    rows = backend.get_backend(device).xp.arange(logits.shape[0])
    return logits[rows, backend.to_device(np.asarray(lengths) - 1, device)]  # [B, T, C] -> [B, C]


def calc_loss_batch(ids, lengths, labels, model) -> Tensor:
    return F.cross_entropy(class_logits(model, ids, lengths), backend.to_device(labels, model.tok_emb.weight.device))


@no_grad()
def calc_accuracy(dataset: ClassificationDataset, model, batch_size: int = 8, num_batches: int | None = None) -> float:
    """The fraction of correct predictions over the first num_batches batches (all if None)."""
    was_training = model.training
    model.eval()
    correct = seen = 0
    batches = (b for i, b in enumerate(dataset.batches(batch_size)) if num_batches is None or i < num_batches)
    for ids, lengths, labels in distributed.take_turns(batches):  # data parallel: each rank a share of the batches
        predicted = backend.to_host(class_logits(model, ids, lengths).data.argmax(axis=-1))
        correct += int((predicted == labels).sum())
        seen += len(labels)
    model.train(was_training)
    correct, seen = distributed.sum_over_ranks(correct, seen)
    return correct / seen if seen else float("nan")


@no_grad()
def calc_loss(dataset: ClassificationDataset, model, batch_size: int = 8, num_batches: int | None = None) -> float:
    was_training = model.training
    model.eval()
    batches = (b for i, b in enumerate(dataset.batches(batch_size)) if num_batches is None or i < num_batches)
    losses = [calc_loss_batch(ids, lengths, labels, model).item() for ids, lengths, labels in distributed.take_turns(batches)]
    model.train(was_training)
    total, count = distributed.sum_over_ranks(sum(losses), len(losses))  # data parallel: each rank a share of the batches
    return total / count if count else float("nan")


def train_classifier_simple(model, train_set: ClassificationDataset, val_set: ClassificationDataset, optimizer,
                            num_epochs: int, eval_freq: int, eval_iter: int, batch_size: int = 8, seed: int = 123,
                            show=print):
    """The book's chapter-6 loop. Returns (train_losses, val_losses, train_accs, val_accs, examples_seen)."""
    train_losses, val_losses, train_accs, val_accs = [], [], [], []
    examples_seen, step = 0, 0
    model.train()
    for epoch in range(num_epochs):
        for ids, lengths, labels in train_set.batches(batch_size, shuffle=True, seed=seed, epoch=epoch, drop_last=True):
            optimizer.zero_grad()
            calc_loss_batch(ids, lengths, labels, model).backward()
            optimizer.step()
            examples_seen += len(labels)
            step += 1
            if (step - 1) % eval_freq == 0:
                train_losses.append(calc_loss(train_set, model, batch_size, eval_iter))
                val_losses.append(calc_loss(val_set, model, batch_size, eval_iter))
                show(f"epoch {epoch + 1} step {step}: train loss {train_losses[-1]:.3f}, val loss {val_losses[-1]:.3f}")
        train_accs.append(calc_accuracy(train_set, model, batch_size, eval_iter))
        val_accs.append(calc_accuracy(val_set, model, batch_size, eval_iter))
        show(f"epoch {epoch + 1}: train accuracy {train_accs[-1]:.1%}, val accuracy {val_accs[-1]:.1%}")
    return train_losses, val_losses, train_accs, val_accs, examples_seen


class ClassifierTrainer(Trainer):
    """The pretraining loop (schedule, checkpoints, exact resume) on batches of a
    ClassificationDataset; evaluations add accuracy and show no text samples."""

    def loss_batch(self, batch) -> Tensor:
        ids, lengths, labels = batch
        return calc_loss_batch(ids, lengths, labels, self.model)

    def evaluate(self) -> tuple[float, float]:
        n, size = self.config.eval_iter, self.train_loader.batch_size
        train_set, val_set = self.train_loader.dataset, self.val_loader.dataset
        train_loss, val_loss = calc_loss(train_set, self.model, size, n), calc_loss(val_set, self.model, size, n)
        train_acc, val_acc = calc_accuracy(train_set, self.model, size, n), calc_accuracy(val_set, self.model, size, n)
        self.record(train_loss=train_loss, val_loss=val_loss, train_acc=train_acc, val_acc=val_acc)
        self.show(f"step {self.state.step:>6}  train loss {train_loss:.3f}  val loss {val_loss:.3f}  "
                  f"train accuracy {train_acc:.1%}  val accuracy {val_acc:.1%}")
        self.write_history()
        return train_loss, val_loss


@no_grad()
def classify(text: str, model, tokenizer: Any, label_names: Sequence[str], max_length: int | None = None) -> tuple[str, dict[str, float]]:
    """The predicted label of one text and the probability of every label."""
    ids = encode_text(tokenizer, text)[: max_length or model.cfg["context_length"]]
    if not ids:
        raise ValueError("cannot classify an empty text: it has no token whose output could be read")
    was_training = model.training
    model.eval()
    probs = backend.to_host(F.softmax(class_logits(model, np.array([ids]), [len(ids)])).data)[0]
    model.train(was_training)
    return label_names[int(probs.argmax())], {name: float(p) for name, p in zip(label_names, probs)}
