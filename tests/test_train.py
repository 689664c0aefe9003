"""Pretraining (book chapter 5): losses, evaluation, the Trainer loop with its schedule,
history files, Ctrl-C and NaN stops, and exact resumption from a checkpoint."""
import csv
import json
import math
import os
import signal

import numpy as np
import pytest

import tinygpt as tg
import tinygpt.functional as F
import tinygpt.train as train_module
from tinygpt.throughput import without_timing
from tinygpt.checkpoint import load_checkpoint, resolve_checkpoint
from tinygpt.data import CharTokenizer, create_dataloader
from tinygpt.generate import generate_text_simple, text_to_token_ids, token_ids_to_text
from tinygpt.model import GPTModel
from tinygpt.optim import AdamW, warmup_cosine_lr
from tinygpt.train import (TrainConfig, Trainer, TrainingError, calc_loss_batch, calc_loss_loader, decay_groups,
                           evaluate_model, perplexity, train_model_simple)
from conftest import host

TEXT = "the quick brown fox jumps over the lazy dog. " * 40  # 1,800 characters, 29 distinct
TOK = CharTokenizer.from_text(TEXT)
CONTEXT, BATCH = 16, 4


def make_model(drop_rate=0.0, seed=0, **overrides):
    tg.manual_seed(seed)
    return GPTModel({"vocab_size": TOK.n_vocab, "context_length": CONTEXT, "emb_dim": 16, "n_heads": 2,
                     "n_layers": 1, "drop_rate": drop_rate, "qkv_bias": False, **overrides})


def make_loaders(train_chars=200, val_chars=60):
    """Non-overlapping windows; 200 training characters give 12 windows = 3 shuffled batches."""
    train = create_dataloader(TEXT[:train_chars], TOK, BATCH, CONTEXT, CONTEXT, shuffle=True, drop_last=True, seed=7)
    val = create_dataloader(TEXT[train_chars:train_chars + val_chars], TOK, BATCH, CONTEXT, CONTEXT,
                            shuffle=False, drop_last=False, seed=7)
    return train, val


def make_trainer(model, loaders, out_dir=None, messages=None, **config):
    cfg = TrainConfig(**{"epochs": 10, "lr": 1e-2, "eval_freq": 2, "eval_iter": 1, "start_context": "the ",
                         "sample_tokens": 4, **config})
    optimizer = AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, weight_decay=cfg.weight_decay)
    show = messages.append if messages is not None else (lambda text: None)
    return Trainer(model, optimizer, *loaders, TOK, cfg, out_dir=out_dir, show=show, progress=False)


def resume(run_dir, loaders, **config):
    """A fresh model, optimizer and loaders put back where the run in run_dir stopped."""
    checkpoint = load_checkpoint(run_dir)
    trainer = make_trainer(checkpoint.model, loaders, out_dir=run_dir, **config)
    trainer.restore(checkpoint.trainer_state, checkpoint.optimizer_state)
    return trainer


def weights(model):
    return {name: host(t) for name, t in model.state_dict().items()}


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert np.array_equal(wa[name], wb[name]), name


@pytest.fixture
def step_losses(monkeypatch):
    """The training loss of every optimizer step (evaluation runs in eval mode and is not recorded)."""
    losses = []
    real = train_module.calc_loss_batch

    def recording(x, y, model):
        loss = real(x, y, model)
        if model.training:
            losses.append(loss.item())
        return loss

    monkeypatch.setattr(train_module, "calc_loss_batch", recording)
    return losses


def log_softmax_reference(logits):
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# ------------------------------------------------------------------ losses

def test_calc_loss_batch_is_cross_entropy_of_the_model_logits(device):
    model = make_model().eval()
    x, y = next(make_loaders()[0].iter_epoch(0))
    loss = calc_loss_batch(x, y, model)
    logits = model(tg.tensor(x))  # [B, T, V]
    by_hand = F.cross_entropy(logits.reshape(-1, TOK.n_vocab), tg.tensor(y.reshape(-1)))
    np.testing.assert_allclose(loss.item(), by_hand.item(), rtol=1e-6)
    logp = log_softmax_reference(host(logits))
    reference = -np.take_along_axis(logp, y[..., None], axis=-1).mean()
    np.testing.assert_allclose(loss.item(), reference, rtol=1e-5)
    assert 2.5 < loss.item() < 4.0  # untrained: near ln(29) = 3.37


