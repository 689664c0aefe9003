"""Data parallel training (tinygpt/distributed.py, tinygpt/transport.py): collectives, the equivalence of N ranks
with one process, the NCCL path through a CPU stand-in, dead ranks and mismatched starts.

Each test launches `mpiexec -n 2` or `-n 3` running tests/distributed_worker.py and compares
what the ranks wrote with what one process computes here. Skipped only where mpi4py or
mpiexec is missing (pip install -e ".[mpi]" installs both)."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tinygpt as tg
from tinygpt import distributed

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

WORKER = str(Path(__file__).parent / "distributed_worker.py")


def find_mpiexec() -> str | None:
    """mpiexec next to this Python (the mpich wheel puts it there), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


MPIEXEC = find_mpiexec()
needs_mpi = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
                               reason="mpi4py or mpiexec not found: pip install -e \".[mpi]\" installs both")


def rank_env(**extra) -> dict:
    return {**os.environ, "TINYGPT_NUM_THREADS": "1", **extra}  # one thread per rank: N ranks share the cores


def mpiexec(n: int, *args: str, timeout: float = 60, options=(), **env) -> subprocess.CompletedProcess:
    return subprocess.run([MPIEXEC, *options, "-n", str(n), sys.executable, WORKER, *args], env=rank_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def run_ranks(n: int, *args: str) -> None:
    done = mpiexec(n, *args)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def float64():
    tg.set_default_dtype(np.float64)  # conftest restores the default afterwards


# ------------------------------------------------------------------ collectives

@needs_mpi
def test_all_reduce_sums_and_averages_over_three_ranks_across_bucket_boundaries(tmp_path):
    run_ranks(3, "collectives", str(tmp_path / "rank{rank}.npz"))
    big = distributed.BUCKET_BYTES // 8 + 3
    for r in range(3):
        got = np.load(tmp_path / f"rank{r}.npz")
        assert got["world"] == 3
        np.testing.assert_array_equal(got["sum0"], np.full((3, 4), 1.0 + 2 + 3))
        np.testing.assert_array_equal(got["sum1"], np.arange(big, dtype=np.float64) * 6)  # larger than a bucket
        np.testing.assert_array_equal(got["sum2"], np.full(5, 6))
        assert got["sum2"].dtype == np.int64 and got["sum3"].dtype == np.float32
        np.testing.assert_array_equal(got["sum3"], np.full((2, 2), 0.0 + 2 + 4, dtype=np.float32))
        np.testing.assert_array_equal(got["mean0"], np.full((3, 4), 2.0))
        np.testing.assert_allclose(got["mean1"], np.arange(big) * 2.0, rtol=1e-15)
        np.testing.assert_array_equal(got["broadcast"], np.full(7, 2.0))  # from the last rank


def test_one_process_is_a_world_of_one_where_collectives_change_nothing():
    a = np.arange(4.0)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_reduce([a], op="sum")[0] is a and np.array_equal(a, np.arange(4.0))
    assert distributed.shard((a,))[0] is not None and np.array_equal(distributed.shard((a,))[0], a)


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_naming_both_numbers(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    with pytest.raises(ValueError, match=r"--batch-size 6 \(the global batch\) is not divisible by the 4 ranks: "
                                         r"use a multiple of 4, e.g. 4 or 8"):
        distributed.check_batch_size(6)
    distributed.check_batch_size(8)


def test_resuming_on_a_rank_count_that_does_not_divide_the_batch_names_the_counts_that_do(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    with pytest.raises(ValueError, match=r"the run's global batch of 6 rows \(--batch-size, fixed when resuming\) does "
                                         r"not split over 4 ranks: resume it on a number of ranks that divides 6: 1, 2, 3, 6$"):
        distributed.check_batch_size(6, resumed=True)


def test_a_different_start_names_each_differing_setting_by_its_path_not_the_whole_config():
    """Nested run descriptions (the whole TrainConfig) differ in one leaf: name that leaf."""
    config = {f"option_{i}": i for i in range(40)}
    ours = {"config": config, "meta": {"data": {"path": "a.txt"}}}
    theirs = {"config": {**config, "option_7": 0.5}, "meta": {"data": {"path": "a.txt"}}, "extra": [1]}
    assert distributed._differences(ours, theirs) == [("config.option_7", 7, 0.5), ("extra", None, [1])]


def test_each_rank_takes_its_own_contiguous_rows(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    batch = (np.arange(6)[:, None] * np.ones(2), np.arange(6))
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        assert distributed.shard(batch)[1].tolist() == [2 * r, 2 * r + 1]
    assert [list(distributed.take_turns("abcdefg"))] == [["c", "f"]]  # rank 2 of 3: items 2 and 5


# ------------------------------------------------------------------ equivalence with one process

@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("task", ["pretrain", "classify", "instruct", "pretrain_dropout"])
def test_n_ranks_give_the_weights_of_one_process_with_the_same_global_batch(tmp_path, task, n, float64):
    # pretrain_dropout: dropout 0.3 everywhere; each rank draws its rows' part of the one
    # process's masks (backend.batch_shard), so even with dropout the weights are the same
    run_ranks(n, "steps", task, "float64", str(tmp_path / "ranks.npz"))  # every rank also checks it equals rank 0
    ranks, alone = np.load(tmp_path / "ranks.npz"), worker.train_steps(task, "float64")
    assert set(ranks.files) == set(alone)
    for name, expected in alone.items():
        assert np.abs(ranks[name] - expected).max() <= 1e-12, name
    assert np.ptp(alone["losses"]) > 0.01  # five different batches, a model that moved


def test_masked_targets_need_the_global_mean_not_a_mean_of_rank_means(float64):
    """What the weighting in forward_backward is for: with -100 masking, averaging the two
    halves' own means trains a different model than the global mean does."""
    original = worker.loss_fn

    def mean_of_halves(task, model):
        loss = original(task, model)
        return lambda batch: (loss(tuple(a[:3] for a in batch)) + loss(tuple(a[3:] for a in batch))) * 0.5

    global_mean = worker.train_steps("instruct", "float64")
    worker.loss_fn = mean_of_halves
    try:
        naive = worker.train_steps("instruct", "float64")
    finally:
        worker.loss_fn = original
    assert max(np.abs(naive[k] - global_mean[k]).max() for k in global_mean) > 1e-4


@needs_mpi
@pytest.mark.parametrize("task, n", [("pretrain", 2), ("instruct", 3)])
def test_the_nccl_path_through_a_cpu_stand_in_trains_the_same_float32_weights(tmp_path, task, n):
    run_ranks(n, "nccl-steps", task, "float32", str(tmp_path / "ranks.npz"))  # fails if the stand-in was not called
    ranks, alone = np.load(tmp_path / "ranks.npz"), worker.train_steps(task, "float32")
    for name, expected in alone.items():
        np.testing.assert_allclose(ranks[name], expected, rtol=1e-4, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------ faults and bad launches

@needs_mpi
def test_a_rank_killed_with_sigkill_ends_the_job_quickly_and_mpiexec_names_it():
    started = time.monotonic()
    done = mpiexec(2, "die", "KILL", timeout=60)
    assert time.monotonic() - started < 30 and done.returncode != 0
    assert re.search(r"PID \d+ RUNNING AT .*\n.*EXIT CODE: 9", done.stdout + done.stderr), done.stdout + done.stderr


@needs_mpi
def test_a_rank_that_stops_answering_is_named_by_the_watchdog_and_the_job_ends():
    """SIGSTOP: the process lives on, so mpiexec sees nothing wrong; the others' heartbeat
    watchdog must notice the silence, name the rank and end the job."""
    started = time.monotonic()
    done = mpiexec(2, "die", "STOP", timeout=60, TINYGPT_DIST_TIMEOUT="3")
    output = done.stdout + done.stderr
    assert time.monotonic() - started < 30 and done.returncode != 0, output
    assert re.search(r"rank 0: lost rank 1 \(pid \d+ on .+\): no heartbeat for 3 s", output), output


def two_ranks(rank0: list, rank1: list, env1: dict | None = None) -> subprocess.CompletedProcess:
    """The worker under one mpiexec with different arguments (and environment) per rank."""
    extra = [a for name, value in (env1 or {}).items() for a in ("-env", name, value)]
    return subprocess.run([MPIEXEC, "-n", "1", sys.executable, WORKER, *rank0, ":",
                           "-n", "1", *extra, sys.executable, WORKER, *rank1],
                          env=rank_env(), capture_output=True, text=True, timeout=60)


def refused_once(done: subprocess.CompletedProcess, message: str) -> None:
    """Every rank stopped with status 2, and one of them (rank 0) said why, in one line."""
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "started" not in done.stdout, output
    assert done.stderr.count("error:") == 1 and message in done.stderr, output
    assert "Traceback" not in output and "stopping every rank" not in output, output


@needs_mpi
def test_ranks_started_with_different_settings_are_refused_at_start():
    done = two_ranks(["check", "lr=0.1"], ["check", "lr=0.2"])
    refused_once(done, "tinygpt: error: rank 1 was started differently from rank 0 (lr: '0.2' on rank 1, '0.1' on rank 0)")


@needs_mpi
def test_a_rank_whose_tinygpt_device_differs_is_refused_at_start():
    done = two_ranks(["check", "lr=0.1"], ["check", "lr=0.1"], env1={"TINYGPT_DEVICE": "strict"})
    refused_once(done, "tinygpt: error: rank 1 was started differently from rank 0 (device: 'strict' on rank 1, 'cpu' on rank 0)")


@needs_mpi
def test_the_strict_backend_trains_over_mpi_through_host_copies_like_numpy(tmp_path, float64):
    # MPI reads host memory only; a device array (the strict backend stands in for CuPy) is copied over
    done = mpiexec(2, "steps", "pretrain", "float64", str(tmp_path / "ranks.npz"), TINYGPT_DEVICE="strict")
    assert done.returncode == 0, done.stdout + done.stderr
    ranks, alone = np.load(tmp_path / "ranks.npz"), worker.train_steps("pretrain", "float64")
    for name, expected in alone.items():
        assert np.abs(ranks[name] - expected).max() <= 1e-12, name


@needs_mpi
def test_ranks_running_different_tinygpt_code_are_refused_at_start():
    done = two_ranks(["check", "lr=0.1"], ["check", "lr=0.1", "fake-code"])
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "started" not in done.stdout, output
    assert re.search(r"rank 1 was started differently from rank 0 \(tinygpt code: '0123456789abcdef' on rank 1, "
                     r"'[0-9a-f]{16}' on rank 0\)", output), output


@needs_mpi
def test_identical_starts_pass_the_check():
    done = mpiexec(2, "check", "lr=0.1")
    assert done.returncode == 0 and done.stdout.count("started") == 2, done.stdout + done.stderr
