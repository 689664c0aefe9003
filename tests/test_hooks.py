"""Tensor and Module hooks have PyTorch's semantics: the same model, the same hooks, the
same calls in the same order and the same gradients as torch."""
import numpy as np
import pytest

import tinygpt as tg
from tinygpt import nn

torch = pytest.importorskip("torch")


def _pair(seed=0):
    """The same Linear(3,5) -> GELU -> Linear(5,2) in tinygpt and in torch, and an input."""
    rng = np.random.default_rng(seed)
    w1, b1, w2, b2 = rng.normal(size=(5, 3)), rng.normal(size=5), rng.normal(size=(2, 5)), rng.normal(size=2)
    x = rng.normal(size=(4, 3))
    ours = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 2))
    for p, value in zip(ours.parameters(), (w1, b1, w2, b2)):
        p.data = value.astype(np.float32)
    theirs = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(5, 2))
    with torch.no_grad():
        for p, value in zip(theirs.parameters(), (w1, b1, w2, b2)):
            p.copy_(torch.tensor(value, dtype=torch.float32))
    return ours, theirs, x.astype(np.float32)


def _close(ours, theirs):
    np.testing.assert_allclose(ours.numpy() if isinstance(ours, tg.Tensor) else ours, theirs.detach().numpy(), rtol=1e-5, atol=1e-6)


def _loss_weights():
    return np.array([[1.0, -2.0]] * 4, dtype=np.float32)  # a loss whose gradient is not all ones


def test_hook_scaling_a_leaf_gradient_changes_grad_as_in_torch_and_accumulates_hooked_values():
    ours, theirs, x = _pair()
    w = _loss_weights()
    ours[0].weight.register_hook(lambda g: g * 3.0)
    theirs[0].weight.register_hook(lambda g: g * 3.0)
    for _ in range(2):  # the second backward adds a second hooked gradient to .grad
        (ours(tg.tensor(x)) * tg.tensor(w)).sum().backward()
        (theirs(torch.tensor(x)) * torch.tensor(w)).sum().backward()
        _close(ours[0].weight.grad, theirs[0].weight.grad)
    _close(ours[0].bias.grad, theirs[0].bias.grad)  # untouched by the hook
    assert not np.allclose(ours[0].weight.grad.numpy(), 0)


def test_hooks_on_an_intermediate_chain_in_order_and_change_everything_upstream_as_in_torch():
    ours, theirs, x = _pair()
    xo, xt = tg.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    ho, ht = ours[0](xo), theirs[0](xt)
    seen_ours, seen_theirs = [], []
    ho.retain_grad(), ht.retain_grad()
    for seen, h in ((seen_ours, ho), (seen_theirs, ht)):
        h.register_hook(lambda g, seen=seen: seen.append(("first", g.sum().item())) or g * 2.0)
        h.register_hook(lambda g, seen=seen: seen.append(("second", g.sum().item())) or g - 1.0)
    (ours[2](ours[1](ho)) * tg.tensor(_loss_weights())).sum().backward()
    (theirs[2](theirs[1](ht)) * torch.tensor(_loss_weights())).sum().backward()
    assert [s for s, _ in seen_ours] == [s for s, _ in seen_theirs] == ["first", "second"]
    np.testing.assert_allclose([v for _, v in seen_ours], [v for _, v in seen_theirs], rtol=1e-5)
    _close(ho.grad, ht.grad)  # retain_grad keeps the gradient after the hooks, as torch does
    _close(xo.grad, xt.grad)
    _close(ours[0].weight.grad, theirs[0].weight.grad)


def test_removed_tensor_hook_is_not_called():
    ours, _, x = _pair()
    calls = []
    handle = ours[0].weight.register_hook(lambda g: calls.append(1) or g * 10.0)
    handle.remove()
    ours(tg.tensor(x)).sum().backward()
    reference, _, _ = _pair()
    reference(tg.tensor(x)).sum().backward()
    assert calls == []
    np.testing.assert_array_equal(ours[0].weight.grad.numpy(), reference[0].weight.grad.numpy())


