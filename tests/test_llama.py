"""The Llama family's ops and LlamaModel on tinygpt's own: values of rms_norm, rope, silu and
grouped-query attention worked out by hand, and the model's shapes, parameter counts, KV
cache and training. (The ops' gradient checks and torch parity run from their cases in
tinygpt/opsuite_llama.py, in test_ops_gradcheck.py, test_torch_parity_ops.py and test_kernels.py.)"""
from __future__ import annotations

import math

import numpy as np
import pytest

import tinygpt as tg
import tinygpt.functional as F
from tinygpt import optim
from tinygpt.llama import LLAMA_PRESETS, LlamaModel, cache_bytes, count_parameters, full_config
from conftest import host

TINY = {"vocab_size": 37, "context_length": 16, "emb_dim": 12, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
        "hidden_dim": 20, "head_dim": 4, "qk_norm": True, "tie_weights": False}


# --- values by hand ---------------------------------------------------------------------------

def test_rms_norm_divides_by_the_root_mean_square_then_weights():
    x = tg.tensor([[3.0, 4.0], [1.0, -1.0]], dtype=np.float64)
    w = tg.tensor([2.0, 0.5], dtype=np.float64)
    expected = [[3 / math.sqrt(12.5 + 1e-6) * 2, 4 / math.sqrt(12.5 + 1e-6) * 0.5],
                [1 / math.sqrt(1 + 1e-6) * 2, -1 / math.sqrt(1 + 1e-6) * 0.5]]
    np.testing.assert_allclose(F.rms_norm(x, w).numpy(), expected, rtol=1e-15)
    np.testing.assert_allclose(F.rms_norm(x, w, offset=True).numpy(),
                               np.array(expected) / [2, 0.5] * [3, 1.5], rtol=1e-15)  # weight 1 + w


def test_rope_turns_each_pair_by_position_times_frequency():
    """D = 4: pairs (x0, x2) and (x1, x3), frequencies 1 and theta^(-1/2) = 0.01 (theta 1e4)."""
    x = tg.tensor(np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4), dtype=np.float64)
    y = F.rope(x, np.array([5])).numpy().reshape(4)
    a0, a1 = 5 * 1.0, 5 * 0.01
    expected = [1 * math.cos(a0) - 3 * math.sin(a0), 2 * math.cos(a1) - 4 * math.sin(a1),
                3 * math.cos(a0) + 1 * math.sin(a0), 4 * math.cos(a1) + 2 * math.sin(a1)]
    np.testing.assert_allclose(y, expected, rtol=1e-14)


def test_rope_backward_is_the_inverse_rotation():
    """For L = <rope(x), g> the gradient is R^T g; with g = rope(x) that is R^T R x = x."""
    tg.set_default_dtype(np.float64)
    x = tg.tensor(np.random.default_rng(0).standard_normal((2, 3, 5, 6)), requires_grad=True)
    y = F.rope(x, np.arange(7, 12))
    y.backward(y.numpy())
    np.testing.assert_allclose(x.grad.numpy(), x.numpy(), atol=1e-14)
    np.testing.assert_allclose(np.linalg.norm(y.numpy(), axis=-1), np.linalg.norm(x.numpy(), axis=-1), rtol=1e-14)


def test_rope_scores_depend_only_on_the_distance_between_positions():
    tg.set_default_dtype(np.float64)
    rng = np.random.default_rng(1)
    q, k = (tg.tensor(rng.standard_normal((1, 1, 1, 8))) for _ in range(2))
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}

    def score(p, s):
        return float((F.rope(q, [p], scaling=scaling).numpy() * F.rope(k, [p + s], scaling=scaling).numpy()).sum())
    assert score(0, 3) == pytest.approx(score(40, 3), abs=1e-12)
    assert score(0, 3) != pytest.approx(score(0, 4), abs=1e-3)


