"""AdamW, gradient clipping and the learning-rate schedule."""
import math

import numpy as np
import pytest

import tinygpt as tg
from tinygpt.optim import AdamW, clip_grad_norm, warmup_cosine_lr
from conftest import host


def _adamw_reference(p, grads, lr, b1, b2, eps, wd):
    """AdamW written out in float64 NumPy, step by step from the paper's update."""
    p, m, v = p.astype(np.float64), np.zeros_like(p, dtype=np.float64), np.zeros_like(p, dtype=np.float64)
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


def test_adamw_matches_the_update_rule_written_out(device):
    rng = np.random.default_rng(0)
    start = rng.standard_normal((3, 4)).astype(np.float32)
    grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(10)]
    p = tg.tensor(start, requires_grad=True)
    opt = AdamW([p], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for g in grads:
        p.grad = tg.tensor(g)
        opt.step()
    expected = _adamw_reference(start, grads, 1e-2, 0.9, 0.95, 1e-8, 0.1)
    np.testing.assert_allclose(host(p), expected, rtol=1e-5, atol=1e-6)


def test_adamw_matches_torch_over_ten_steps():
    torch = pytest.importorskip("torch", reason="PyTorch not installed: parity test skipped")
    rng = np.random.default_rng(1)
    shapes = [(5, 3), (3,)]
    starts = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(10)]
    ours = [tg.tensor(s, requires_grad=True) for s in starts]
    theirs = [torch.tensor(s, requires_grad=True) for s in starts]
    opt = AdamW([{"params": [ours[0]]}, {"params": [ours[1]], "weight_decay": 0.0}], lr=4e-4, weight_decay=0.1)
    topt = torch.optim.AdamW([{"params": [theirs[0]]}, {"params": [theirs[1]], "weight_decay": 0.0}], lr=4e-4, weight_decay=0.1)
    for step_grads in grads:
        for o, t, g in zip(ours, theirs, step_grads):
            o.grad, t.grad = tg.tensor(g), torch.tensor(g)
        opt.step()
        topt.step()
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(o.numpy(), t.detach().numpy(), rtol=0, atol=1e-6)


def test_adamw_skips_parameters_without_gradient_and_zero_grad_clears(device):
    a, b = tg.tensor([1.0], requires_grad=True), tg.tensor([2.0], requires_grad=True)
    opt = AdamW([a, b], lr=0.1, weight_decay=0.0)
    a.grad = tg.tensor([1.0])
    opt.step()
    assert host(b)[0] == 2.0 and host(a)[0] != 1.0
    opt.zero_grad()
    assert a.grad is None


def test_adamw_state_dict_resumes_identically(device):
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal(4).astype(np.float32) for _ in range(6)]
    p1 = tg.tensor(np.ones(4), requires_grad=True)
    opt1 = AdamW([p1], lr=0.05)
    for g in grads:
        p1.grad = tg.tensor(g)
        opt1.step()
    p2 = tg.tensor(np.ones(4), requires_grad=True)
    opt2 = AdamW([p2], lr=0.05)
    for g in grads[:3]:
        p2.grad = tg.tensor(g)
        opt2.step()
    saved = opt2.state_dict()
    p3 = tg.tensor(p2.numpy(), requires_grad=True)
    opt3 = AdamW([p3], lr=999.0)  # hyperparameters come back from the state too
    opt3.load_state_dict(saved)
    for g in grads[3:]:
        p3.grad = tg.tensor(g)
        opt3.step()
    np.testing.assert_array_equal(host(p3), host(p1))


def test_adamw_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="betas"):
        AdamW([tg.tensor([1.0], requires_grad=True)], betas=(1.0, 0.999))


def test_clip_grad_norm_scales_to_max_norm(device):
    a, b = tg.tensor([3.0], requires_grad=True), tg.tensor([4.0], requires_grad=True)
    a.grad, b.grad = tg.tensor([3.0]), tg.tensor([4.0])  # global norm 5
    assert clip_grad_norm([a, b], 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose([host(a.grad)[0], host(b.grad)[0]], [0.6, 0.8], rtol=1e-5)
    assert clip_grad_norm([a, b], 10.0) == pytest.approx(1.0, rel=1e-5)  # below the limit: unchanged
    np.testing.assert_allclose(host(a.grad), [0.6], rtol=1e-5)


def test_warmup_cosine_schedule_endpoints():
    kwargs = dict(total_steps=100, peak_lr=1e-3, warmup_steps=10, initial_lr=1e-5, min_lr=1e-6)
    assert warmup_cosine_lr(0, **kwargs) == pytest.approx(1e-5)
    assert warmup_cosine_lr(5, **kwargs) == pytest.approx(1e-5 + 5 * (1e-3 - 1e-5) / 10)
    assert warmup_cosine_lr(10, **kwargs) == pytest.approx(1e-3)
    assert warmup_cosine_lr(55, **kwargs) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine_lr(100, **kwargs) == pytest.approx(1e-6)
    lrs = [warmup_cosine_lr(s, **kwargs) for s in range(10, 101)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))  # decays monotonically after warmup


def test_adamw_with_no_parameters_is_refused_in_one_line():
    with pytest.raises(ValueError, match="AdamW got an empty parameter list"):
        AdamW([])
    with pytest.raises(ValueError, match="empty parameter list"):
        AdamW([{"params": [], "weight_decay": 0.0}])
