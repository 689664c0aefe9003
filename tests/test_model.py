"""GPTModel (book chapter 4): parameter counts, state_dict names, weight tying, input checks,
the chapter-3 attention numbers, whole-model gradients, backends and dropout modes."""
import math

import numpy as np
import pytest
from conftest import host

import tinygpt as tg
import tinygpt.functional as F
from tinygpt import dispatch
from tinygpt.model import GPT_CONFIG_124M, GPT_PRESETS, GPTModel, count_parameters, parameter_table, size_mb

TINY = {"vocab_size": 13, "context_length": 8, "emb_dim": 12, "n_heads": 3, "n_layers": 2, "drop_rate": 0.0,
        "qkv_bias": False}
SMALL = {"vocab_size": 50, "context_length": 16, "emb_dim": 16, "n_heads": 4, "n_layers": 2, "drop_rate": 0.1,
         "qkv_bias": False}


def batch(cfg: dict, b: int = 2, t: int | None = None, seed: int = 0):
    """Random token ids x and next-token targets y, both (b, t)."""
    rng = np.random.default_rng(seed)
    t = cfg["context_length"] if t is None else t
    return rng.integers(0, cfg["vocab_size"], (b, t)), rng.integers(0, cfg["vocab_size"], (b, t))


def reinitialise(model: GPTModel, std: float = 0.3, seed: int = 0) -> None:
    """Every parameter ~ N(0, std) (LayerNorm scales around 1): gradients of order 0.1 instead of
    tiny ones a small-scale init can give, so an absolute tolerance means something."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        values = rng.standard_normal(p.shape) * std + (1.0 if name.endswith(".scale") else 0.0)
        p.data = tg.tensor(values, dtype=p.dtype, device=p.device).data


# ------------------------------------------------------------------ parameter counts (book chapter 4)

BOOK_COUNTS = {  # untied, tied (output head shares the token embedding)
    "gpt2-small": (163_009_536, 124_412_160),
    "gpt2-medium": (406_212_608, 354_749_440),
    "gpt2-large": (838_220_800, 773_891_840),
    "gpt2-xl": (1_637_792_000, 1_557_380_800),
}


@pytest.mark.parametrize("preset", list(BOOK_COUNTS))
def test_count_parameters_of_every_preset_matches_the_book_untied_and_tied(preset):
    untied, tied = BOOK_COUNTS[preset]
    cfg = GPT_PRESETS[preset]
    assert count_parameters(cfg) == untied
    assert count_parameters({**cfg, "tie_weights": True}) == tied
    assert untied - tied == cfg["vocab_size"] * cfg["emb_dim"]


def test_presets_have_the_gpt2_shapes():
    shapes = {name: (c["emb_dim"], c["n_layers"], c["n_heads"]) for name, c in GPT_PRESETS.items()}
    assert shapes == {"gpt2-small": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20),
                      "gpt2-xl": (1600, 48, 25)}
    assert GPT_PRESETS["gpt2-small"] == GPT_CONFIG_124M
    assert all(c["vocab_size"] == 50257 and c["context_length"] == 1024 for c in GPT_PRESETS.values())


def test_124m_size_in_megabytes_and_one_block_split_match_the_book():
    assert round(size_mb(count_parameters(GPT_CONFIG_124M)), 2) == 621.83
    rows = dict(parameter_table(GPT_CONFIG_124M))
    assert rows["trf_blocks.0.ff"] == 4_722_432
    assert rows["trf_blocks.0.att"] == 2_360_064
    assert rows["trf_blocks.11.ff"] == 4_722_432 and "trf_blocks.12.ff" not in rows


def group_by_module(model: GPTModel) -> dict[str, int]:
    """The real model's parameter counts summed under parameter_table's row names."""
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:3]) if parts[0] == "trf_blocks" else parts[0]
        groups[key] = groups.get(key, 0) + p.size
    return groups


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_built_model_parameters_equal_count_parameters_and_parameter_table_rows(qkv_bias, tie):
    cfg = {**SMALL, "qkv_bias": qkv_bias, "tie_weights": tie, "n_layers": 3}
    model = GPTModel(cfg)
    assert model.num_parameters() == count_parameters(cfg)
    expected = {name: count for name, count in parameter_table(cfg) if count}
    assert group_by_module(model) == expected
    if tie:
        assert dict(parameter_table(cfg))["out_head"] == 0


def test_full_124m_model_has_163m_parameters_and_untrained_loss_near_ln_vocab():
    tg.manual_seed(123)
    model = GPTModel(GPT_CONFIG_124M).eval()
    assert model.num_parameters() == 163_009_536
    assert model.pos_emb.weight.shape == (1024, 768) and model.out_head.weight.shape == (50257, 768)
    x, y = batch(GPT_CONFIG_124M, b=2, t=64, seed=1)
    with tg.no_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y).item()
    assert logits.shape == (2, 64, 50257)
    # uniform guessing gives ln(50257) = 10.82; logits of std sqrt(1/3) add about 0.17 (book: 10.98)
    assert abs(loss - math.log(50257)) < 0.2, loss


# ------------------------------------------------------------------ state_dict names (the book's)


def expected_keys(n_layers: int, qkv_bias: bool) -> list[str]:
    keys = ["tok_emb.weight", "pos_emb.weight"]
    for i in range(n_layers):
        block = f"trf_blocks.{i}"
        for proj in ("W_query", "W_key", "W_value"):
            keys += [f"{block}.att.{proj}.weight"] + ([f"{block}.att.{proj}.bias"] if qkv_bias else [])
        keys += [f"{block}.att.out_proj.weight", f"{block}.att.out_proj.bias",
                 f"{block}.ff.layers.0.weight", f"{block}.ff.layers.0.bias",
                 f"{block}.ff.layers.2.weight", f"{block}.ff.layers.2.bias",
                 f"{block}.norm1.scale", f"{block}.norm1.shift", f"{block}.norm2.scale", f"{block}.norm2.shift"]
    return keys + ["final_norm.scale", "final_norm.shift", "out_head.weight"]


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_state_dict_keys_are_exactly_the_books(qkv_bias, tie):
    model = GPTModel({**SMALL, "qkv_bias": qkv_bias, "tie_weights": tie})
    sd = model.state_dict()
    assert list(sd) == expected_keys(2, qkv_bias)
    assert sd["trf_blocks.1.ff.layers.0.weight"].shape == (64, 16)
    assert sd["trf_blocks.1.ff.layers.2.weight"].shape == (16, 64)
    assert sd["out_head.weight"].shape == (50, 16)


def test_init_is_the_books_pytorch_defaults():
    cfg = {**SMALL, "emb_dim": 64, "n_layers": 8, "vocab_size": 500}
    model = GPTModel(cfg)
    sd = {k: host(v) for k, v in model.state_dict().items()}
    np.testing.assert_allclose(sd["tok_emb.weight"].std(), 1.0, rtol=0.05)  # nn.Embedding: N(0, 1)
    np.testing.assert_allclose(sd["pos_emb.weight"].std(), 1.0, rtol=0.1)
    for name, fan_in in (("trf_blocks.0.ff.layers.0.weight", 64), ("trf_blocks.0.ff.layers.2.weight", 256), ("out_head.weight", 64)):
        bound = 1 / math.sqrt(fan_in)  # nn.Linear: U(-1/sqrt(in), 1/sqrt(in)), std bound/sqrt(3)
        assert np.abs(sd[name]).max() <= bound
        np.testing.assert_allclose(sd[name].std(), bound / math.sqrt(3), rtol=0.05)
    assert np.abs(sd["trf_blocks.3.att.out_proj.bias"]).max() <= 1 / math.sqrt(64)
    assert not sd["final_norm.shift"].any()
    np.testing.assert_array_equal(sd["trf_blocks.3.norm2.scale"], 1.0)


# ------------------------------------------------------------------ weight tying


def test_tied_model_holds_one_parameter_and_an_update_reaches_both_uses():
    model = GPTModel({**SMALL, "tie_weights": True}).eval()
    assert model.out_head.weight is model.tok_emb.weight
    x, y = batch(SMALL)
    F.cross_entropy(model(x), y).backward()
    w = model.tok_emb.weight
    w.data = w.data - 0.5 * w.grad.data  # rebinds the array, as an optimizer might
    updated = host(w)
    np.testing.assert_array_equal(host(model.out_head.weight), updated)
    np.testing.assert_array_equal(host(model.tok_emb(x)), updated[x])
    hidden = tg.randn(3, 16)
    np.testing.assert_allclose(host(model.out_head(hidden)), host(hidden) @ updated.T, rtol=1e-5, atol=1e-6)


def test_tied_gradient_is_the_sum_of_the_embedding_and_output_head_gradients():
    tg.set_default_dtype(np.float64)
    untied = GPTModel(SMALL).eval()
    reinitialise(untied, std=0.2)
    untied.out_head.weight.data = untied.tok_emb.weight.data.copy()
    tied = GPTModel({**SMALL, "tie_weights": True}).eval()
    tied.load_state_dict(untied.state_dict())
    x, y = batch(SMALL, seed=3)
    loss_untied, loss_tied = F.cross_entropy(untied(x), y), F.cross_entropy(tied(x), y)
    np.testing.assert_allclose(loss_tied.item(), loss_untied.item(), rtol=1e-13)
    loss_untied.backward()
    loss_tied.backward()
    grad_emb, grad_head = host(untied.tok_emb.weight.grad), host(untied.out_head.weight.grad)
    assert np.abs(grad_emb).max() > 1e-3 and np.abs(grad_head).max() > 1e-3  # both paths contribute
    np.testing.assert_allclose(host(tied.tok_emb.weight.grad), grad_emb + grad_head, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------ input checks


def test_input_longer_than_context_length_raises_value_error_naming_both_lengths(device):
    model = GPTModel(SMALL)
    x, _ = batch(SMALL, t=17)
    with pytest.raises(ValueError, match=r"17 tokens.*context_length is 16"):
        model(x)
    assert model(x[:, :16]).shape == (2, 16, 50)
    assert model(x[:, :1]).shape == (2, 1, 50)


@pytest.mark.parametrize("bad_id", [-1, 50])
def test_token_ids_outside_the_vocabulary_raise_index_error(device, bad_id):
    model = GPTModel(SMALL)
    x, _ = batch(SMALL, t=5)
    x[1, 3] = bad_id
    with pytest.raises(IndexError, match=str(bad_id)):
        model(x)


def test_token_ids_as_a_tensor_give_the_same_logits_as_an_array(device):
    model = GPTModel(SMALL).eval()
    x, _ = batch(SMALL, t=6)
    np.testing.assert_array_equal(host(model(tg.tensor(x))), host(model(x)))


# ------------------------------------------------------------------ chapter 3 warm-up numbers

WARMUP_INPUTS = [[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
                 [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]]


def assert_4_decimals(actual: np.ndarray, book: list[float]) -> None:
    """Rounded to 4 decimals, `actual` prints as the book's numbers (float32 rounding aside)."""
    np.testing.assert_allclose(np.round(actual.astype(np.float64), 4), book, rtol=0, atol=1e-7)


