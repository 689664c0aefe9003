"""The `tinygpt` command line: gradcheck and info."""
import subprocess
import sys

import pytest

import tinygpt.functional as F
from tinygpt import kernels
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
    monkeypatch.setattr(kernels, "_mode", "plain")  # the plain op is the one patched below
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
