"""`tinygpt train --arch llama`: a run on the default text, its checkpoint resumed and sampled,
and the options that do not fit a Llama model refused in one line."""
from __future__ import annotations

import pytest

from tinygpt.cli import main

SMALL = ["--arch", "llama", "--emb-dim", "32", "--n-layers", "1", "--n-heads", "4", "--n-kv-heads", "1",
         "--context-length", "16", "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "1", "--sample-tokens", "5",
         "--no-progress"]


def test_train_resume_and_generate_a_llama_model(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", *SMALL, "--max-steps", "4", "--out", out]) == 0
    text = capsys.readouterr().out
    from tinygpt.checkpoint import load_checkpoint
    from tinygpt.llama import LlamaModel

    model = load_checkpoint(out).model
    assert isinstance(model, LlamaModel) and model.cfg["n_kv_heads"] == 1 and model.cfg["hidden_dim"] == 88
    assert f"model: {model.num_parameters():,} parameters" in text
    assert main(["train", "--resume", out, "--max-steps", "6", "--no-progress"]) == 0
    assert "step_000006" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", out, "--prompt", "The ", "--max-new-tokens", "5"]) == 0


@pytest.mark.parametrize("options, message", [
    (["--arch", "gpt", "--model", "smollm2-135m"], "--model smollm2-135m and --arch gpt do not go together"),
    (["--arch", "llama", "--n-kv-heads", "3"], "n_kv_heads=3 does not divide n_heads=4"),
    (["--n-kv-heads", "2"], "--n-kv-heads applies only to --arch llama"),
    (["--arch", "llama", "--dropout", "0.1"], "drop_rate=0.1 is not supported"),
    (["--arch", "llama", "--qkv-bias"], "qkv_bias=True is not supported"),
])
def test_options_that_do_not_fit_a_llama_model_are_one_line(tmp_path, capsys, options, message):
    assert main(["train", *options, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
