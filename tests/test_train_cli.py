"""`tinygpt train`: a small run end to end, refusing to overwrite a run, exact resume,
the three tokenizers, and the default corpus."""
import json
import re
import sys

import numpy as np
import pytest

from tinygpt.checkpoint import load_checkpoint, resolve_checkpoint
from tinygpt.cli import main
from tinygpt.data import default_corpus
from tinygpt.data import BPETokenizer, CharTokenizer
from tinygpt.throughput import without_timing
from conftest import SHARED_DATA, host

GPT2_FILE = SHARED_DATA / "gpt2.tiktoken"
SMALL = ["--eval-freq", "3", "--eval-iter", "1", "--emb-dim", "16", "--n-layers", "1", "--n-heads", "2",
         "--context-length", "16", "--batch-size", "4", "--sample-tokens", "10", "--no-progress"]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 50, encoding="utf-8")  # 2,250 characters
    return path


def train(data_file, out, *extra):
    return main(["train", "--data", str(data_file), "--out", str(out), *SMALL, *extra])


def history(run_dir):
    return json.loads((run_dir / "history.json").read_text())


def test_train_command_runs_and_writes_a_checkpoint(data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(data_file, out, "--max-steps", "6") == 0
    printed = capsys.readouterr().out
    match = re.search(r"loss: train (\d+\.\d{3}) -> (\d+\.\d{3}), val (\d+\.\d{3}) -> (\d+\.\d{3})", printed)
    assert match, printed
    assert float(match[2]) < float(match[1])
    assert "sample before training:" in printed and "sample after training:" in printed
    assert resolve_checkpoint(out).name == "step_000006"
    ck = load_checkpoint(out)
    assert ck.trainer_state["step"] == 6 and ck.trainer_state["tokens_seen"] == 6 * 4 * 16
    assert isinstance(ck.tokenizer, CharTokenizer)
    assert {k: ck.model.cfg[k] for k in ("emb_dim", "n_layers", "n_heads", "context_length")} == \
        {"emb_dim": 16, "n_layers": 1, "n_heads": 2, "context_length": 16}
    assert ck.model.cfg["vocab_size"] == ck.tokenizer.n_vocab
    assert history(out)["step"] == [1, 4]
    assert (out / "history.csv").exists()


def test_train_refuses_to_overwrite_a_run_and_points_to_resume(data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(data_file, out, "--max-steps", "2") == 0
    capsys.readouterr()
    latest = (out / "latest").read_text()
    assert train(data_file, out, "--max-steps", "2") == 2
    err = capsys.readouterr().err
    assert "--resume" in err and str(out) in err
    assert (out / "latest").read_text() == latest


def test_resume_continues_exactly_like_a_straight_run(data_file, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(data_file, straight, "--max-steps", "9") == 0
    assert train(data_file, split, "--max-steps", "6") == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(split), "--max-steps", "9", "--no-progress"]) == 0
    assert f"resuming {split / 'checkpoints' / 'step_000006'} at step 6" in capsys.readouterr().out
    assert resolve_checkpoint(split).name == "step_000009"
    assert without_timing(history(split)) == without_timing(history(straight))
    assert history(split)["step"] == [1, 4, 7]
    a, b = load_checkpoint(split).model, load_checkpoint(straight).model
    for name, tensor in a.state_dict().items():
        assert np.array_equal(host(tensor), host(b.state_dict()[name])), name


def test_resume_from_a_missing_directory_is_an_error_message_not_a_traceback(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main(["train", "--resume", str(missing), "--no-progress"]) != 0
    assert str(missing) in capsys.readouterr().err


def test_train_with_a_trained_bpe_tokenizer(data_file, tmp_path):
    out = tmp_path / "run"
    assert train(data_file, out, "--max-steps", "3", "--tokenizer", "bpe", "--vocab-size", "300") == 0
    ck = load_checkpoint(out)
    assert isinstance(ck.tokenizer, BPETokenizer)
    assert 257 < ck.tokenizer.n_vocab <= 300
    assert ck.model.cfg["vocab_size"] == ck.tokenizer.n_vocab
    assert ck.trainer_state["step"] == 3


def test_train_with_the_gpt2_tokenizer_from_a_local_file(data_file, tmp_path, capsys):
    if not GPT2_FILE.exists():
        pytest.skip(f"{GPT2_FILE} not present")
    out = tmp_path / "run"
    assert train(data_file, out, "--max-steps", "3", "--tokenizer", "gpt2", "--bpe-file", str(GPT2_FILE)) == 0
    assert "50,257 tokens" in capsys.readouterr().out
    ck = load_checkpoint(out, bpe_file=GPT2_FILE)
    assert ck.model.cfg["vocab_size"] == 50257
    assert ck.tokenizer.encode("Hello, I am") == [15496, 11, 314, 716]


def test_default_corpus_is_pythons_pydoc_topics():
    pytest.importorskip("pydoc_data.topics")
    text = default_corpus()
    assert len(text) > 100_000
    assert "Python" in text


def test_default_corpus_without_pydoc_data_asks_for_data(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)
    with pytest.raises(RuntimeError, match="--data"):
        default_corpus()
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    assert "--data" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ safe resume (issue 13)

def test_resume_from_an_older_step_is_refused_and_branches_with_out(data_file, tmp_path, capsys):
    run, branch = tmp_path / "run", tmp_path / "branch"
    assert train(data_file, run, "--max-steps", "4", "--checkpoint-every", "2") == 0
    before = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step_000004").iterdir()}
    older = run / "checkpoints" / "step_000002"
    capsys.readouterr()
    assert main(["train", "--resume", str(older), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "later checkpoints (step_000004)" in err and "--out NEW_DIR" in err and "Traceback" not in err
    assert main(["train", "--resume", str(older), "--out", str(branch), "--no-progress"]) == 0
    assert f"resuming {older} at step 2, branching into {branch}" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (run / "checkpoints" / "step_000004").iterdir()} == before  # untouched
    a, b = load_checkpoint(branch).model, load_checkpoint(run).model  # the branch retraced steps 3 and 4 exactly
    for name, tensor in a.state_dict().items():
        assert np.array_equal(host(tensor), host(b.state_dict()[name])), name
    assert history(branch)["step"] == history(run)["step"]


def test_resume_works_from_another_directory_with_a_relative_data_path(data_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(data_file.parent)
    assert main(["train", "--data", data_file.name, "--out", "run", *SMALL, "--max-steps", "2"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run"), "--max-steps", "3", "--no-progress"]) == 0
    assert f"data: {data_file}," in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run").trainer_state["meta"]["data"]["path"] == str(data_file)


def test_resume_refuses_changed_or_moved_data_and_continues_on_data_named_with_data(data_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(data_file, run, "--max-steps", "2") == 0
    data_file.write_text(data_file.read_text() + "and one more sentence. ", encoding="utf-8")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{data_file} has changed since the run was saved" in err and f"--data {data_file}" in err
    assert main(["train", "--resume", str(run), "--data", str(data_file), "--max-steps", "3", "--no-progress"]) == 0
    assert f"data: continuing on {data_file} instead of {data_file}" in capsys.readouterr().out
    moved = data_file.rename(tmp_path / "moved.txt")
    assert main(["train", "--resume", str(run), "--max-steps", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"the run's data {data_file} is not there any more" in err and "--data NEW" in err
    assert main(["train", "--resume", str(run), "--data", str(moved), "--max-steps", "4", "--no-progress"]) == 0
    assert load_checkpoint(run).trainer_state["meta"]["data"]["path"] == str(moved)


def test_a_deleted_optimizer_file_is_an_error_unless_reset_optimizer(data_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(data_file, run, "--max-steps", "2") == 0
    optimizer_file = resolve_checkpoint(run) / "optimizer.safetensors"
    optimizer_file.unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "3", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{optimizer_file} is missing" in err and "--reset-optimizer" in err and "Traceback" not in err
    assert main(["generate", "--checkpoint", str(run), "--prompt", "the", "--max-new-tokens", "2"]) == 0  # sampling needs no AdamW
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "3", "--reset-optimizer", "--no-progress"]) == 0
    assert "AdamW's running averages start again from zero" in capsys.readouterr().out
    assert {s["step"] for s in load_checkpoint(run).optimizer_state["state"].values()} == {1}  # restarted at step 3


def test_resume_applies_schedule_and_eval_options_and_says_so(data_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(data_file, run, "--max-steps", "2") == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "5", "--lr", "5e-4", "--eval-freq", "2", "--cosine",
                 "--warmup-steps", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for change in ("max_steps 2 -> 5", "lr 0.002 -> 0.0005", "eval_freq 3 -> 2", "cosine False -> True", "warmup_steps 0 -> 1"):
        assert f"changed on resume: {change}" in out
    config = load_checkpoint(run).trainer_state["config"]
    assert (config["lr"], config["eval_freq"], config["cosine"], config["max_steps"]) == (5e-4, 2, True, 5)
    assert history(run)["step"] == [1, 3, 5]  # evaluations every 2 steps from the resume on


def test_train_resume_refuses_a_finetuning_run_and_generate_refuses_a_classifier(data_file, tmp_path, capsys):
    from tinygpt.finetune.classify import make_classifier
    from tinygpt.checkpoint import save_checkpoint

    run = tmp_path / "run"
    assert train(data_file, run, "--max-steps", "1") == 0
    ck = load_checkpoint(run)
    make_classifier(ck.model, 2)
    save_checkpoint(tmp_path / "clf", 1, ck.model, ck.tokenizer, trainer_state={**ck.trainer_state, "meta": {
        "task": "classify", "labels": ["ham", "spam"]}})
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "clf"), "--no-progress"]) == 2
    assert "tinygpt finetune-classify --resume" in capsys.readouterr().err
    for argv in (["generate", "--checkpoint", str(tmp_path / "clf"), "--prompt", "the"],
                 ["chat", "--checkpoint", str(tmp_path / "clf"), "hi"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "is a classifier (labels ['ham', 'spam']), not a language model" in err and "tinygpt classify" in err
