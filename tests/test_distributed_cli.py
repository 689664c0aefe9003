"""`mpiexec -n N tinygpt train ...`: the same run as one process, resume on the same and on
a different N, a rank killed mid-run, Ctrl-C during a slow save, and the refusals (a global
batch that does not split over the ranks, ranks started differently, unusable devices), each
printed once by rank 0 with exit status 2. Skipped only where mpi4py or mpiexec is missing
(pip install -e ".[mpi]")."""
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from test_distributed import MPIEXEC, WORKER, needs_mpi, rank_env

pytestmark = needs_mpi

# a tiny character-level model on the text that ships with Python; 6 rows split over 1, 2 or 3 ranks
TRAIN = ["--batch-size", "6", "--emb-dim", "32", "--n-layers", "1", "--n-heads", "2", "--context-length", "16",
         "--eval-freq", "2", "--eval-iter", "3", "--checkpoint-every", "2", "--sample-tokens", "3", "--no-progress"]


def tinygpt(n: int, *args: str, timeout: float = 90, **env) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tinygpt", *args]
    if n > 1:
        command = [MPIEXEC, "-n", str(n), *command]
    done = subprocess.run(command, env=rank_env(**env), capture_output=True, text=True, timeout=timeout)
    return done


def refused_once(done: subprocess.CompletedProcess, message: str) -> None:
    """Every rank stopped with status 2, and one of them (rank 0) said why, in one line."""
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert done.stderr.count("error:") == 1 and message in done.stderr, output
    assert "Traceback" not in output and "stopping every rank" not in output, output


def train(n: int, *args: str) -> str:
    done = tinygpt(n, "train", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def weights(run_dir, step: int) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_two_ranks_train_the_model_one_process_trains_and_only_rank_0_speaks(tmp_path):
    alone = train(1, "--out", str(tmp_path / "one"), "--max-steps", "4", *TRAIN)
    ranks = train(2, "--out", str(tmp_path / "two"), "--max-steps", "4", *TRAIN)
    assert re.search(r"data parallel over 2 ranks \(rank 0: pid \d+ on .+; rank 1: pid \d+ on .+\)", ranks)
    assert ranks.count("sample before training") == 1 and ranks.count("step      3") == 1
    assert max_difference(weights(tmp_path / "one", 4), weights(tmp_path / "two", 4)) < 1e-5  # float32 rounding
    losses = lambda out: [float(v) for v in re.findall(r"val loss (\d+\.\d+)", out)]
    assert losses(ranks) == losses(alone) and len(losses(alone)) == 2  # sharded validation, loss all-reduced
    assert not (tmp_path / "two" / ".lock").exists()


def test_a_run_of_two_ranks_resumes_bit_identically_on_two_and_within_rounding_on_three(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(2, "--out", str(straight), "--max-steps", "4", *TRAIN)
    train(2, "--out", str(stopped), "--max-steps", "2", *TRAIN)
    train(2, "--resume", str(stopped), "--max-steps", "4")
    expected = weights(straight, 4)
    assert max_difference(weights(stopped, 4), expected) == 0.0
    train(3, "--resume", str(stopped / "checkpoints" / "step_000002"), "--out", str(tmp_path / "three"), "--max-steps", "4")
    # three ranks sum the gradient in another order: the same run up to float32 rounding, not bit for bit
    assert 0.0 < max_difference(weights(tmp_path / "three", 4), expected) < 1e-5
    done = tinygpt(4, "train", "--resume", str(stopped), "--max-steps", "5")  # a batch of 6 rows: 4 ranks cannot share it
    refused_once(done, "tinygpt: error: the run's global batch of 6 rows (--batch-size, fixed when resuming) does not split over 4 ranks: "
                       "resume it on a number of ranks that divides 6: 1, 2, 3, 6")


def test_ctrl_c_under_mpiexec_lets_rank_0_finish_the_checkpoint_and_every_rank_exits_130(tmp_path):
    """A terminal's Ctrl-C reaches mpiexec, which passes it to every rank. They must agree on
    a step, rank 0 must finish saving it (made 2 s slow here, past the 0.5 s after which a
    rank that left early would end the job), and only then may any rank exit."""
    run_dir = tmp_path / "run"
    job = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, WORKER, "train", "2", "--out", str(run_dir),
                            "--max-steps", "100000", *TRAIN, "--checkpoint-every", "0"],
                           env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # its own process group, as a terminal's foreground job
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "history.json").exists() and time.monotonic() < deadline:  # training is under way
            time.sleep(0.05)
        os.killpg(job.pid, signal.SIGINT)
        output = job.communicate(timeout=60)[0]
    finally:
        job.kill()
    assert job.returncode == 130, output
    assert "rank 0 exit status 130" in output and "rank 1 exit status 130" in output, output
    step = int(re.search(r"interrupted at step (\d+): saving a checkpoint", output).group(1))
    assert f"saved step {step} in {run_dir}" in output, output
    assert (run_dir / "latest").read_text().strip() == f"checkpoints/step_{step:06d}"
    assert not list((run_dir / "checkpoints").glob(".tmp*")), output
    more = train(1, "--resume", str(run_dir), "--max-steps", str(step + 1))  # complete: loads and trains on
    assert f"resuming {run_dir / 'checkpoints' / f'step_{step:06d}'} at step {step}" in more


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused_with_both_numbers(tmp_path):
    done = tinygpt(3, "train", "--out", str(tmp_path / "run"), "--max-steps", "2", *TRAIN[2:], "--batch-size", "4")
    refused_once(done, "tinygpt: error: --batch-size 4 (the global batch) is not divisible by the 3 ranks: use a multiple of 3, e.g. 3 or 6")
    assert not (tmp_path / "run" / "latest").exists()


