"""Module machinery (names, state, modes, freezing, devices) and the chapter-3 layers."""
import math

import numpy as np
import pytest
from conftest import host

import tinygpt as tg
import tinygpt.functional as F
from tinygpt import nn


class Block(nn.Module):
    """A small nested module: a Linear, a LayerNorm and a Sequential with a parameterless layer."""

    def __init__(self):
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.mlp = nn.Sequential(nn.Linear(3, 5, bias=False), nn.GELU(), nn.Linear(5, 4))

    def forward(self, x):
        return self.mlp(self.norm(self.proj(x)))


class Net(nn.Module):
    def __init__(self):
        self.emb = nn.Embedding(7, 4)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 7)

    def forward(self, ids):
        x = self.drop(self.emb(ids))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


BLOCK_NAMES = ["proj.weight", "proj.bias", "norm.scale", "norm.shift", "mlp.0.weight", "mlp.2.weight", "mlp.2.bias"]
NET_NAMES = (["emb.weight"] + [f"blocks.{i}.{n}" for i in range(2) for n in BLOCK_NAMES] + ["head.weight", "head.bias"])
IDS = np.array([[0, 3, 6], [2, 2, 5]])


def all_params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(np.array_equal(host(p), host(q)) for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()))


# ------------------------------------------------------------------ names and traversal


def test_named_parameters_follow_attribute_order_with_dotted_names_through_sequential_and_module_list(device):
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    assert names == NET_NAMES
    shapes = dict((n, p.shape) for n, p in net.named_parameters())
    assert shapes["blocks.1.mlp.0.weight"] == (5, 3)  # Linear(3, 5): (out, in)
    assert shapes["blocks.0.norm.scale"] == (3,)
    assert [p for p in net.parameters()] == [p for _, p in net.named_parameters()]


def test_sequential_and_module_list_name_children_by_position():
    seq = nn.Sequential(nn.Linear(2, 3), nn.GELU(), nn.Linear(3, 1))
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert len(seq) == 3 and isinstance(seq[1], nn.GELU) and seq[-1] is seq[2]
    modules = nn.ModuleList([nn.Linear(2, 2)])
    modules.append(nn.LayerNorm(2))
    assert len(modules) == 2
    assert [n for n, _ in modules.named_parameters()] == ["0.weight", "0.bias", "1.scale", "1.shift"]
    with pytest.raises(TypeError):
        modules(tg.zeros(1, 2))


def test_sequential_index_past_the_end_raises_index_error():
    seq = nn.Sequential(nn.Linear(2, 3), nn.GELU(), nn.Linear(3, 1))
    with pytest.raises(IndexError):
        seq[3]  # a list of 3 has no element 3; it must not wrap around to seq[0]
    with pytest.raises(IndexError):
        seq[-4]


def test_parameters_lists_a_shared_parameter_once_and_state_dict_under_each_name():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    shared = nn.Sequential(a, b)
    params = shared.parameters()
    assert len(params) == 3 and sum(p is a.weight for p in params) == 1
    assert [n for n, _ in shared.named_parameters()] == ["0.weight", "0.bias", "1.bias"]
    assert shared.num_parameters() == 9 + 3 + 3
    assert list(shared.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]


# ------------------------------------------------------------------ state_dict / load_state_dict


def test_state_dict_round_trip_into_a_fresh_module_gives_identical_outputs(device):
    tg.manual_seed(1)
    src = Net().eval()
    tg.manual_seed(2)
    dst = Net().eval()
    assert not all_params_equal(src, dst)
    dst.load_state_dict(src.state_dict())
    assert all_params_equal(src, dst)
    np.testing.assert_array_equal(host(dst(IDS)), host(src(IDS)))
    # the copy owns its memory: changing the source afterwards leaves the copy alone
    before = host(dst.head.weight)
    src.head.weight.data *= 2.0
    np.testing.assert_array_equal(host(dst.head.weight), before)


def test_load_state_dict_reports_missing_unexpected_and_misshaped_keys_in_one_key_error_and_changes_nothing(device):
    net = Net()
    before = {n: host(p) for n, p in net.named_parameters()}
    sd = {n: host(p) * 0.0 + 1.0 for n, p in net.named_parameters()}
    del sd["blocks.1.norm.shift"]
    sd["blocks.0.extra.weight"] = np.zeros(3, dtype=np.float32)
    sd["head.bias"] = np.zeros(8, dtype=np.float32)
    with pytest.raises(KeyError) as info:
        net.load_state_dict(sd)
    message = str(info.value)
    assert "missing key blocks.1.norm.shift" in message
    assert "unexpected key blocks.0.extra.weight" in message
    assert "head.bias" in message and "(7,)" in message and "(8,)" in message
    for n, p in net.named_parameters():
        np.testing.assert_array_equal(host(p), before[n], err_msg=f"{n} changed although loading failed")


