"""The backward engine: order, accumulation, broadcasting, freeing, errors."""
import numpy as np
import pytest

import tinygpt as tg
from conftest import host


def test_tensor_used_twice_receives_both_gradients(device):
    x = tg.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = (x * x + x * 3.0).sum()  # dy/dx = 2x + 3
    y.backward()
    np.testing.assert_allclose(host(x.grad), [5.0, -1.0, 9.0])


def test_gradients_accumulate_across_backward_calls(device):
    x = tg.tensor([2.0, 4.0], requires_grad=True)
    (x * 3.0).sum().backward()
    (x * x).sum().backward()  # 3 + 2x
    np.testing.assert_allclose(host(x.grad), [7.0, 11.0])


def test_two_leaves_fed_by_one_add_get_independent_gradient_buffers(device):
    a = tg.tensor([1.0, 2.0], requires_grad=True)
    b = tg.tensor([3.0, 4.0], requires_grad=True)
    (a + b).sum().backward()
    (a * 5.0).sum().backward()  # accumulates into a.grad only
    np.testing.assert_allclose(host(a.grad), [6.0, 6.0])
    np.testing.assert_allclose(host(b.grad), [1.0, 1.0])


def test_broadcast_gradient_is_summed_back_to_input_shape(device):
    a = tg.tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    b = tg.tensor([[10.0], [20.0]], requires_grad=True)  # (2, 1) broadcast over columns
    c = tg.tensor([1.0, 2.0, 3.0], requires_grad=True)  # (3,) broadcast over rows
    (a * b + c).sum().backward()
    np.testing.assert_allclose(host(b.grad), [[0 + 1 + 2], [3 + 4 + 5]])
    np.testing.assert_allclose(host(c.grad), [2.0, 2.0, 2.0])
    assert b.grad.shape == (2, 1) and c.grad.shape == (3,)


def test_deep_graph_of_100k_nodes_backpropagates_without_recursion(device):
    x = tg.tensor([1.0], requires_grad=True)
    y = x
    for _ in range(100_000):
        y = y + 1.0
    y.sum().backward()
    assert host(y)[0] == 100_001.0
    assert host(x.grad)[0] == 1.0


def test_backward_without_gradient_on_non_scalar_names_the_shape(device):
    y = tg.randn(2, 3, requires_grad=True) * 2.0
    with pytest.raises(RuntimeError, match=r"\(2, 3\)"):
        y.backward()


def test_non_scalar_backward_with_gradient_argument(device):
    x = tg.tensor([1.0, 2.0, 3.0], requires_grad=True)
    (x * x).backward(tg.tensor([1.0, 0.5, -1.0]))
    np.testing.assert_allclose(host(x.grad), [2.0, 2.0, -6.0])


def test_second_backward_through_freed_graph_raises(device):
    x = tg.randn(3, requires_grad=True)
    y = (x.exp() * 2.0).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="freed"):
        y.backward()


def test_backward_into_subgraph_freed_by_another_output_raises(device):
    x = tg.randn(3, requires_grad=True)
    shared = x.exp()
    shared.sum().backward()
    with pytest.raises(RuntimeError, match="freed"):
        (shared * 2.0).sum().backward()


def test_retain_graph_allows_a_second_backward(device):
    x = tg.tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(host(x.grad), [4.0, 8.0])


def test_backward_frees_saved_arrays(device):
    x = tg.randn(4, requires_grad=True)
    y = x.exp()
    z = y.sum()
    assert y._ctx is not None and y._ctx.saved
    z.backward()
    assert y._ctx is None and z._ctx is None


def test_no_grad_builds_no_graph(device):
    x = tg.randn(3, requires_grad=True)
    with tg.no_grad():
        y = x * 2.0
    assert not y.requires_grad and y._ctx is None

    @tg.no_grad()
    def double(t):
        return t * 2.0

    assert not double(x).requires_grad
    assert (x * 2.0).requires_grad  # grad mode is back on


