"""Bad command lines and environments, as a new user types them: each gives one clear
message naming the option (or variable) and the value, the right exit status (2: a
mistake in the command or environment, 1: the run failed), and never a traceback."""
import pytest

from tinygpt import backend
from tinygpt.cli import main

SMALL = ["--emb-dim", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "16", "--batch-size", "4",
         "--eval-freq", "10", "--eval-iter", "1", "--sample-tokens", "4", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A text file, a trained run (2 steps) and a folder, shared by the table below."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data = root / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 50, encoding="utf-8")
    run = root / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--max-steps", "2", *SMALL]) == 0
    csv = root / "two-rows.csv"
    csv.write_text("Text,Label\nhello,ham\nwin,spam\n", encoding="utf-8")
    return {"data": str(data), "run": str(run), "dir": str(root), "missing": str(root / "no-such-file"), "csv": str(csv)}


T = ["train", "--data", "{data}", "--out", "{dir}/new", *SMALL]  # a new run, to which one bad option is added
G = ["generate", "--checkpoint", "{run}", "--prompt", "the"]
R = ["train", "--resume", "{run}", "--no-progress"]

BAD = [  # (command line, environment, exit status, what the message must name)
    (T + ["--grad-clip", "-1"], {}, 2, ["--grad-clip", "-1", "> 0"]),
    (T + ["--grad-clip", "0"], {}, 2, ["--grad-clip", "0"]),
    (T + ["--lr", "nan"], {}, 2, ["--lr", "nan", "finite"]),
    (T + ["--lr", "0"], {}, 2, ["--lr", "0", "> 0"]),
    (T + ["--lr", "-1e-3"], {}, 2, ["--lr", "-1e-3"]),
    (T + ["--lr", "fast"], {}, 2, ["--lr", "'fast'"]),
    (T + ["--stride", "0"], {}, 2, ["--stride", "0", ">= 1"]),
    (T + ["--max-steps", "-1"], {}, 2, ["--max-steps", "-1"]),
    (T + ["--warmup-steps", "-5"], {}, 2, ["--warmup-steps", "-5"]),
    (T + ["--eval-iter", "0"], {}, 2, ["--eval-iter", "0"]),
    (T + ["--eval-freq", "0"], {}, 2, ["--eval-freq", "0"]),
    (T + ["--emb-dim", "0"], {}, 2, ["--emb-dim", "0"]),
    (T + ["--n-heads", "0"], {}, 2, ["--n-heads", "0"]),
    (T + ["--n-layers", "-2"], {}, 2, ["--n-layers", "-2"]),
    (T + ["--context-length", "0"], {}, 2, ["--context-length", "0"]),
    (T + ["--batch-size", "0"], {}, 2, ["--batch-size", "0"]),
    (T + ["--epochs", "0"], {}, 2, ["--epochs", "0"]),
    (T + ["--dropout", "1"], {}, 2, ["--dropout", "1", "< 1"]),
    (T + ["--dropout", "-0.1"], {}, 2, ["--dropout", "-0.1"]),
    (T + ["--weight-decay", "-1"], {}, 2, ["--weight-decay", "-1"]),
    (T + ["--sample-temperature", "-1"], {}, 2, ["--sample-temperature", "-1"]),
    (T + ["--sample-tokens", "-3"], {}, 2, ["--sample-tokens", "-3"]),
    (T + ["--checkpoint-every", "-1"], {}, 2, ["--checkpoint-every", "-1"]),
    (T + ["--seed", "-1"], {}, 2, ["--seed", "-1"]),
    (T + ["--seed", "1.5"], {}, 2, ["--seed", "'1.5'"]),
    (T + ["--emb-dim", "30", "--n-heads", "4"], {}, 2, ["--emb-dim 30", "--n-heads 4", "multiple"]),
    (T + ["--tokenizer", "words"], {}, 2, ["--tokenizer", "'words'"]),
    (T + ["--tokenizer", "bpe", "--vocab-size", "100"], {}, 2, ["--vocab-size", "100", ">= 257"]),
    (T + ["--vocab-size", "500"], {}, 2, ["--vocab-size 500", "--tokenizer bpe"]),
    (T + ["--device", "tpu"], {}, 2, ["--device", "'tpu'"]),
    (T + ["--context-length", "4096"], {}, 2, ["too short", "--context-length"]),
    (T + ["--reset-optimizer"], {}, 2, ["--reset-optimizer", "--resume"]),
    (T + ["--lr", "-inf"], {}, 2, ["--lr", "-inf"]),
    (T + ["--start-context", ""], {}, 2, ["--start-context", "empty"]),
    (["train", "--data", "{data}", "--out", "{data}", *SMALL], {}, 2, ["--out {data}", "is a file"]),
    (R + ["--max-steps", "1"], {}, 2, ["complete at step 2", "--max-steps"]),
    (["finetune-classify", "--data", "{csv}", "--init", "{run}", "--out", "{dir}/clf", "--no-progress"], {}, 2,
     ["training split of {csv} has 1 texts", "--batch-size 8"]),
    (T + ["--bpe-file", "{missing}"], {}, 2, ["--bpe-file", "{missing}"]),
    (["train", "--data", "{missing}", *SMALL], {}, 2, ["--data", "{missing}", "no such file"]),
    (["train", "--data", "{dir}", *SMALL], {}, 2, ["--data", "{dir}", "folder"]),
    (["train", "--data", "{data}", "--out", "{run}", *SMALL], {}, 2, ["{run}", "already holds", "--resume"]),
    (["train", "--resume", "{missing}"], {}, 2, ["--resume", "{missing}"]),
    (R + ["--emb-dim", "32"], {}, 2, ["--emb-dim 32", "the run has 16", "cannot change"]),
    (R + ["--batch-size", "8", "--n-heads", "4"], {}, 2, ["--batch-size 8", "--n-heads 4", "the run has 4"]),
    (R + ["--tokenizer", "bpe"], {}, 2, ["--tokenizer bpe", "the run has char"]),
    (R + ["--model", "gpt2-small"], {}, 2, ["--model gpt2-small"]),
    (R + ["--lr", "inf"], {}, 2, ["--lr", "inf"]),
    (G + ["--max-new-tokens", "-1"], {}, 2, ["--max-new-tokens", "-1"]),
    (G + ["--temperature", "-0.5"], {}, 2, ["--temperature", "-0.5"]),
    (G + ["--temperature", "nan"], {}, 2, ["--temperature", "nan"]),
    (G + ["--top-k", "0"], {}, 2, ["--top-k", "0"]),
    (G + ["--top-k", "5000"], {}, 2, ["--top-k", "5000", "vocabulary size"]),
    (G + ["--top-p", "0"], {}, 2, ["--top-p", "0"]),
    (G + ["--top-p", "1.5"], {}, 2, ["--top-p", "1.5"]),
    (["generate", "--checkpoint", "{run}", "--prompt", ""], {}, 2, ["--prompt", "empty"]),
    (["generate", "--checkpoint", "{missing}", "--prompt", "x"], {}, 2, ["--checkpoint", "{missing}"]),
    (["generate", "--checkpoint", "{dir}", "--prompt", "x"], {}, 1, ["no checkpoint in {dir}"]),
    (["generate", "--prompt", "x"], {}, 2, ["--model", "--checkpoint"]),
    (["gradcheck", "--eps", "0"], {}, 2, ["--eps", "0", ">= 1e-10"]),
    (["gradcheck", "--eps", "1e-300"], {}, 2, ["--eps", "1e-300", ">= 1e-10"]),
    (["gradcheck", "--eps", "0.5"], {}, 2, ["--eps", "0.5", "<= 0.1"]),
    (["gradcheck", "--eps", "-1"], {}, 2, ["--eps", "-1"]),
    (["gradcheck", "--eps", "inf"], {}, 2, ["--eps", "inf"]),
    (["gradcheck", "--atol", "-1"], {}, 2, ["--atol", "-1"]),
    (["gradcheck", "--rtol", "nan"], {}, 2, ["--rtol", "nan"]),
    (["gradcheck", "--dtype", "float32"], {}, 2, ["--dtype"]),
    (["gradcheck", "convolution"], {}, 2, ["convolution", "choose from"]),
    (["info", "--model", "gpt5"], {}, 2, ["--model", "'gpt5'"]),
    (["trian"], {}, 2, ["'trian'", "choose from"]),
    ([], {}, 2, ["command"]),
    (["info"], {"TINYGPT_DEVICE": "bogus"}, 2, ["TINYGPT_DEVICE", "'bogus'", "cpu, cuda, strict"]),
    (["info"], {"TINYGPT_NUM_THREADS": "0"}, 2, ["TINYGPT_NUM_THREADS", "'0'", "positive integer"]),
    (["info"], {"TINYGPT_NUM_THREADS": "two"}, 2, ["TINYGPT_NUM_THREADS", "'two'"]),
    (["info"], {"TINYGPT_KERNELS": "turbo"}, 2, ["TINYGPT_KERNELS", "turbo"]),
    (["info"], {"TINYGPT_BPE_FILE": "{missing}"}, 2, ["TINYGPT_BPE_FILE", "{missing}"]),
    (["finetune-classify", "--data", "{data}", "--lora-rank", "0"], {}, 2, ["--lora-rank", "0"]),
    (["finetune-classify", "--data", "{data}", "--train-frac", "1"], {}, 2, ["--train-frac", "1", "< 1"]),
    (["finetune-classify", "--data", "{data}", "--lr", "-1"], {}, 2, ["--lr", "-1"]),
    (["finetune-instruct", "--data", "{data}", "--max-length", "0"], {}, 2, ["--max-length", "0"]),
    (["finetune-instruct", "--resume", "{run}", "--no-progress"], {}, 2, ["not a instruct run", "tinygpt train --resume"]),
    (["classify", "--checkpoint", "{run}", "some text"], {}, 2, ["not a classifier", "tinygpt generate"]),
    (["chat", "--checkpoint", "{run}", "--top-k", "0", "hi"], {}, 2, ["--top-k", "0"]),
    (["chat", "--checkpoint", "{run}", "--temperature", "-1", "hi"], {}, 2, ["--temperature", "-1"]),
]


def fill(items, files):
    return [item.format(**files) for item in items]


@pytest.mark.parametrize("argv, env, code, names", BAD, ids=[" ".join(a[:1] + a[-2:]) + (f" {e}" if e else "") for a, e, _, _ in BAD])
def test_a_bad_command_line_gets_one_clear_message_and_the_right_exit_status(files, argv, env, code, names, capsys,
                                                                             monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(**files))
    assert main(fill(argv, files)) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("tinygpt") and err.count("error:") == 1, err
    for name in fill(names, files):
        assert name in err, f"{name!r} not in {err!r}"


def test_cuda_from_the_environment_fails_clearly_without_a_gpu(capsys, monkeypatch):
    ok, _ = backend.cuda_available()
    if ok:
        pytest.skip("a GPU is present")
    monkeypatch.setenv("TINYGPT_DEVICE", "cuda")
    assert main(["gradcheck", "gelu"]) == 2  # the README's own command must not run on the CPU and pass
    err = capsys.readouterr().err
    assert "TINYGPT_DEVICE=cuda" in err and "Traceback" not in err
    assert main(["gradcheck", "--device", "cuda", "gelu"]) == 2
    assert "--device cuda" in capsys.readouterr().err


def test_the_device_comes_from_the_environment_when_no_option_names_one(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TINYGPT_DEVICE", "strict")
    run = tmp_path / "strict-run"
    assert main(["train", "--data", files["data"], "--out", str(run), "--max-steps", "1", *SMALL]) == 0
    assert "on strict;" in capsys.readouterr().out
    assert main(["train", "--data", files["data"], "--out", str(tmp_path / "cpu-run"), "--max-steps", "1", "--device", "cpu",
                 *SMALL]) == 0
    assert "on cpu;" in capsys.readouterr().out  # the option wins over the environment


def test_debug_shows_the_traceback_of_an_error(files, capsys):
    argv = ["generate", "--checkpoint", files["dir"], "--prompt", "x"]
    assert main(argv + ["--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and f"no checkpoint in {files['dir']}" in err


def test_an_internal_error_keeps_its_traceback_and_asks_to_be_reported(files, capsys, monkeypatch):
    import tinygpt.generate

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand")  # a bug, not a user's mistake

    monkeypatch.setattr(tinygpt.generate, "generate", broken)
    assert main(["generate", "--checkpoint", files["run"], "--prompt", "the"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "TypeError: unsupported operand" in err and "please report it" in err


def test_python_dash_m_tinygpt_runs_the_command_line():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "tinygpt", "gradcheck", "--eps", "-1"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "--eps: must be >= 1e-10, got -1" in result.stderr and "Traceback" not in result.stderr