def test_calc_loss_loader_is_the_mean_over_the_first_batches_of_epoch_0():
    model = make_model().eval()
    loader, _ = make_loaders(train_chars=400)  # 24 windows = 6 batches
    assert len(loader) == 6
    per_batch = [calc_loss_batch(x, y, model).item() for x, y in loader.iter_epoch(0)]
    assert len(set(per_batch)) == 6  # batches differ, so taking the wrong ones would show
    assert calc_loss_loader(loader, model, 3) == pytest.approx(np.mean(per_batch[:3]), rel=1e-12)
    assert calc_loss_loader(loader, model, None) == pytest.approx(np.mean(per_batch), rel=1e-12)
    assert calc_loss_loader(loader, model, 100) == pytest.approx(np.mean(per_batch), rel=1e-12)
    assert calc_loss_loader(loader, model, 1) == pytest.approx(per_batch[0], rel=1e-12)


def test_calc_loss_loader_leaves_the_train_loader_position_alone():
    model = make_model().eval()
    loader, _ = make_loaders(train_chars=400)
    batches = iter(loader)
    next(batches), next(batches)  # mid-epoch, as during training
    before = loader.state_dict()
    assert before["position"] == 2
    calc_loss_loader(loader, model, 4)
    calc_loss_loader(loader, model)
    assert loader.state_dict() == before
    x_next, _ = next(batches)  # training continues with the batch it would have had
    expected, _ = loader.dataset.batch(loader.order(0)[2 * BATCH:3 * BATCH])
    assert np.array_equal(x_next, expected)


def test_perplexity_is_exp_of_the_loss():
    for loss in (0.0, 0.5, math.log(29), 10.8):
        assert perplexity(loss) == pytest.approx(math.exp(loss), rel=1e-12)
    assert perplexity(math.log(50257)) == pytest.approx(50257)


def test_evaluate_model_uses_eval_mode_and_returns_to_train_mode():
    model = make_model(drop_rate=0.5)
    train_loader, val_loader = make_loaders()
    model.train()
    noisy = [calc_loss_loader(train_loader, model, 2) for _ in range(2)]
    assert noisy[0] != noisy[1]  # dropout is on in train mode, so the check below can fail
    first = evaluate_model(model, train_loader, val_loader, 2)
    assert model.training and all(m.training for _, m in model.named_modules())
    second = evaluate_model(model, train_loader, val_loader, 2)
    assert first == second
    model.eval()
    assert first == (calc_loss_loader(train_loader, model, 2), calc_loss_loader(val_loader, model, 2))


# ------------------------------------------------------------------ the loop

def test_trainer_lowers_the_loss_on_repetitive_text():
    model = make_model()
    trainer = make_trainer(model, make_loaders(train_chars=1600, val_chars=200), lr=2e-2, max_steps=40, eval_freq=13)
    history = trainer.fit()
    assert history["step"] == [1, 14, 27, 40]
    first, last = history["train_loss"][0], history["train_loss"][-1]
    assert first > 3.0
    assert last < first - 1.0, history["train_loss"]
    assert history["val_loss"][-1] < history["val_loss"][0] - 1.0


def test_trainer_evaluates_after_step_1_then_every_eval_freq_steps():
    trainer = make_trainer(make_model(), make_loaders(), max_steps=10, eval_freq=3)
    history = trainer.fit()
    assert trainer.state.step == 10
    assert history["step"] == [1, 4, 7, 10]
    assert set(history) == {"step", "tokens_seen", "train_loss", "val_loss", "lr", "tokens_per_s", "mfu"}
    assert all(len(v) == 4 for v in history.values())
    assert history["tokens_seen"] == [s * BATCH * CONTEXT for s in history["step"]]
    assert trainer.state.tokens_seen == 10 * BATCH * CONTEXT
    assert all(math.isfinite(v) for v in history["train_loss"] + history["val_loss"])


def test_trainer_stops_at_max_steps():
    trainer = make_trainer(make_model(), make_loaders(), max_steps=5, epochs=10)
    trainer.fit()
    assert trainer.state.step == 5
    assert trainer.total_steps == 5
    assert trainer.train_loader.state_dict()["epoch"] == 1  # 3 batches per epoch: 2 into the second
    assert trainer.train_loader.state_dict()["position"] == 2


def test_trainer_runs_exactly_epochs_times_the_batches_per_epoch():
    loaders = make_loaders()
    trainer = make_trainer(make_model(), loaders, epochs=2)
    trainer.fit()
    assert len(loaders[0]) == 3
    assert trainer.state.step == 2 * 3 == trainer.total_steps
    state = loaders[0].state_dict()  # two epochs done: the second is finished, not yet rolled over
    assert (state["epoch"], state["position"]) == (1, 3)


