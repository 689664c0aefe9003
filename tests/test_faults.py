"""Faults a training run must survive without losing or corrupting anything: kill -9 at
random moments, a full disk, files damaged on disk, divergence to NaN, Ctrl-C, two
trainers on one directory."""
import errno
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tinygpt.checkpoint as checkpoint_module
from tinygpt.checkpoint import checkpoints, load_checkpoint
from tinygpt.cli import main
from conftest import host

SMALL = ["--emb-dim", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "16", "--batch-size", "4",
         "--eval-freq", "50", "--eval-iter", "1", "--sample-tokens", "4", "--no-progress"]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 50, encoding="utf-8")
    return path


def train(*argv):
    return main(["train", *[str(a) for a in argv], *SMALL])


def assert_every_checkpoint_loads_and_is_finite(run):
    for folder in checkpoints(run):
        ck = load_checkpoint(folder)  # verified against its manifest
        for name, tensor in ck.model.state_dict().items():
            assert np.isfinite(host(tensor)).all(), f"{folder}: {name}"
        for state in (ck.optimizer_state or {"state": {}})["state"].values():
            assert np.isfinite(state["m"]).all() and np.isfinite(state["v"]).all(), folder


def command(data, run, *extra):
    return [sys.executable, "-m", "tinygpt", "train", "--data", str(data), "--out", str(run), "--checkpoint-every", "1",
            "--epochs", "100000", *SMALL, *extra]


# ------------------------------------------------------------------ kill -9, disk full

def test_kill_9_at_random_moments_leaves_only_checkpoints_that_load_and_resume(data_file, tmp_path):
    run, rng = tmp_path / "run", random.Random(13)
    for attempt in range(4):
        resume = ["--resume", str(run)] if checkpoints(run) else []
        argv = command(data_file, run, "--max-steps", "100000", *resume)
        process = subprocess.Popen(argv if not resume else [a for a in argv if a not in ("--data", str(data_file))],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(1.5, 3.5))  # imports take about a second; then a checkpoint every step
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        assert_every_checkpoint_loads_and_is_finite(run)
    assert checkpoints(run), "no checkpoint was written in any attempt"
    reached = checkpoint_module.step_of(checkpoints(run)[-1])
    killed_holding_the_lock = (run / ".lock").exists()  # unless it died before taking it
    result = subprocess.run([sys.executable, "-m", "tinygpt", "train", "--resume", str(run), "--max-steps", str(reached + 2),
                             "--no-progress"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert ("stale lock" in result.stdout) == killed_holding_the_lock  # the killed trainer's lock, taken over
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / ".lock").exists()
    assert_every_checkpoint_loads_and_is_finite(run)


def test_a_kill_while_an_old_checkpoint_is_deleted_leaves_no_half_checkpoint_under_a_real_name(data_file, tmp_path,
                                                                                               monkeypatch):
    """Pruning deletes file by file; a kill in the middle (here: an exception after the first
    file) must leave only whole checkpoints under step_* names, and the next start cleans up."""
    run = tmp_path / "run"
    real_rmtree = checkpoint_module.shutil.rmtree

    class Killed(BaseException):
        pass

    def killed_after_one_file(path, ignore_errors=False):
        os.remove(os.path.join(path, sorted(os.listdir(path))[0]))
        raise Killed  # the process dies here

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed_after_one_file)
    with pytest.raises(Killed):
        train_through_the_library(data_file, run)
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", real_rmtree)
    assert_every_checkpoint_loads_and_is_finite(run)
    assert list((run / "checkpoints").glob(".tmp-*-deleting"))  # the half-deleted one, out of the way
    assert train("--resume", run, "--max-steps", "5") == 0
    assert not list((run / "checkpoints").glob(".tmp-*"))


def train_through_the_library(data_file, run):
    """Train with checkpoints every step straight through the library (no CLI error handling),
    so that the exception from the patched deletion reaches the test."""
    from tinygpt.train_cli import run_train
    from tinygpt.cli import build_parser

    args = build_parser().parse_args(["train", "--data", str(data_file), "--out", str(run), "--max-steps", "4",
                                      "--checkpoint-every", "1", *SMALL])
    run_train(args)


def test_a_full_disk_during_a_checkpoint_is_one_error_and_the_previous_checkpoint_stays(data_file, tmp_path, capsys,
                                                                                      monkeypatch):
    run = tmp_path / "run"
    real_save_file, calls = checkpoint_module.save_file, []

    def full_from_the_third_write(tensors, filename):
        calls.append(filename)
        if len(calls) >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save_file(tensors, filename)

    monkeypatch.setattr(checkpoint_module, "save_file", full_from_the_third_write)
    assert train("--data", data_file, "--out", run, "--max-steps", "6", "--checkpoint-every", "2") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No space left on device" in err
    assert f"could not write checkpoint {run / 'checkpoints' / 'step_000004'}" in err
    assert f"the previous checkpoint {run / 'checkpoints' / 'step_000002'} is intact" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]  # no temporary folder left
    assert_every_checkpoint_loads_and_is_finite(run)


# ------------------------------------------------------------------ damaged files