def test_ops_on_tensors_without_grad_record_nothing(device):
    a, b = tg.randn(3), tg.randn(3)
    c = a * b + 1.0
    assert not c.requires_grad and c._ctx is None


def test_input_that_does_not_require_grad_gets_no_gradient(device):
    w = tg.randn(3, requires_grad=True)
    x = tg.randn(3)
    (w * x).sum().backward()
    assert x.grad is None
    np.testing.assert_allclose(host(w.grad), host(x))


def test_detach_cuts_the_graph(device):
    x = tg.tensor([3.0], requires_grad=True)
    y = x * x.detach()  # d/dx = x (the detached factor is a constant)
    y.backward()
    np.testing.assert_allclose(host(x.grad), [3.0])


def test_retain_grad_keeps_an_intermediate_gradient(device):
    x = tg.tensor([1.0, 2.0], requires_grad=True)
    h = (x * 3.0).retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(host(h.grad), 2 * host(h))


def test_integer_indexing_with_repeats_scatter_adds(device):
    x = tg.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    x[[0, 2, 2, 2]].sum().backward()
    np.testing.assert_allclose(host(x.grad), [1.0, 0.0, 3.0, 0.0])


def test_max_splits_gradient_evenly_between_ties(device):
    x = tg.tensor([[1.0, 5.0, 5.0], [2.0, 0.0, 1.0]], requires_grad=True)
    x.max(axis=1).sum().backward()
    np.testing.assert_allclose(host(x.grad), [[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])


def test_requires_grad_on_integer_tensor_is_refused(device):
    with pytest.raises(TypeError, match="int"):
        tg.tensor([1, 2, 3], requires_grad=True)


def test_backward_on_tensor_without_grad_is_refused(device):
    with pytest.raises(RuntimeError, match="does not require grad"):
        tg.randn(1).backward()


def test_to_device_and_dtype_are_differentiable(device):
    x = tg.tensor([1.0, 2.0], requires_grad=True)
    y = x.to("cpu").to("float64") * 2.0
    assert y.dtype == np.float64 and y.device == "cpu"
    y.sum().backward()
    assert x.grad.device == device and x.grad.dtype == np.float32
    np.testing.assert_allclose(host(x.grad), [2.0, 2.0])


def test_a_hook_writing_into_its_gradient_changes_only_its_own_tensors_gradient(device):
    """Add hands the same gradient to both inputs; a hook that scales its argument in place
    must not scale the sibling's (it got 30 instead of 3 when the hook saw the shared buffer)."""
    x = tg.tensor([1.0, 2.0], requires_grad=True)
    c = tg.tensor([5.0, 6.0], requires_grad=True)
    x.register_hook(lambda g: g.data.__imul__(10))  # in place, returns the array: used as the new gradient
    ((x + c) * 3.0).sum().backward()
    np.testing.assert_allclose(host(c.grad), [3.0, 3.0])
    np.testing.assert_allclose(host(x.grad), [30.0, 30.0])


def test_a_hook_editing_in_place_and_returning_none_is_applied(device):
    x = tg.tensor([1.0, 2.0], requires_grad=True)
    c = tg.tensor([5.0, 6.0], requires_grad=True)
    h = x * 1.0
    h.register_hook(lambda g: g.data.__setitem__(0, 7.0))  # returns None
    (h + c).sum().backward()
    np.testing.assert_allclose(host(x.grad), [7.0, 1.0])
    np.testing.assert_allclose(host(c.grad), [1.0, 1.0])


def test_leaf_gradients_never_share_memory_with_each_other_or_the_seed(device):
    """The no-copy bookkeeping (grads.GradientSums) may let a leaf keep an array backward made,
    but never one that another leaf, the caller's seed or a retained graph still refers to."""
    a, b = tg.tensor([1.0, 2.0], requires_grad=True), tg.tensor([3.0, 4.0], requires_grad=True)
    seed = tg.tensor([1.0, 1.0])
    (a + b).backward(seed)
    a.grad.data += 100.0
    np.testing.assert_allclose(host(b.grad), [1.0, 1.0])
    np.testing.assert_allclose(host(seed), [1.0, 1.0])
    w = tg.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    h = w * 2.0
    h.retain_grad()
    (h * 1.0).sum().backward()  # Mul by a number passes dL/dh on to w's branch through new arrays
    w.grad.data += 50.0
    np.testing.assert_allclose(host(h.grad), np.ones((2, 2)))


def test_no_grad_in_one_thread_leaves_gradients_on_in_another():
    import threading

    inside, results = threading.Event(), {}

    def inference():
        with tg.no_grad():
            inside.set()
            results["other"] = tg.is_grad_enabled()
            done.wait(5)

    done = threading.Event()
    worker = threading.Thread(target=inference)
    worker.start()
    inside.wait(5)
    x = tg.tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()
    done.set()
    worker.join()
    assert results["other"] is False and tg.is_grad_enabled() and y.requires_grad
    y.backward()
    np.testing.assert_allclose(host(x.grad), [2.0, 4.0])


def test_the_graph_frees_an_intermediate_the_user_dropped_unless_an_op_saved_it():
    """The graph holds nodes, not tensors (grads.GraphNode): an array no backward needs dies
    with its tensor, as in PyTorch, while the gradient still flows through its node."""
    import weakref

    x = tg.tensor([1.0, 2.0, 3.0], requires_grad=True)
    h = x * 2.0
    dropped = weakref.ref(h.data)
    y = h + 1.0  # Add's backward needs neither input's values
    kept = y * y  # Mul's backward needs both: it saves y's array, not y
    saved = weakref.ref(y.data)
    del h, y
    assert dropped() is None
    assert saved() is not None
    kept.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * 2 * (2 * np.array([1.0, 2.0, 3.0]) + 1))  # d/dx (2x+1)^2
    assert saved() is None  # backward freed what Mul saved