def test_chapter3_attention_scores_and_context_vector_of_query_2(device):
    inputs = tg.tensor(WARMUP_INPUTS)
    query = inputs[1]
    scores = inputs @ query  # (6, 3) @ (3,) -> (6,)
    assert_4_decimals(host(scores), [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865])
    weights = F.softmax(scores, axis=-1)
    np.testing.assert_allclose(host(weights).sum(), 1.0, rtol=1e-6)
    context = weights @ inputs  # (6,) @ (6, 3) -> (3,)
    assert_4_decimals(host(context), [0.4419, 0.6515, 0.5683])
    # all six queries at once: the same row comes out of the (6, 6) weight matrix
    all_context = F.softmax(inputs @ inputs.transpose(0, 1), axis=-1) @ inputs
    np.testing.assert_allclose(host(all_context)[1], host(context), rtol=1e-6)


# ------------------------------------------------------------------ whole-model gradient check

GRADCHECK_TOLERANCE = {"atol": 1e-7, "rtol": 1e-4}


def gradcheck_model(cfg: dict, train: bool = False, **kwargs) -> bool:
    tg.manual_seed(0)
    model = GPTModel(cfg).train(train)
    reinitialise(model)
    x, y = batch(cfg, b=2, seed=1)
    return tg.gradcheck(lambda *params: F.cross_entropy(model(x), y), model.parameters(), **kwargs)