@pytest.fixture
def two_checkpoints(data_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--data", data_file, "--out", run, "--max-steps", "4", "--checkpoint-every", "2") == 0
    capsys.readouterr()
    return run, run / "checkpoints" / "step_000002", run / "checkpoints" / "step_000004"


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte in the weights": ("model.safetensors", flip_a_byte, "does not match its sha256"),
    "truncated weights": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100]), "has 100 bytes but the manifest says"),
    "empty weights": ("model.safetensors", lambda p: p.write_bytes(b""), "has 0 bytes"),
    "deleted config": ("config.json", lambda p: p.unlink(), "config.json is missing"),
    "malformed trainer state": ("trainer_state.json", lambda p: p.write_text("{not json"), "trainer_state.json has"),
    "config edited to another shape": ("config.json", lambda p: p.write_text(p.read_text().replace('"emb_dim": 16', '"emb_dim": 32')),
                                       "does not match its sha256"),
    "garbage manifest": ("manifest.json", lambda p: p.write_text("[]"), "manifest.json is unreadable"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_damaged_checkpoint_file_is_named_and_the_newest_intact_one_offered(two_checkpoints, name, capsys):
    run, older, newer = two_checkpoints
    file, damage, problem = DAMAGE[name]
    damage(newer / file)
    for argv in (["generate", "--checkpoint", str(run), "--prompt", "the"], ["train", "--resume", str(run), "--no-progress"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and problem in err and str(newer) in err, err
        assert f"the newest intact checkpoint of this run is {older}" in err
    assert main(["generate", "--checkpoint", str(older), "--prompt", "the", "--max-new-tokens", "3"]) == 0


def test_a_checkpoint_from_before_manifests_with_broken_json_names_the_file(two_checkpoints, capsys):
    run, older, newer = two_checkpoints
    (newer / "manifest.json").unlink()
    (newer / "config.json").write_text("{")
    assert main(["generate", "--checkpoint", str(newer), "--prompt", "the"]) == 1
    err = capsys.readouterr().err
    assert "config.json is unreadable" in err and "no manifest" in err and "Traceback" not in err


def test_nan_weights_are_never_written_and_the_error_names_the_last_good_checkpoint(data_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--data", data_file, "--out", run, "--max-steps", "40", "--checkpoint-every", "1", "--lr", "1e6") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("loss is nan" in err or "holds non-finite values" in err), err
    assert f"the last good checkpoint is {checkpoints(run)[-1]}" in err and "--lr" in err
    assert_every_checkpoint_loads_and_is_finite(run)


def test_a_diverged_run_resumes_from_its_last_good_checkpoint_with_a_lower_lr(data_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--data", data_file, "--out", run, "--max-steps", "4", "--checkpoint-every", "2") == 0
    code = main(["train", "--resume", str(run), "--lr", "1e6", "--max-steps", "40", "--checkpoint-every", "100", "--no-progress"])
    assert code == 1
    out, err = capsys.readouterr()
    assert "changed on resume: lr 0.002 -> 1000000.0" in out
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step_000004'}" in err, err
    assert main(["train", "--resume", str(run), "--lr", "1e-3", "--max-steps", "7", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "step_000004 at step 4" in out and "changed on resume: lr 0.002 -> 0.001" in out
    ck = load_checkpoint(run)
    assert ck.trainer_state["step"] == 7 and ck.trainer_state["config"]["lr"] == 1e-3
    assert_every_checkpoint_loads_and_is_finite(run)


# ------------------------------------------------------------------ Ctrl-C and two trainers

def wait_for_a_checkpoint(run, process, timeout=60):
    deadline = time.monotonic() + timeout
    while not checkpoints(run):
        assert process.poll() is None and time.monotonic() < deadline, "the trainer never wrote a checkpoint"
        time.sleep(0.05)


def test_ctrl_c_saves_and_exits_130_and_a_second_ctrl_c_exits_quietly(data_file, tmp_path):
    for presses, run in ((1, tmp_path / "once"), (2, tmp_path / "twice")):
        process = subprocess.Popen(command(data_file, run, "--max-steps", "100000"), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        wait_for_a_checkpoint(run, process)
        for _ in range(presses):
            process.send_signal(signal.SIGINT)
            time.sleep(0.001)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 130, err
        assert "Traceback" not in err
        if presses == 1:
            assert "interrupted at step" in out and f"continue with: tinygpt train --resume {run}" in out
        assert_every_checkpoint_loads_and_is_finite(run)
        assert not (run / ".lock").exists()


def test_a_second_trainer_on_a_live_run_directory_is_refused(data_file, tmp_path, capsys):
    run = tmp_path / "run"
    process = subprocess.Popen(command(data_file, run, "--max-steps", "100000"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_a_checkpoint(run, process)
        assert main(["train", "--resume", str(run), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert f"is in use by process {process.pid}" in err and "Traceback" not in err
    finally:
        process.kill()
        process.wait()


def test_a_stale_lock_and_temporary_folders_of_a_dead_trainer_are_cleaned(data_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--data", data_file, "--out", run, "--max-steps", "2") == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    (run / ".lock").write_text(f"{dead.strip()} {os.uname().nodename}\n")
    (run / "checkpoints" / ".tmp-step_000003-abc").mkdir()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"taking over the stale lock {run / '.lock'} (process {dead.strip()} is gone)" in out
    assert "removed 1 temporary file(s)" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
