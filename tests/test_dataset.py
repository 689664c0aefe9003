"""Sliding-window dataset, batch loader (shuffle, drop_last, resume) and the train/val split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygpt.data import (
    CharTokenizer,
    DataLoader,
    GPTDataset,
    create_dataloader,
    gpt2_tokenizer,
    train_bpe,
    train_val_split,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BPE_FILE = DATA / "gpt2.tiktoken"
VERDICT = DATA / "the-verdict.txt"


@pytest.fixture(scope="module")
def verdict_loader_args():
    if not (BPE_FILE.exists() and VERDICT.exists()):
        pytest.skip(f"needs gpt2.tiktoken and the-verdict.txt in {DATA}")
    return VERDICT.read_text(encoding="utf-8"), gpt2_tokenizer(BPE_FILE)


def loader(n_ids: int, max_length: int = 4, stride: int = 1, **kwargs) -> DataLoader:
    return DataLoader(GPTDataset(np.arange(n_ids), max_length, stride), **kwargs)


def test_book_first_two_batches_of_the_verdict(verdict_loader_args):
    text, tok = verdict_loader_args
    dl = create_dataloader(text, tok, batch_size=1, max_length=4, stride=1, shuffle=False)
    batches = iter(dl)
    x, y = next(batches)
    assert x.tolist() == [[40, 367, 2885, 1464]]
    assert y.tolist() == [[367, 2885, 1464, 1807]]
    x, y = next(batches)
    assert x.tolist() == [[367, 2885, 1464, 1807]]
    assert len(dl) == 5145 - 4  # one window per start in range(0, 5145 - 4)


def test_book_batch_of_eight_with_stride_four(verdict_loader_args):
    text, tok = verdict_loader_args
    x, y = next(
        iter(create_dataloader(text, tok, batch_size=8, max_length=4, stride=4, shuffle=False))
    )
    assert x.shape == y.shape == (8, 4) and x.dtype == y.dtype == np.int64
    assert x[0].tolist() == [40, 367, 2885, 1464] and x[1].tolist() == [1807, 3619, 402, 271]
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 60), st.integers(1, 12), st.integers(1, 12))
def test_windows_match_the_books_loop(n_ids, max_length, stride):
    ids = list(range(100, 100 + n_ids))
    if n_ids <= max_length:
        with pytest.raises(ValueError):
            GPTDataset(ids, max_length, stride)
        return
    ds = GPTDataset(ids, max_length, stride)
    expected, start = [], 0
    while start + max_length < n_ids:  # counted without range(): starts 0, s, 2s, ... below n - L
        expected.append((ids[start : start + max_length], ids[start + 1 : start + max_length + 1]))
        start += stride
    assert len(ds) == len(expected)
    assert [(x.tolist(), y.tolist()) for x, y in (ds[i] for i in range(len(ds)))] == expected


def test_dataset_keeps_one_int64_array_and_windows_are_views():
    ds = GPTDataset([5, 6, 7, 8, 9, 10], max_length=3, stride=2)
    assert ds.ids.dtype == np.int64 and ds.ids.tolist() == [5, 6, 7, 8, 9, 10]
    x, y = ds[1]
    assert x.tolist() == [7, 8, 9] and y.tolist() == [8, 9, 10]
    assert np.shares_memory(x, ds.ids) and np.shares_memory(y, ds.ids)
    assert ds[-1][0].tolist() == [7, 8, 9]
    with pytest.raises(IndexError, match="window index 2 is out of range for 2 windows"):
        ds[2]


def test_text_too_short_for_one_window_names_count_and_max_length():
    with pytest.raises(ValueError, match="text has 4 tokens but max_length is 4"):
        GPTDataset([1, 2, 3, 4], max_length=4, stride=1)
    assert len(GPTDataset([1, 2, 3, 4, 5], max_length=4, stride=1)) == 1


def test_bad_lengths_and_batch_size_are_rejected():
    with pytest.raises(ValueError, match="stride=0"):
        GPTDataset(range(10), 4, 0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        loader(10, batch_size=0)


def test_batches_are_int64_and_y_is_x_shifted_by_one():
    dl = loader(40, max_length=5, stride=3, batch_size=4, shuffle=True, seed=1)
    for x, y in dl:
        assert x.dtype == y.dtype == np.int64 and x.shape == (4, 5)
        np.testing.assert_array_equal(y, x + 1)  # ids are 0..39, so the next token is id + 1


def test_drop_last_drops_only_the_short_final_batch():
    # 20 ids, length 4, stride 2 -> starts 0, 2, ..., 14: 8 windows -> with batch 3: 3+3+2
    kept = loader(20, stride=2, batch_size=3, drop_last=False)
    dropped = loader(20, stride=2, batch_size=3, drop_last=True)
    assert len(kept.dataset) == 8
    assert [len(x) for x, _ in kept] == [3, 3, 2] and len(kept) == 3
    assert [len(x) for x, _ in dropped] == [3, 3] and len(dropped) == 2


def test_drop_last_with_fewer_windows_than_a_batch_is_an_error():
    with pytest.raises(
        ValueError, match="dataset has 2 examples but batch_size is 3 with drop_last=True"
    ):
        loader(6, batch_size=3, drop_last=True)
    assert len(loader(6, batch_size=3, drop_last=False)) == 1


def first_column(dl: DataLoader) -> list[int]:
    """The window starts of one epoch, in serving order (ids are 0..n, stride 1)."""
    return [int(v) for x, _ in dl for v in x[:, 0]]


def test_shuffle_is_reproducible_with_a_seed_and_differs_with_another():
    a = first_column(loader(50, batch_size=5, shuffle=True, seed=7))
    b = first_column(loader(50, batch_size=5, shuffle=True, seed=7))
    c = first_column(loader(50, batch_size=5, shuffle=True, seed=8))
    assert a == b
    assert a != c
    assert sorted(a) == sorted(c) == list(range(46))  # each epoch serves every window once
    assert first_column(loader(50, batch_size=5, shuffle=False)) == list(range(46))


def test_each_epoch_has_a_new_permutation():
    dl = loader(50, batch_size=5, shuffle=True, seed=7)
    epoch0, epoch1 = first_column(dl), first_column(dl)
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)
    assert dl.state_dict()["epoch"] == 2


def test_resuming_from_state_dict_continues_the_same_batch_sequence():
    def batches(dl, n):
        out = []
        while len(out) < n:
            for x, _ in dl:
                out.append(x[:, 0].tolist())
                if len(out) == n:
                    break
        return out

    full = batches(loader(30, batch_size=4, shuffle=True, seed=3), 20)
    first = loader(30, batch_size=4, shuffle=True, seed=3)
    head = batches(first, 9)  # 26 windows -> 7 batches: one epoch and 2 batches into the second
    state = first.state_dict()
    assert state == {"seed": 3, "epoch": 1, "position": 2}
    resumed = loader(30, batch_size=4, shuffle=True, seed=999)
    resumed.load_state_dict(state)
    assert head + batches(resumed, 11) == full


def test_stopping_after_an_epochs_last_batch_starts_the_next_epoch_in_full():
    dl = loader(10, batch_size=2, shuffle=True, seed=0)  # 6 windows, 3 batches
    for i, _ in enumerate(dl):
        if i == 2:
            break
    assert dl.state_dict()["position"] == 3
    assert len(list(dl)) == 3 and dl.state_dict() == {"seed": 0, "epoch": 2, "position": 0}


def test_load_state_dict_rejects_a_position_past_the_epoch():
    dl = loader(10, batch_size=2)
    with pytest.raises(ValueError, match="position 4 is out of range for 3 batches per epoch"):
        dl.load_state_dict({"seed": 0, "epoch": 0, "position": 4})


def test_create_dataloader_works_with_a_char_tokenizer():
    text = "to be or not to be, that is the question"
    tok = CharTokenizer.from_text(text)
    dl = create_dataloader(text, tok, batch_size=2, max_length=8, stride=8, shuffle=False)
    x, y = next(iter(dl))
    assert tok.decode(x[0]) == "to be or" and tok.decode(y[0]) == "o be or "
    assert tok.decode(x[1]) == " not to "


def test_create_dataloader_encodes_endoftext_as_the_special_token():
    text = "one story.<|endoftext|>another story." * 3
    tok = train_bpe(text, 270)
    x, y = next(
        iter(create_dataloader(text, tok, batch_size=1, max_length=20, stride=20, shuffle=False))
    )
    assert tok.special_tokens["<|endoftext|>"] in x[0].tolist() + y[0].tolist()


def test_train_val_split_cuts_where_the_book_does():
    train, val = train_val_split("abcdefghij", 0.9)
    assert (train, val) == ("abcdefghi", "j")
    train, val = train_val_split(np.arange(20479), 0.9)
    assert len(train) == 18431 and val[0] == 18431  # int(0.9 * 20479)
    with pytest.raises(ValueError, match="got 1.0"):
        train_val_split("abc", 1.0)