def test_forward_hooks_see_inputs_and_output_and_run_in_torch_order():
    ours, theirs, x = _pair()
    order_ours, order_theirs = [], []
    for (name, m), (_, t) in zip(ours.named_modules(), theirs.named_modules()):
        m.register_forward_hook(lambda mod, inp, out, name=name: order_ours.append((name, inp[0].shape, out.shape, out.numpy())))
        t.register_forward_hook(lambda mod, inp, out, name=name: order_theirs.append(
            (name, tuple(inp[0].shape), tuple(out.shape), out.detach().numpy())))
    out = ours(tg.tensor(x))
    theirs(torch.tensor(x))
    assert [o[:3] for o in order_ours] == [o[:3] for o in order_theirs]
    assert [o[0] for o in order_ours] == ["0", "1", "2", ""]
    for a, b in zip(order_ours, order_theirs):
        np.testing.assert_allclose(a[3], b[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(order_ours[-1][3], out.numpy())  # the outer hook saw the returned output


def test_forward_hook_replacing_the_output_changes_forward_and_backward_as_in_torch():
    ours, theirs, x = _pair()
    ours[1].register_forward_hook(lambda mod, inp, out: out * 0.5 + 1.0)
    theirs[1].register_forward_hook(lambda mod, inp, out: out * 0.5 + 1.0)
    xo, xt = tg.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    yo, yt = ours(xo), theirs(xt)
    _close(yo, yt)
    (yo * tg.tensor(_loss_weights())).sum().backward()
    (yt * torch.tensor(_loss_weights())).sum().backward()
    _close(xo.grad, xt.grad)
    _close(ours[0].weight.grad, theirs[0].weight.grad)


def test_removed_forward_hook_leaves_the_output_alone():
    ours, _, x = _pair()
    before = ours(tg.tensor(x)).numpy()
    handle = ours[2].register_forward_hook(lambda mod, inp, out: out * 0.0)
    assert np.all(ours(tg.tensor(x)).numpy() == 0)
    handle.remove()
    np.testing.assert_array_equal(ours(tg.tensor(x)).numpy(), before)


def _record_backward(model, log, framework):
    for name, m in model.named_modules():
        def hook(mod, grad_in, grad_out, name=name):
            def arr(g):
                return None if g is None else (g.numpy() if framework == "tg" else g.detach().numpy())
            log.append((name, [arr(g) for g in grad_in], [arr(g) for g in grad_out]))
        m.register_full_backward_hook(hook)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # torch's note on the no-grad-input case
@pytest.mark.parametrize("input_requires_grad", [True, False])
def test_full_backward_hooks_get_torchs_gradients_in_torchs_order(input_requires_grad):
    ours, theirs, x = _pair()
    log_ours, log_theirs = [], []
    _record_backward(ours, log_ours, "tg")
    _record_backward(theirs, log_theirs, "torch")
    (ours(tg.tensor(x, requires_grad=input_requires_grad)) * tg.tensor(_loss_weights())).sum().backward()
    (theirs(torch.tensor(x, requires_grad=input_requires_grad)) * torch.tensor(_loss_weights())).sum().backward()
    assert [name for name, _, _ in log_ours] == [name for name, _, _ in log_theirs]
    for (name, gi_o, go_o), (_, gi_t, go_t) in zip(log_ours, log_theirs):
        assert [g is None for g in gi_o] == [g is None for g in gi_t], name
        for a, b in zip(gi_o + go_o, gi_t + go_t):
            if b is not None:
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_full_backward_hook_replacing_grad_inputs_changes_upstream_gradients_as_in_torch():
    ours, theirs, x = _pair()
    ours[1].register_full_backward_hook(lambda mod, gi, go: (gi[0] * -2.0,))
    theirs[1].register_full_backward_hook(lambda mod, gi, go: (gi[0] * -2.0,))
    xo, xt = tg.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    (ours(xo) * tg.tensor(_loss_weights())).sum().backward()
    (theirs(xt) * torch.tensor(_loss_weights())).sum().backward()
    _close(xo.grad, xt.grad)
    _close(ours[0].weight.grad, theirs[0].weight.grad)
    _close(ours[2].weight.grad, theirs[2].weight.grad)  # downstream of the hook: unchanged, as in torch


def test_removed_full_backward_hook_is_not_called():
    ours, _, x = _pair()
    calls = []
    handle = ours[0].register_full_backward_hook(lambda mod, gi, go: calls.append(mod))
    ours(tg.tensor(x, requires_grad=True)).sum().backward()
    handle.remove()
    ours(tg.tensor(x, requires_grad=True)).sum().backward()
    assert calls == [ours[0]]


def test_backward_hook_of_a_module_whose_input_needs_no_grad_may_not_return_gradients():
    ours, _, x = _pair()
    ours[0].register_full_backward_hook(lambda mod, gi, go: (go[0],))
    with pytest.raises(RuntimeError, match="no input of the module requires grad"):
        ours(tg.tensor(x)).sum().backward()


class _Product(nn.Module):
    def forward(self, a, b):
        return a * b + a


class _TorchProduct(torch.nn.Module):
    def forward(self, a, b):
        return a * b + a


def test_full_backward_hook_of_a_two_input_module_sees_both_gradients_and_refuses_an_impossible_replacement():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32)
    seen_ours, seen_theirs = [], []
    ours, theirs = _Product(), _TorchProduct()
    ours.register_full_backward_hook(lambda m, gi, go: seen_ours.append([g.numpy() for g in gi + go]))
    theirs.register_full_backward_hook(lambda m, gi, go: seen_theirs.append([g.numpy() for g in gi + go]))
    (ours(tg.tensor(a, requires_grad=True), tg.tensor(b, requires_grad=True)) * 2.0).sum().backward()
    (theirs(torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)) * 2.0).sum().backward()
    assert len(seen_ours) == len(seen_theirs) == 1
    for x, y in zip(seen_ours[0], seen_theirs[0]):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    both = _Product()
    both.register_full_backward_hook(lambda m, gi, go: (gi[0] * 0.0, gi[1] * 0.0))
    with pytest.raises(RuntimeError, match="replacing the gradient of input"):
        both(tg.tensor(a, requires_grad=True), tg.tensor(b, requires_grad=True)).sum().backward()