@pytest.mark.parametrize("qkv_bias, tie", [(False, False), (False, True), (True, True)], ids=["plain", "tied", "qkv_bias-tied"])
def test_whole_model_gradients_match_finite_differences_for_every_parameter_element(qkv_bias, tie):
    cfg = {**TINY, "qkv_bias": qkv_bias, "tie_weights": tie}
    assert gradcheck_model(cfg, raise_exception=True, **GRADCHECK_TOLERANCE)


def test_whole_model_gradients_match_finite_differences_with_dropout_in_train_mode():
    """qkv_bias untied: with the three above, every qkv_bias/tying combination is checked."""
    cfg = {**TINY, "drop_rate": 0.2, "qkv_bias": True}
    assert gradcheck_model(cfg, train=True, raise_exception=True, **GRADCHECK_TOLERANCE)


def test_whole_model_gradcheck_fails_when_one_backward_is_slightly_wrong(monkeypatch):
    cfg = {**TINY, "n_layers": 1}
    assert gradcheck_model(cfg, **GRADCHECK_TOLERANCE) is True
    gelu = dispatch.implementation(F.GELU, np.zeros(1))  # the class that runs: the plain op or its fast version
    correct = gelu.backward

    def off_by_a_tenth_of_a_percent(ctx, grad):
        return correct(ctx, grad) * 1.001

    monkeypatch.setattr(gelu, "backward", staticmethod(off_by_a_tenth_of_a_percent))
    assert gradcheck_model(cfg, **GRADCHECK_TOLERANCE) is False