def test_load_state_dict_non_strict_ignores_missing_and_unexpected_keys_but_rejects_a_shape_mismatch(device):
    net = Net()
    ones = np.ones((7, 4), dtype=np.float32)
    net.load_state_dict({"head.weight": ones, "not.a.parameter": np.zeros(2)}, strict=False)
    np.testing.assert_array_equal(host(net.head.weight), ones)
    before = host(net.head.bias)
    with pytest.raises(KeyError, match="head.bias"):
        net.load_state_dict({"head.bias": np.zeros(3, dtype=np.float32)}, strict=False)
    np.testing.assert_array_equal(host(net.head.bias), before)


def test_load_state_dict_keeps_each_parameters_device_and_dtype(device):
    net = Net()
    net.load_state_dict({n: host(p).astype(np.float64) for n, p in net.named_parameters()})
    for n, p in net.named_parameters():
        assert p.device == device and p.dtype == np.float32, n


# ------------------------------------------------------------------ modes and dropout


def test_train_and_eval_propagate_to_every_descendant():
    net = Net()
    assert all(m.training for _, m in net.named_modules())
    assert net.eval() is net
    assert not any(m.training for _, m in net.named_modules())
    net.blocks.train()
    assert net.blocks[1].mlp[1].training and not net.training and not net.drop.training
    net.train()
    assert all(m.training for _, m in net.named_modules())


def test_dropout_is_identity_in_eval_and_drops_and_rescales_in_train(device):
    p = 0.25
    drop = nn.Dropout(p)
    x = tg.tensor(np.arange(1, 4001, dtype=np.float32).reshape(40, 100))
    drop.eval()
    np.testing.assert_array_equal(host(drop(x)), host(x))
    drop.train()
    y, xs = host(drop(x)), host(x)
    zeros = y == 0
    assert 0.2 < zeros.mean() < 0.3, f"dropped fraction {zeros.mean()} is far from p={p}"
    np.testing.assert_allclose(y[~zeros], xs[~zeros] / (1 - p), rtol=1e-6)


def test_module_eval_switches_off_nested_dropout_and_train_switches_it_on(device):
    net = Net()
    net.eval()
    np.testing.assert_array_equal(host(net(IDS)), host(net(IDS)))
    net.train()
    assert not np.array_equal(host(net(IDS)), host(net(IDS)))


# ------------------------------------------------------------------ gradients: zero_grad, freezing


def test_zero_grad_clears_every_gradient(device):
    net = Net().eval()
    F.cross_entropy(net(IDS), IDS).backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_requires_grad_false_freezes_a_submodule_and_others_still_get_gradients(device):
    net = Net().eval()
    assert net.blocks[0].requires_grad_(False) is net.blocks[0]
    assert net.num_parameters(trainable_only=True) == net.num_parameters() - net.blocks[0].num_parameters()
    F.cross_entropy(net(IDS), IDS).backward()
    for name, p in net.named_parameters():
        if name.startswith("blocks.0."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    assert np.abs(host(net.emb.weight.grad)).sum() > 0  # gradient flows through the frozen block
    net.blocks[0].requires_grad_(True)
    assert all(p.requires_grad for p in net.parameters())


# ------------------------------------------------------------------ devices


def test_to_strict_moves_every_parameter_and_keeps_the_outputs():
    tg.manual_seed(0)
    net = Net().eval()
    expected = host(net(IDS))
    F.cross_entropy(net(IDS), IDS).backward()
    assert net.to("strict") is net
    for name, p in net.named_parameters():
        assert p.device == "strict", name
        assert p.grad.device == "strict", name
    np.testing.assert_allclose(host(net(IDS)), expected, rtol=1e-6, atol=1e-7)
    net.to("cpu")
    assert all(p.device == "cpu" for p in net.parameters())


# ------------------------------------------------------------------ layers


@pytest.mark.parametrize("in_features, out_features", [(3, 5), (64, 16), (768, 32)])
def test_linear_weight_is_out_by_in_and_initialised_within_one_over_sqrt_in(device, in_features, out_features):
    layer = nn.Linear(in_features, out_features)
    assert layer.weight.shape == (out_features, in_features) and layer.bias.shape == (out_features,)
    assert layer.weight.device == device and layer.weight.dtype == np.float32
    bound = 1.0 / math.sqrt(in_features)
    w, b = host(layer.weight), host(layer.bias)
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    if w.size >= 1000:  # enough draws to see the whole range and the uniform's std, bound / sqrt(3)
        assert np.abs(w).max() > 0.99 * bound
        np.testing.assert_allclose(w.std(), bound / math.sqrt(3), rtol=0.05)
    x = tg.randn(2, in_features)
    np.testing.assert_allclose(host(layer(x)), host(x) @ w.T + b, rtol=1e-5, atol=1e-6)
    assert nn.Linear(in_features, out_features, bias=False).bias is None


def test_layer_norm_has_scale_ones_and_shift_zeros_and_normalises_rows(device):
    norm = nn.LayerNorm(6)
    assert [n for n, _ in norm.named_parameters()] == ["scale", "shift"]
    np.testing.assert_array_equal(host(norm.scale), np.ones(6))
    np.testing.assert_array_equal(host(norm.shift), np.zeros(6))
    x = tg.tensor(np.random.default_rng(0).normal(3.0, 2.0, (4, 6)))
    y = host(norm(x))
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-6)
    np.testing.assert_allclose(y.var(-1), 1.0, rtol=1e-4)  # biased variance, eps 1e-5