def test_a_hook_on_a_dropped_intermediate_still_runs_and_its_retained_grad_is_not_kept_alive(device):
    x = tg.tensor([1.0, 2.0], requires_grad=True)
    h = x * 3.0
    seen = []
    h.register_hook(lambda g: seen.append(host(g)) or g * 10.0)
    y = (h * 1.0).sum()
    del h
    y.backward()
    np.testing.assert_allclose(seen[0], [1.0, 1.0])
    np.testing.assert_allclose(host(x.grad), [30.0, 30.0])


def test_a_leaf_whose_data_is_replaced_gets_a_node_of_the_new_shape(device):
    w = tg.tensor([1.0, 2.0], requires_grad=True)
    (w * 2.0).sum().backward()
    w.data = tg.tensor([1.0, 2.0, 3.0], device=device).data
    w.grad = None
    (w * 2.0).sum().backward()
    np.testing.assert_allclose(host(w.grad), [2.0, 2.0, 2.0])


def test_a_model_deep_copied_after_a_backward_is_a_model_of_leaves_that_trains_on_its_own():
    import copy

    from tinygpt.model import GPTModel

    tg.manual_seed(0)
    model = GPTModel({"vocab_size": 11, "context_length": 4, "emb_dim": 8, "n_heads": 2, "n_layers": 1,
                      "drop_rate": 0.0, "qkv_bias": False})
    ids = np.arange(8).reshape(2, 4) % 11
    model(ids).sum().backward()  # every parameter now has a place in a (freed) graph
    twin = copy.deepcopy(model)
    assert all(p.is_leaf and p._node is None for p in twin.parameters())
    before = [host(p.grad).copy() for p in model.parameters()]
    twin(ids).sum().backward()
    for p, g in zip(model.parameters(), before):
        np.testing.assert_array_equal(host(p.grad), g)  # the original's gradients are untouched
    for p, q in zip(model.parameters(), twin.parameters()):
        np.testing.assert_allclose(host(q.grad), 2 * host(p.grad), rtol=1e-5)  # the copy's own, added to the copied ones
