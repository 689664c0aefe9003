"""`tinygpt train`: a small run end to end, refusing to overwrite a run, exact resume,
the three tokenizers, and the default corpus."""
import json
import re
import sys

import numpy as np
import pytest

from tinygpt.checkpoint import load_checkpoint, resolve_checkpoint
from tinygpt.cli import default_corpus, main
from tinygpt.data import BPETokenizer, CharTokenizer
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
    assert history(split) == history(straight)
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