def test_trainer_sets_the_warmup_cosine_learning_rate_before_each_step():
    trainer = make_trainer(make_model(), make_loaders(), max_steps=10, lr=1e-2, warmup_steps=3, cosine=True,
                           initial_lr=1e-4, min_lr=1e-5, eval_freq=1)
    seen = []
    real_step = trainer.optimizer.step

    def recording_step():
        seen.append([group["lr"] for group in trainer.optimizer.param_groups])
        real_step()

    trainer.optimizer.step = recording_step
    history = trainer.fit()
    expected = [warmup_cosine_lr(s, 10, 1e-2, 3, 1e-4, 1e-5) for s in range(10)]
    assert seen == [[lr, lr] for lr in expected]  # both decay groups
    assert expected[0] == 1e-4 and expected[3] == pytest.approx(1e-2) and expected[-1] < 1e-3
    assert history["lr"] == expected  # eval after step s records the lr step s used


def test_trainer_linear_warmup_then_constant_learning_rate():
    trainer = make_trainer(make_model(), make_loaders(), max_steps=6, lr=1e-2, warmup_steps=4, initial_lr=2e-3,
                           eval_freq=1)
    history = trainer.fit()
    assert history["lr"] == pytest.approx([2e-3, 4e-3, 6e-3, 8e-3, 1e-2, 1e-2])


# ------------------------------------------------------------------ exact resume

def test_resumed_run_matches_the_uninterrupted_run_bit_for_bit(device, tmp_path, step_losses):
    n, k = 8, 4  # 3 batches per epoch: the resume point is mid-epoch and the run crosses two epochs
    full = make_trainer(make_model(drop_rate=0.2), make_loaders(), out_dir=tmp_path / "a", max_steps=n, grad_clip=1.0)
    full_history = full.fit()
    full_losses = list(step_losses)
    assert len(full_losses) == n
    step_losses.clear()

    make_trainer(make_model(drop_rate=0.2), make_loaders(), out_dir=tmp_path / "b", max_steps=k, grad_clip=1.0).fit()
    assert resolve_checkpoint(tmp_path / "b").name == f"step_{k:06d}"
    resumed = resume(tmp_path / "b", make_loaders(), max_steps=n, grad_clip=1.0)
    assert resumed.state.step == k and resumed.train_loader.state_dict()["position"] == 1
    resumed_history = resumed.fit()

    assert step_losses == full_losses
    assert without_timing(resumed_history) == without_timing(full_history)
    assert resumed.state.tokens_seen == full.state.tokens_seen
    assert_same_weights(resumed.model, full.model)


def test_resume_without_the_saved_rng_state_diverges(tmp_path, step_losses):
    """Shows the exact-resume test above can fail: dropout draws from the RNG that restore() sets."""
    n, k = 8, 4
    full = make_trainer(make_model(drop_rate=0.2), make_loaders(), out_dir=tmp_path / "a", max_steps=n)
    full.fit()
    full_losses = list(step_losses)
    step_losses.clear()

    make_trainer(make_model(drop_rate=0.2), make_loaders(), out_dir=tmp_path / "b", max_steps=k).fit()
    resumed = resume(tmp_path / "b", make_loaders(), max_steps=n)
    tg.manual_seed(999)
    resumed.fit()

    assert step_losses[:k] == full_losses[:k]
    assert all(a != b for a, b in zip(step_losses[k:], full_losses[k:]))
    assert not np.array_equal(host(resumed.model.tok_emb.weight), host(full.model.tok_emb.weight))


# ------------------------------------------------------------------ stops: NaN and Ctrl-C

def test_nan_loss_raises_without_applying_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model = make_model()
    trainer = make_trainer(model, make_loaders(), out_dir=tmp_path, max_steps=10, checkpoint_every=2)
    real = train_module.calc_loss_batch

    def nan_at_step_3(x, y, m):
        loss = real(x, y, m)
        return loss * float("nan") if m.training and trainer.state.step == 2 else loss

    monkeypatch.setattr(train_module, "calc_loss_batch", nan_at_step_3)
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    message = str(err.value)
    assert "step 3" in message and "not applied" in message and "nan" in message
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert trainer.state.step == 2
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_000002"
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.trainer_state["step"] == 2
    saved = weights(checkpoint.model)
    assert all(np.isfinite(w).all() for w in saved.values())
    live = weights(model)  # the failed step changed nothing: the model is still the step-2 checkpoint
    assert all(np.array_equal(live[name], saved[name]) for name in saved)
    assert all(s["step"] == 2 for s in trainer.optimizer.state.values())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the inf weight, on purpose