# ------------------------------------------------------------------ backends and modes


def test_strict_backend_model_gives_the_numpy_logits_and_gradients():
    tg.manual_seed(7)
    cpu = GPTModel({**SMALL, "qkv_bias": True}).eval()
    reinitialise(cpu, std=0.1)
    tg.set_default_device("strict")
    strict = GPTModel({**SMALL, "qkv_bias": True}).eval()
    strict.load_state_dict(cpu.state_dict())
    assert all(p.device == "strict" for p in strict.parameters())
    x, y = batch(SMALL, seed=2)
    logits_cpu, logits_strict = cpu(x), strict(x)
    assert logits_strict.device == "strict"
    np.testing.assert_allclose(host(logits_strict), host(logits_cpu), rtol=1e-5, atol=1e-6)
    F.cross_entropy(logits_cpu, y).backward()
    F.cross_entropy(logits_strict, y).backward()
    # strict runs the plain math, cpu the blocked kernels: the same sums in another order, so
    # they agree to float32 rounding of the gradients' size. (W_key.bias has a true gradient of
    # 0, softmax ignoring a constant added to every score of a row: there both are rounding noise.)
    scale = max(np.abs(host(p.grad)).max() for p in cpu.parameters())
    for (name, p), (_, q) in zip(cpu.named_parameters(), strict.named_parameters()):
        np.testing.assert_allclose(host(q.grad), host(p.grad), rtol=1e-4, atol=1e-6 * scale, err_msg=name)


def test_model_moved_with_to_strict_gives_the_same_logits():
    tg.manual_seed(7)
    model = GPTModel({**SMALL, "tie_weights": True}).eval()
    x, _ = batch(SMALL, seed=2)
    expected = host(model(x))
    model.to("strict")
    assert model.out_head.weight is model.tok_emb.weight and model.tok_emb.weight.device == "strict"
    np.testing.assert_allclose(host(model(x)), expected, rtol=1e-5, atol=1e-6)


def test_eval_mode_is_deterministic_and_train_mode_dropout_is_random_but_reproducible(device):
    model = GPTModel(SMALL)
    x, _ = batch(SMALL)
    model.eval()
    np.testing.assert_array_equal(host(model(x)), host(model(x)))
    model.train()
    tg.manual_seed(42)
    first, second = host(model(x)), host(model(x))
    assert not np.allclose(first, second)
    tg.manual_seed(42)
    np.testing.assert_array_equal(host(model(x)), first)
    np.testing.assert_array_equal(host(model(x)), second)