def test_multi_head_attention_has_the_book_projections(device):
    mha = nn.MultiHeadAttention(d_in=6, d_out=8, context_length=5, dropout=0.0, num_heads=2)
    assert mha.causal is True
    assert [n for n, _ in mha.named_parameters()] == [
        "W_query.weight", "W_key.weight", "W_value.weight", "out_proj.weight", "out_proj.bias"]
    assert mha.W_query.weight.shape == (8, 6) and mha.out_proj.weight.shape == (8, 8)
    biased = nn.MultiHeadAttention(6, 8, 5, 0.0, 2, qkv_bias=True)
    assert [n for n, _ in biased.named_parameters()] == [
        "W_query.weight", "W_query.bias", "W_key.weight", "W_key.bias", "W_value.weight", "W_value.bias",
        "out_proj.weight", "out_proj.bias"]


def test_multi_head_attention_matches_a_per_head_numpy_reference(device):
    mha = nn.MultiHeadAttention(d_in=6, d_out=8, context_length=5, dropout=0.0, num_heads=2, qkv_bias=True)
    x = tg.randn(2, 4, 6)
    xs = host(x).astype(np.float64)
    w = {n: host(p).astype(np.float64) for n, p in mha.named_parameters()}
    q, k, v = (xs @ w[f"{m}.weight"].T + w[f"{m}.bias"] for m in ("W_query", "W_key", "W_value"))
    heads = []
    for h in range(2):
        cols = slice(4 * h, 4 * h + 4)
        scores = q[..., cols] @ k[..., cols].swapaxes(-1, -2) / 2.0  # sqrt(head_dim = 4)
        scores[:, np.triu(np.ones((4, 4), bool), 1)] = -np.inf
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        heads.append(weights @ v[..., cols])
    expected = np.concatenate(heads, -1) @ w["out_proj.weight"].T + w["out_proj.bias"]
    np.testing.assert_allclose(host(mha(x)), expected, rtol=1e-4, atol=1e-5)


def test_multi_head_attention_is_causal_changing_a_future_token_leaves_earlier_outputs_alone(device):
    mha = nn.MultiHeadAttention(d_in=6, d_out=6, context_length=8, dropout=0.0, num_heads=3, qkv_bias=True)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((2, 7, 6)).astype(np.float32)
    changed = xs.copy()
    changed[:, 4] += 5.0 * rng.standard_normal((2, 6)).astype(np.float32)
    before, after = host(mha(tg.tensor(xs))), host(mha(tg.tensor(changed)))
    np.testing.assert_allclose(after[:, :4], before[:, :4], rtol=1e-6, atol=1e-7)
    assert np.abs(after[:, 4:] - before[:, 4:]).max(axis=-1).min() > 1e-3  # positions 4.. do see token 4


def test_multi_head_attention_longer_than_context_raises_value_error_naming_both_lengths(device):
    mha = nn.MultiHeadAttention(d_in=4, d_out=4, context_length=3, dropout=0.0, num_heads=2)
    with pytest.raises(ValueError, match=r"5 tokens.*context_length is 3"):
        mha(tg.randn(1, 5, 4))
    assert mha(tg.randn(1, 3, 4)).shape == (1, 3, 4)


def test_multi_head_attention_rejects_d_out_not_divisible_by_num_heads():
    with pytest.raises(ValueError, match=r"10.*3"):
        nn.MultiHeadAttention(d_in=4, d_out=10, context_length=3, dropout=0.0, num_heads=3)


def test_multi_head_attention_dropout_acts_only_in_train_mode(device):
    mha = nn.MultiHeadAttention(d_in=4, d_out=4, context_length=6, dropout=0.5, num_heads=2)
    x = tg.randn(2, 6, 4)
    mha.eval()
    np.testing.assert_array_equal(host(mha(x)), host(mha(x)))
    mha.train()
    assert not np.allclose(host(mha(x)), host(mha(x)))
