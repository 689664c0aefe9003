"""Tokens/s and MFU (tinygpt/throughput.py): the FLOP count by hand on a small model, the
speedometer's arithmetic, and the history columns a resumed older run gains."""
from __future__ import annotations

import numpy as np
import pytest

import tinygpt as tg
from tinygpt import throughput
from tinygpt.model import GPTModel
from tinygpt.optim import AdamW
from tinygpt.train import TrainConfig, Trainer

CFG = {"vocab_size": 11, "context_length": 4, "emb_dim": 8, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": True}


def test_flops_per_token_counts_every_linear_weight_and_attention():
    model = GPTModel(CFG)
    per_layer = 4 * 8 * 8 + 8 * 32 + 32 * 8  # query, key, value, out projections; the feed-forward's two
    weights = 2 * per_layer + 11 * 8         # + the output head (biases and embeddings are not counted)
    attention = 12 * 2 * 2 * 4 * 3           # 12 L H D T at T = 3
    assert throughput.flops_per_token(model, 3) == 6 * weights + attention


def test_tied_head_is_counted_once_per_use():
    tied = GPTModel({**CFG, "tie_weights": True})
    assert throughput.flops_per_token(tied, 3) == throughput.flops_per_token(GPTModel(CFG), 3)  # the head still multiplies


def test_speedometer_counts_only_the_timed_steps_and_starts_a_new_window(monkeypatch):
    clock = iter([10.0, 10.5, 20.0, 21.5])  # two steps of 0.5 s and 1.5 s, with 8.5 s between them
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(throughput, "peak_flops", lambda *args: 1e6)
    speed = throughput.Speedometer(GPTModel(CFG))
    batch = (np.zeros((2, 4), dtype=np.int64),)
    for _ in range(2):
        with speed.timing(batch):
            pass
    assert speed.rate() == 16 / 2.0
    assert speed.mfu() == pytest.approx(8.0 * throughput.flops_per_token(speed.model, 4) / 1e6)
    assert speed.postfix()["tok_s"] == "8"
    window = speed.window()
    assert window["tokens_per_s"] == 8.0 and window["mfu"] == round(speed.flops_per_token * 8.0 / 1e6, 4)
    assert speed.window() == {"tokens_per_s": None, "mfu": None}  # no step since


def test_peak_flops_is_a_positive_rate_of_the_kernels_matmul():
    assert throughput.peak_flops("cpu", "float32", 16, 8) > 0


def test_a_history_without_the_speed_columns_gets_them_blank_for_its_earlier_rows():
    tg.manual_seed(0)
    model = GPTModel(CFG)
    trainer = Trainer(model, AdamW(model.parameters()), [], [], None, TrainConfig(), progress=False)
    trainer.state.history = {"step": [1, 2], "tokens_seen": [8, 16], "train_loss": [2.0, 1.9], "val_loss": [2.1, 2.0],
                             "lr": [1e-3, 1e-3]}  # written by a version before these columns
    trainer.state.step = 3
    trainer.record(train_loss=1.8, val_loss=1.95)
    history = trainer.state.history
    assert {len(column) for column in history.values()} == {3}
    assert history["tokens_per_s"] == [None, None, None] and history["mfu"] == [None, None, None]  # no timed step yet
    assert throughput.without_timing(history).keys() == {"step", "tokens_seen", "train_loss", "val_loss", "lr"}
