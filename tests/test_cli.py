"""The `tinygpt` command line: gradcheck and info."""
import subprocess
import sys

import pytest

import tinygpt.functional as F
from tinygpt import dispatch
from tinygpt.cli import main
from tinygpt.opsuite import cases


def test_gradcheck_command_prints_every_op_passing(capsys):
    assert main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    for op in cases():
        assert any(line.split()[:1] == [op] and line.rstrip().endswith("pass") for line in out.splitlines()), op
    assert f"{len(cases())} passed, 0 failed" in out


def test_gradcheck_command_runs_on_strict_backend(capsys):
    assert main(["gradcheck", "--device", "strict", "attention", "cross_entropy", "embedding"]) == 0
    assert "3 passed, 0 failed" in capsys.readouterr().out


def test_gradcheck_command_fails_with_exit_1_on_a_wrong_backward(monkeypatch, capsys):
    monkeypatch.setattr(dispatch, "_mode", "plain")  # the plain op is the one patched below
    correct = F.GELU.backward
    monkeypatch.setattr(F.GELU, "backward", staticmethod(lambda ctx, grad: correct(ctx, grad) * 1.01))
    assert main(["gradcheck", "gelu", "tanh"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1 passed, 1 failed" in out
    assert "analytic" in out and "numeric" in out  # the report names the worst element


def test_gradcheck_command_rejects_unknown_op(capsys):
    assert main(["gradcheck", "convolution"]) == 2
    assert "convolution" in capsys.readouterr().err


def test_info_prints_the_book_parameter_counts(capsys):
    assert main(["info", "--model", "gpt2-small"]) == 0
    out = capsys.readouterr().out
    assert "163,009,536" in out and "124,412,160" in out and "621.83 MB" in out
    assert "4,722,432" in out and "2,360,064" in out


@pytest.mark.parametrize("preset,total", [("gpt2-medium", "406,212,608"), ("gpt2-large", "838,220,800"), ("gpt2-xl", "1,637,792,000")])
def test_info_knows_every_preset(preset, total, capsys):
    assert main(["info", "--model", preset]) == 0
    assert total in capsys.readouterr().out


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "tinygpt.cli", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "163,009,536" in result.stdout


def test_a_bare_runtime_error_in_a_command_is_a_bug_and_keeps_its_traceback(monkeypatch, capsys):
    import tinygpt.cli as cli

    def broken(args):
        raise RuntimeError("an engine invariant broke")

    monkeypatch.setattr(cli, "_info", broken)
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an engine invariant broke" in err and "internal error" in err


def test_a_run_error_is_one_line_with_exit_status_1(monkeypatch, capsys):
    import tinygpt.cli as cli
    from tinygpt.errors import RunError

    def offline(args):
        raise RunError("could not download gpt2 (no network)")

    monkeypatch.setattr(cli, "_info", offline)
    assert main(["info"]) == 1
    assert capsys.readouterr().err == "tinygpt: error: could not download gpt2 (no network)\n"


def test_a_lora_checkpoint_loads_once_finetuning_registered_how_to_rebuild_it(tmp_path):
    """checkpoint.py imports nothing from finetune: importing tinygpt.finetune registers LoRA."""
    import tinygpt as tg
    from tinygpt.checkpoint import save_checkpoint
    from tinygpt.data import CharTokenizer
    from tinygpt.finetune import replace_linear_with_lora
    from tinygpt.model import GPTModel

    tg.manual_seed(0)
    model = GPTModel({"vocab_size": 5, "context_length": 4, "emb_dim": 4, "n_heads": 1, "n_layers": 1,
                      "drop_rate": 0.0, "qkv_bias": False})
    replace_linear_with_lora(model, rank=2, alpha=2.0)
    save_checkpoint(tmp_path / "run", 1, model, CharTokenizer.from_text("abcd"))
    load = ("from tinygpt.checkpoint import load_checkpoint; "
            f"print(sorted(k for k in load_checkpoint({str(tmp_path / 'run')!r}).model.state_dict() if '.lora.' in k))")
    alone = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=120)
    assert alone.returncode == 1
    assert "CheckpointError" in alone.stderr and "import tinygpt.finetune before loading" in alone.stderr
    registered = subprocess.run([sys.executable, "-c", "import tinygpt.finetune; " + load], capture_output=True,
                                text=True, timeout=120)
    assert registered.returncode == 0, registered.stderr
    adapters = sorted(k for k in model.state_dict() if ".lora." in k)
    assert len(adapters) == 2 * 7 and registered.stdout.strip() == str(adapters)  # A and B of 7 Linears (out_head too)