def test_infinite_weight_stops_training_at_step_1():
    model = make_model()
    model.final_norm.shift.data[0] = np.inf
    trainer = make_trainer(model, make_loaders(), max_steps=5)
    with pytest.raises(TrainingError, match=r"step 1 .*not applied"):
        trainer.fit()
    assert trainer.state.step == 0 and trainer.optimizer.state == {}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the inf weight, on purpose
def test_nan_error_names_only_a_checkpoint_that_exists(tmp_path):
    """With out_dir set but no checkpoint written yet, the message must not send the user to
    RUN/latest: that file does not exist."""
    model = make_model()
    model.final_norm.shift.data[0] = np.inf
    trainer = make_trainer(model, make_loaders(), out_dir=tmp_path, max_steps=5)
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    assert not (tmp_path / "latest").exists()
    assert str(tmp_path / "latest") not in str(err.value)


def test_ctrl_c_stops_after_the_current_step_and_the_run_resumes_exactly(tmp_path, step_losses):
    n, config = 8, {"max_steps": 8, "warmup_steps": 2, "cosine": True, "grad_clip": 1.0, "initial_lr": 1e-3}
    full = make_trainer(make_model(drop_rate=0.2), make_loaders(), out_dir=tmp_path / "a", **config)
    full_history = full.fit()
    full_losses = list(step_losses)
    step_losses.clear()

    messages = []
    trainer = make_trainer(make_model(drop_rate=0.2), make_loaders(), out_dir=tmp_path / "b", messages=messages, **config)
    real_step = trainer.optimizer.step

    def step_then_ctrl_c():
        real_step()
        if len(step_losses) == 3:
            # never send a real SIGINT unless the trainer catches it: it would end the test session
            assert signal.getsignal(signal.SIGINT) == trainer._request_stop
            os.kill(os.getpid(), signal.SIGINT)

    trainer.optimizer.step = step_then_ctrl_c
    handler_before = signal.getsignal(signal.SIGINT)
    trainer.fit()  # returns normally
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert trainer.state.step == 3 and len(step_losses) == 3
    assert any("interrupted at step 3" in m for m in messages)
    assert resolve_checkpoint(tmp_path / "b").name == "step_000003"
    assert load_checkpoint(tmp_path / "b").trainer_state["step"] == 3

    resumed = resume(tmp_path / "b", make_loaders(), **config)
    resumed_history = resumed.fit()
    assert step_losses == full_losses
    assert without_timing(resumed_history) == without_timing(full_history)
    assert_same_weights(resumed.model, full.model)


def test_second_ctrl_c_aborts_at_once():
    trainer = make_trainer(make_model(), make_loaders())
    trainer._request_stop(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        trainer._request_stop(signal.SIGINT, None)


def test_fit_called_again_after_a_ctrl_c_stop_runs_to_the_end():
    """Ctrl-C stops one fit(); calling fit() again (e.g. in a notebook) continues the run."""
    messages = []
    trainer = make_trainer(make_model(), make_loaders(), messages=messages, max_steps=8)
    trainer._request_stop(signal.SIGINT, None)
    trainer.fit()
    assert trainer.state.step == 1
    trainer.fit()
    assert trainer.state.step == 8, f"stopped again at step {trainer.state.step}: {messages[-1]}"


def test_resume_after_a_stop_on_the_last_step_of_the_last_epoch_takes_no_extra_step(tmp_path):
    """A run of epochs=1 (3 batches) stopped by Ctrl-C right after its last step is complete;
    resuming it must not take a 4th step from the next epoch."""
    trainer = make_trainer(make_model(), make_loaders(), out_dir=tmp_path, epochs=1)
    real_step = trainer.optimizer.step
    calls = []

    def step_then_stop():
        real_step()
        calls.append(1)
        if len(calls) == 3:
            trainer._request_stop(signal.SIGINT, None)

    trainer.optimizer.step = step_then_stop
    trainer.fit()
    assert trainer.state.step == 3 == trainer.total_steps

    resumed = resume(tmp_path, make_loaders(), epochs=1)
    resumed.fit()
    assert resumed.state.step == 3, f"resumed run took {resumed.state.step - 3} step(s) beyond epochs=1"


# ------------------------------------------------------------------ history files

def test_history_json_and_csv_hold_the_same_numbers(tmp_path):
    history = make_trainer(make_model(), make_loaders(), out_dir=tmp_path, max_steps=7, eval_freq=3).fit()
    from_json = json.loads((tmp_path / "history.json").read_text())
    assert from_json == history
    with open(tmp_path / "history.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "tokens_seen", "train_loss", "val_loss", "lr", "tokens_per_s", "mfu"]
    assert all(v > 0 for v in history["tokens_per_s"] + history["mfu"])
    assert len(rows) == 1 + 3
    columns = dict(zip(rows[0], zip(*rows[1:])))
    assert [int(v) for v in columns["step"]] == history["step"] == [1, 4, 7]
    assert [int(v) for v in columns["tokens_seen"]] == history["tokens_seen"]
    for key in ("train_loss", "val_loss", "lr"):
        assert [float(v) for v in columns[key]] == history[key]


def test_loss_plot_is_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    make_trainer(make_model(), make_loaders(), out_dir=tmp_path, max_steps=3).fit()
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))