def test_llama3_scaling_keeps_fast_frequencies_and_divides_slow_ones_by_the_factor():
    from tinygpt.functional.rope import rope_frequencies

    plain = rope_frequencies(np, 64, 500000.0, None, np.float64)
    scaled = rope_frequencies(np, 64, 500000.0, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                              np.float64)
    wavelength = 2 * np.pi / plain
    fast, slow = wavelength < 8192 / 4, wavelength > 8192 / 1
    assert fast.sum() > 3 and slow.sum() > 3 and (~fast & ~slow).sum() > 0
    np.testing.assert_array_equal(scaled[fast], plain[fast])
    np.testing.assert_allclose(scaled[slow], plain[slow] / 32, rtol=1e-15)
    medium = ~fast & ~slow
    assert np.all((plain[medium] / 32 < scaled[medium]) & (scaled[medium] < plain[medium]))


def test_rope_with_a_cache_offset_equals_the_tail_of_the_whole_sequence():
    x = tg.tensor(np.random.default_rng(2).standard_normal((1, 2, 9, 4)))
    whole = F.rope(x, np.arange(9)).numpy()
    tail = F.rope(tg.tensor(x.numpy()[:, :, 6:]), np.arange(6, 9)).numpy()
    np.testing.assert_allclose(tail, whole[:, :, 6:], rtol=1e-6)
    rows = F.rope(tg.tensor(np.concatenate([x.numpy()[:, :, 6:]] * 2)), np.array([[6, 7, 8], [0, 1, 2]])).numpy()
    np.testing.assert_allclose(rows[0], whole[0, :, 6:], rtol=1e-6)
    np.testing.assert_allclose(rows[1], F.rope(tg.tensor(x.numpy()[:, :, 6:]), np.arange(3)).numpy()[0], rtol=1e-6)


def test_silu_is_finite_with_the_right_limits_at_the_extremes():
    x = tg.tensor([-1000.0, -30.0, 0.0, 30.0, 1000.0], requires_grad=True)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # exp(-1000) underflowing to 0 is right
        y = F.silu(x)
        y.sum().backward()
    np.testing.assert_allclose(y.numpy(), [0.0, -30 / (1 + math.exp(30)), 0.0, 30.0, 1000.0], rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(x.grad.numpy(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-10)


def test_repeat_heads_shares_each_kv_head_with_its_group_and_sums_their_gradients():
    x = tg.tensor(np.arange(2.0).reshape(1, 2, 1, 1), requires_grad=True)  # kv heads 0 and 1
    y = F.repeat_heads(x, 3)
    assert y.numpy().reshape(-1).tolist() == [0, 0, 0, 1, 1, 1]  # query heads 0-2 read kv head 0
    y.backward(np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0]).reshape(1, 6, 1, 1))
    assert x.grad.numpy().reshape(-1).tolist() == [6.0, 60.0]


def test_gqa_attention_equals_attention_with_each_kv_head_copied(device):
    rng = np.random.default_rng(3)
    q, k, v = (tg.tensor(rng.standard_normal(s)) for s in ((2, 6, 5, 3), (2, 2, 5, 3), (2, 2, 5, 3)))
    copied = [tg.tensor(np.repeat(host(a), 3, axis=1)) for a in (k, v)]
    np.testing.assert_allclose(host(F.scaled_dot_product_attention(q, k, v)),
                               host(F.scaled_dot_product_attention(q, *copied)), rtol=1e-6)


def test_the_tiled_attention_takes_grouped_kv_heads_too():
    from tinygpt.functional.flash_attention import flash_attention

    rng = np.random.default_rng(8)
    q, k, v = (tg.tensor(rng.standard_normal(s), requires_grad=True) for s in ((1, 4, 5, 3), (1, 2, 5, 3), (1, 2, 5, 2)))
    np.testing.assert_allclose(flash_attention(q, k, v, block_size=2).numpy(),
                               F.scaled_dot_product_attention(q, k, v).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q_shape, k_shape", [((1, 4, 3, 2), (1, 3, 3, 2)), ((1, 4, 3, 2), (2, 2, 3, 2))])
def test_kv_heads_that_do_not_divide_the_query_heads_are_refused_in_one_line(q_shape, k_shape):
    q, k = tg.zeros(*q_shape), tg.zeros(*k_shape)
    with pytest.raises(ValueError, match=r"^attention: q \(1, 4, 3, 2\), k .* H_kv dividing H$"):
        F.scaled_dot_product_attention(q, k, k)


@pytest.mark.parametrize("call, message", [
    (lambda: F.rope(tg.zeros(1, 1, 3, 5), np.arange(3)), "even head size D, got shape (1, 1, 3, 5)"),
    (lambda: F.rope(tg.zeros(1, 1, 3, 4), np.arange(4)), "positions shape (4,) does not fit x of shape (1, 1, 3, 4)"),
    (lambda: F.rope(tg.zeros(1, 1, 3, 4), np.arange(3.0)), "positions must be integers"),
    (lambda: F.rope(tg.zeros(1, 1, 3, 4), np.arange(3), scaling={"rope_type": "yarn"}), "rope_type 'llama3'"),
    (lambda: F.rms_norm(tg.zeros(2, 3), tg.ones(2)), "weight shape (2,) does not match input shape (2, 3)"),
    (lambda: F.rms_norm(tg.zeros(2, 3), tg.ones(3), eps=0.0), "eps must be > 0, got 0.0"),
])
def test_bad_arguments_of_the_new_ops_get_one_line(call, message):
    with pytest.raises((ValueError, TypeError)) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


# --- the model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [TINY, {**TINY, "qk_norm": False, "tie_weights": True, "n_kv_heads": 1},
                                 {**TINY, "num_classes": 3},
                                 {**LLAMA_PRESETS["llama-small"], "vocab_size": 50}])