def test_ranks_started_with_different_options_are_refused_naming_the_option_not_the_whole_config(tmp_path):
    run = [sys.executable, "-m", "tinygpt", "train", "--out", str(tmp_path / "run"), "--max-steps", "2", *TRAIN]
    done = subprocess.run([MPIEXEC, "-n", "1", *run, "--lr", "0.1", ":", "-n", "1", *run, "--lr", "0.2"],
                          env=rank_env(), capture_output=True, text=True, timeout=90)
    refused_once(done, "tinygpt: error: rank 1 was started differently from rank 0 (config.lr: 0.2 on rank 1, 0.1 on rank 0); ")
    assert len(done.stderr) < 300, done.stderr  # one short line, no dump of the run's settings


def test_unusable_devices_are_refused_once_with_exit_status_2(tmp_path):
    run = ["train", "--out", str(tmp_path / "run"), "--max-steps", "1", *TRAIN]
    if importlib.util.find_spec("cupy") is None:
        refused_once(tinygpt(2, *run, "--device", "cuda"), "tinygpt: error: rank 0 cannot use device 'cuda': CUDA was requested but "
                                                            "CuPy is not installed")
    command = [sys.executable, "-m", "tinygpt", *run]
    done = subprocess.run([MPIEXEC, "-n", "1", *command, ":", "-n", "1", "-env", "TINYGPT_DEVICE", "strict", *command],
                          env=rank_env(), capture_output=True, text=True, timeout=90)
    refused_once(done, "tinygpt: error: rank 1 was started differently from rank 0 (device: 'strict' on rank 1, 'cpu' on rank 0")
    assert not (tmp_path / "run" / "latest").exists()


def test_a_mistake_every_rank_makes_before_training_is_printed_once_and_one_rank_s_own_does_not_hang(tmp_path):
    run = ["train", "--out", str(tmp_path / "run"), "--max-steps", "1", *TRAIN]
    # before the ranks join (argparse) and after (the model's shape): each rank finds it, rank 0 alone says it
    refused_once(tinygpt(2, *run, "--lr", "abc"), "tinygpt train: error: argument --lr: expected a number, got 'abc'")
    refused_once(tinygpt(2, *run, "--emb-dim", "33"), "tinygpt: error: --emb-dim 33 must be a multiple of --n-heads 2")
    # a mistake on rank 1 alone: rank 0 is waiting to join it; it must not wait forever
    command = [sys.executable, "-m", "tinygpt", *run]
    done = subprocess.run([MPIEXEC, "-n", "1", *command, ":", "-n", "1", *command, "--emb-dim", "33"],
                          env=rank_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("--emb-dim 33 must be a multiple of --n-heads 2") == 1, done.stderr
    assert "tinygpt: error: rank 1 ended before training started (exit status 2); stopping every rank" in done.stderr


def test_two_ranks_train_on_the_strict_backend_through_host_copies(tmp_path):
    # mpi4py reads host memory; a device array (strict stands in for CuPy without NCCL) is copied over
    train(2, "--out", str(tmp_path / "run"), "--max-steps", "1", *TRAIN, "--device", "strict")
    assert (tmp_path / "run" / "checkpoints" / "step_000001" / "model.safetensors").exists()


def test_a_rank_killed_mid_run_ends_the_job_and_leaves_the_last_whole_checkpoint_as_latest(tmp_path):
    run_dir = tmp_path / "run"
    command = [MPIEXEC, "-n", "2", sys.executable, "-m", "tinygpt", "train", "--out", str(run_dir),
               "--max-steps", "100000", *TRAIN, "--checkpoint-every", "1", "--eval-freq", "1000"]
    job = subprocess.Popen(command, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = job.stdout.readline()
        pid = int(re.search(r"rank 1: pid (\d+)", banner).group(1))
        deadline = time.monotonic() + 60
        def newest_step() -> int:  # older checkpoints are pruned as new ones land: look at all of them
            return max((int(p.name.rsplit("_", 1)[1]) for p in (run_dir / "checkpoints").glob("step_*")), default=0)

        while newest_step() < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = time.monotonic()
        subprocess.run(["kill", "-9", str(pid)])
        output = job.communicate(timeout=30)[0]
    finally:
        job.kill()
    assert job.returncode != 0 and time.monotonic() - killed < 30
    assert re.search(rf"PID {pid} RUNNING AT .+\n.*EXIT CODE: 9", output), output  # the banner maps that PID to rank 1
    latest = (run_dir / "latest").read_text().strip()
    step = int(latest.rsplit("_", 1)[1])
    assert step >= 5
    more = train(1, "--resume", str(run_dir), "--max-steps", str(step + 1))  # loads, manifest checked, and trains on
    assert f"resuming {run_dir / latest}" in more
