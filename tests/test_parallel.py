"""The CPU fast path's machinery: blocks on threads (kernels.threads.run_blocks), split matrix
products (threads.matmul), the sort-based scatter-add of the embedding kernel, and the
autograd engine keeping fresh gradient arrays without copies. Speed is measured in
benchmarks/, never here; these tests pin that the fast paths give the same numbers as the
plain ones (tests/test_kernels.py compares every kernel with its plain op)."""
import subprocess
import sys
import threading

import numpy as np
import pytest

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.kernels import cpu, threads


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "2")
    return threads


def test_run_blocks_covers_every_row_once_on_several_threads(two_threads):
    seen, threads = np.zeros(1000, dtype=int), set()
    both_running = threading.Barrier(2, timeout=10)  # the first two blocks wait for each other

    def block(s):
        if s.start in (0, 7):
            both_running.wait()  # breaks (and fails the test) unless two threads run blocks at once
        seen[s] += 1
        threads.add(threading.get_ident())

    two_threads.run_blocks(block, 1000, 7)
    assert (seen == 1).all()
    assert len(threads) == 2  # the blocks really ran on the pool, not one after another here


def test_run_blocks_raises_what_a_block_raises(two_threads):
    def block(s):
        if s.start == 14:
            raise ValueError("bad block at 14")

    with pytest.raises(ValueError, match="bad block at 14"):
        two_threads.run_blocks(block, 30, 7)


def test_run_blocks_inside_a_block_runs_in_place_instead_of_deadlocking(two_threads):
    out = np.zeros((4, 10))

    def outer(s):
        two_threads.run_blocks(lambda t: out[s, t].__iadd__(1), 10, 3)

    two_threads.run_blocks(outer, 4, 1)
    assert (out == 1).all()


@pytest.mark.parametrize("m, k, n", [(1024, 96, 80), (3, 64, 5000), (1, 8, 9000), (17, 33, 70)])
def test_split_matmul_equals_one_product(two_threads, m, k, n):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k)), rng.standard_normal((n, k)).T  # b transposed, as Linear passes it
    np.testing.assert_allclose(two_threads.matmul(a, b), a @ b, rtol=1e-12, atol=1e-12)


def test_blas_runs_on_one_thread_only_while_blocks_run():
    """In a fresh process: BLAS's thread count is the process's, and earlier tests' threads
    (a training loop beside inference, say) must not decide what this one reads."""
    pytest.importorskip("threadpoolctl")
    code = """if True:
        import os
        os.environ["TINYGPT_NUM_THREADS"] = "2"
        import threadpoolctl
        from tinygpt.kernels import threads
        blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
        if not blas.lib_controllers:
            raise SystemExit(3)
        before = blas.lib_controllers[0].num_threads
        inside = []
        threads.run_blocks(lambda s: inside.append(blas.lib_controllers[0].num_threads), 4, 1)
        assert set(inside) == {1}, inside
        assert blas.lib_controllers[0].num_threads == before
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if done.returncode == 3:
        pytest.skip("threadpoolctl finds no BLAS library to steer")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("index", [[3, 1, 3, 0, 3], [9, 9, 0, 0, 2], [4]])
def test_embedding_scatter_add_counts_every_repeat_like_add_at(index):
    rng = np.random.default_rng(1)
    index = np.array(index)
    values = rng.standard_normal((len(index), 4))
    reference = np.zeros((10, 4))
    np.add.at(reference, index, values)
    np.testing.assert_allclose(cpu.embedding_backward(index, values, 10), reference, rtol=1e-15)


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_num_threads_refuses_what_is_not_a_positive_integer(monkeypatch, value):
    monkeypatch.setenv("TINYGPT_NUM_THREADS", value)
    with pytest.raises(ValueError, match=f"TINYGPT_NUM_THREADS must be a positive integer, got '{value}'"):
        threads.num_threads()


def test_blocked_ops_give_the_same_result_on_one_and_on_two_threads(monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 300, 1100)).astype(np.float32)
    results = []
    for threads in ("1", "2"):
        monkeypatch.setenv("TINYGPT_NUM_THREADS", threads)
        t = tg.tensor(x, requires_grad=True)
        scale, shift = tg.tensor(np.linspace(0.5, 1.5, 1100, dtype=np.float32), requires_grad=True), tg.zeros(1100, requires_grad=True)
        loss = F.cross_entropy(F.layer_norm(F.gelu(t), scale, shift).reshape(900, 1100), np.arange(900) % 1100)
        loss.backward()
        results.append((loss.item(), t.grad.numpy(), scale.grad.numpy()))
    (loss1, gx1, gs1), (loss2, gx2, gs2) = results
    assert loss1 == loss2
    np.testing.assert_array_equal(gx1, gx2)  # rows are independent: blocks change no arithmetic
    np.testing.assert_allclose(gs1, gs2, rtol=1e-5)  # the scale gradient sums blocks in another order


# ------------------------------------------------------------------ gradients kept without copies

def test_a_gradient_passed_to_two_leaves_is_not_shared_between_them():
    a, b = tg.tensor([1.0, 2.0], requires_grad=True), tg.tensor([3.0, 4.0], requires_grad=True)
    (a + b).sum().backward()  # Add hands the same array to both inputs
    assert not np.shares_memory(a.grad.data, b.grad.data)
    (a + b).sum().backward()  # accumulating into one must not change the other
    np.testing.assert_array_equal(a.grad.numpy(), [2.0, 2.0])
    np.testing.assert_array_equal(b.grad.numpy(), [2.0, 2.0])


def test_a_fresh_gradient_becomes_the_leaf_grad_without_a_copy():
    w = tg.tensor(np.ones((3, 4)), requires_grad=True)
    x = tg.tensor(np.arange(6.0).reshape(2, 3))
    (x @ w).sum().backward()
    assert w.grad.data.base is None and w.grad.data.flags.owndata
    np.testing.assert_array_equal(w.grad.numpy(), np.repeat(x.numpy().sum(0)[:, None], 4, axis=1))


def test_retained_graph_gradients_are_copied_so_a_second_backward_adds_correctly():
    w = tg.tensor(np.ones(3), requires_grad=True)
    y = (w * 2.0).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_array_equal(w.grad.numpy(), [4.0, 4.0, 4.0])