def test_count_from_the_config_equals_the_built_models_parameters(cfg):
    model = LlamaModel(cfg)
    assert count_parameters(cfg) == model.num_parameters() == sum(p.size for p in model.parameters())


def test_preset_shapes_and_counts():
    assert count_parameters(LLAMA_PRESETS["smollm2-135m"]) == 134_515_008
    assert count_parameters(LLAMA_PRESETS["llama3.2-1b"]) == 1_235_814_400
    assert count_parameters(LLAMA_PRESETS["qwen3-0.6b"]) == 596_049_920


def test_the_kv_cache_holds_only_the_kv_heads():
    model = LlamaModel(TINY)
    cache = model.new_cache(3, 10)
    assert cache.layers[0].k.shape == (3, 2, 10, 4) and len(cache.layers) == 2
    assert cache_bytes(TINY, 3, 10) == 2 * 2 * 3 * 2 * 10 * 4 * 4
    assert cache_bytes(LLAMA_PRESETS["llama3.2-1b"], 1, 1) * 4 == 2 * 16 * 32 * 64 * 4  # 4x smaller than 32 heads


def test_logits_with_a_cache_equal_the_whole_sequence_at_once(device):
    model = LlamaModel(TINY)
    ids = np.random.default_rng(4).integers(0, 37, size=(2, 9))
    whole = host(model(ids))
    cache = model.new_cache(2, 16)
    parts = [host(model(ids[:, :5], cache=cache)), host(model(ids[:, 5:6], cache=cache)), host(model(ids[:, 6:], cache=cache))]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, rtol=1e-4, atol=1e-5)


def test_generation_with_and_without_the_cache_agree_past_the_context(device):
    from tinygpt.generate import generate

    tg.manual_seed(2)  # a seed whose continuation varies
    model = LlamaModel(TINY)
    prompt = np.array([[1, 2, 3]])
    with_cache = host(generate(model, prompt, 20, 16, use_cache=True))
    assert len(set(with_cache[0, 3:].tolist())) > 3  # not one token repeated
    np.testing.assert_array_equal(with_cache, host(generate(model, prompt, 20, 16, use_cache=False)))


def test_a_model_learns_a_short_sequence(device):
    tg.manual_seed(0)
    model = LlamaModel({**TINY, "vocab_size": 8})
    ids = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]])
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 8), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.5 and losses[-1] < 0.1


@pytest.mark.parametrize("change, message", [
    ({"n_kv_heads": 3}, "n_kv_heads=3 does not divide n_heads=4"), ({"head_dim": 5}, "head_dim=5 must be even"),
    ({"n_layers": 0}, "n_layers=0"), ({"emb_dim": 2.5}, "emb_dim=2.5"), ({"n_heads": 0}, "n_heads=0 must be positive")])
def test_impossible_configs_are_refused_naming_the_values(change, message):
    with pytest.raises(ValueError, match=message):
        full_config({**TINY, **change})