# ------------------------------------------------------------------ parameter groups

LINEAR_WEIGHTS = ("att.W_query.weight", "att.W_key.weight", "att.W_value.weight", "att.out_proj.weight",
                  "ff.layers.0.weight", "ff.layers.2.weight")


@pytest.mark.parametrize("tied", [False, True])
def test_decay_groups_decay_only_linear_weights(tied):
    model = make_model(n_layers=2, qkv_bias=True, tie_weights=tied)
    decay, no_decay = decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    expected = {f"trf_blocks.{i}.{w}" for i in range(2) for w in LINEAR_WEIGHTS}
    if not tied:
        expected.add("out_head.weight")
    assert decayed == expected
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert {"tok_emb.weight", "pos_emb.weight", "final_norm.scale", "final_norm.shift",
            "trf_blocks.0.att.W_query.bias", "trf_blocks.1.att.out_proj.bias", "trf_blocks.1.ff.layers.0.bias",
            "trf_blocks.0.norm1.scale", "trf_blocks.1.norm2.shift"} <= not_decayed
    all_ids = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(model.parameters())
    assert set(all_ids) == {id(p) for p in model.parameters()}


# ------------------------------------------------------------------ the book's helpers

def test_train_model_simple_returns_three_equal_length_lists():
    model = make_model()
    train_loader, val_loader = make_loaders()
    optimizer = AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    train_losses, val_losses, tokens_seen = train_model_simple(model, train_loader, val_loader, optimizer, num_epochs=2,
                                                               eval_freq=2, eval_iter=1, start_context="the ", tokenizer=TOK)
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == 3  # steps 1, 3, 5 of 6
    assert tokens_seen == [s * BATCH * CONTEXT for s in (1, 3, 5)]
    assert all(math.isfinite(v) for v in train_losses + val_losses)


def manual_greedy(model, ids, steps, context_size):
    ids = host(ids)
    for _ in range(steps):
        logits = host(model(tg.tensor(ids[:, -context_size:])))
        ids = np.concatenate([ids, logits[:, -1, :].argmax(axis=-1)[:, None]], axis=1)
    return ids


def test_generate_text_simple_appends_the_argmax_token(device):
    model = make_model().eval()
    idx = text_to_token_ids("the quick", TOK)
    out = generate_text_simple(model, idx, max_new_tokens=6, context_size=CONTEXT)
    assert out.shape == (1, 9 + 6)
    assert np.array_equal(host(out)[:, :9], host(idx))
    assert np.array_equal(host(out), manual_greedy(model, idx, 6, CONTEXT))


def test_generate_text_simple_crops_the_context(device):
    model = make_model().eval()
    idx = text_to_token_ids(TEXT[:20], TOK)  # longer than context_length 16: the model would refuse it
    out = generate_text_simple(model, idx, max_new_tokens=5, context_size=CONTEXT)
    assert np.array_equal(host(out), manual_greedy(model, idx, 5, CONTEXT))
    short = generate_text_simple(model, idx, max_new_tokens=5, context_size=3)
    assert np.array_equal(host(short), manual_greedy(model, idx, 5, 3))
    with pytest.raises(ValueError, match="context_length"):
        model(idx)


def test_text_to_token_ids_round_trips(device):
    ids = text_to_token_ids("the lazy dog.", TOK)
    assert ids.shape == (1, 13)
    assert host(ids).tolist() == [TOK.encode("the lazy dog.")]
    assert token_ids_to_text(ids, TOK) == "the lazy dog."
    assert token_ids_to_text(host(ids)[0], TOK) == "the lazy dog."