def test_too_many_tokens_for_the_context_are_refused():
    model = LlamaModel(TINY)
    cache = model.new_cache(1)
    model(np.zeros((1, 10), dtype=int), cache=cache)
    with pytest.raises(ValueError, match="input has 7 tokens after 10 cached ones but context_length is 16"):
        model(np.zeros((1, 7), dtype=int), cache=cache)


def test_lora_wraps_every_projection_and_only_the_adapters_train():
    from tinygpt.finetune import LoRALayer, replace_linear_with_lora

    model = LlamaModel(TINY)
    ids = np.random.default_rng(5).integers(0, 37, size=(1, 6))
    before = model(ids).numpy()
    replace_linear_with_lora(model, rank=2, alpha=4)
    att, ff = model.trf_blocks[0].att, model.trf_blocks[0].ff
    for layer in (att.W_query, att.W_key, att.W_value, att.out_proj, ff.fc1, ff.fc2, ff.fc3, model.out_head):
        assert isinstance(layer.lora, LoRALayer)
    np.testing.assert_allclose(model(ids).numpy(), before, rtol=1e-6)  # B starts at zero: the same model
    F.cross_entropy(model(ids).reshape(-1, 37), ids.reshape(-1)).backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".lora." in n for n in trained)
    assert "trf_blocks.0.norm1.weight" not in trained and "tok_emb.weight" not in trained


def test_trace_names_the_llama_modules_of_each_backward_node():
    model = LlamaModel(TINY)
    ids = np.random.default_rng(6).integers(0, 37, size=(1, 5))
    with tg.trace(keep_grads=True) as t:
        F.cross_entropy(model(ids).reshape(-1, 37), ids.reshape(-1)).backward()
    ops = {(n.op, n.module) for n in t.nodes}
    assert ("Rope", "trf_blocks.1.att") in ops and ("ScaledDotProductAttention", "trf_blocks.0.att") in ops
    assert ("RMSNorm", "trf_blocks.0.att.k_norm") in ops and ("SwiGLU", "trf_blocks.1.ff") in ops
    assert t.grad_of("trf_blocks.0.att.q_norm").shape == (1, 4, 5, 4)  # [B, H, T, D]: before RoPE


def test_anomaly_mode_names_the_llama_module_where_a_nan_appears():
    model = LlamaModel(TINY)
    model.trf_blocks[1].ff.fc2.weight.data[0, 0] = np.nan
    with pytest.raises(RuntimeError, match=r"trf_blocks\.1\.ff\.fc2"):
        with tg.detect_anomaly():
            model(np.zeros((1, 3), dtype=int))


def test_a_llama_classifier_trains_its_head_and_reloads_from_a_checkpoint(tmp_path):
    from tinygpt.checkpoint import load_checkpoint, save_checkpoint
    from tinygpt.data import CharTokenizer
    from tinygpt.finetune.classify import make_classifier

    model = make_classifier(LlamaModel({**TINY, "vocab_size": 5}), num_classes=2)
    ids = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    opt = optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(20):
        loss = F.cross_entropy(model(ids)[:, -1], np.array([0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    save_checkpoint(tmp_path, 20, model, CharTokenizer.from_text("abcde"))
    again = load_checkpoint(tmp_path).model
    assert again.cfg["num_classes"] == 2 and again.out_head.bias is not None
    np.testing.assert_array_equal(again(ids).numpy(), model(ids).numpy())


def test_plain_kernels_give_the_fast_paths_logits_and_gradients():
    """TINYGPT_KERNELS=plain: every op runs its reference math (Linear and attention have fast
    versions; the Llama ops are plain math only)."""
    model = LlamaModel(TINY)
    ids = np.random.default_rng(7).integers(0, 37, size=(2, 9))
    results = {}
    for mode in ("fast", "plain"):
        tg.set_kernels(mode)
        try:
            model.zero_grad()
            logits = model(ids)
            F.cross_entropy(logits.reshape(-1, 37), ids.reshape(-1)).backward()
            results[mode] = logits.numpy(), {n: p.grad.numpy() for n, p in model.named_parameters()}
        finally:
            tg.set_kernels("fast")
    np.testing.assert_allclose(results["plain"][0], results["fast"][0], rtol=1e-4, atol=1e-5)
    for name, grad in results["fast"][1].items():
        np.testing.assert_allclose(results["plain"][1][name], grad, rtol=1e-3, atol=1e-5, err_msg=name)
