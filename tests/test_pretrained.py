"""GPT-2 in Hugging Face layout: loading a hand-written tiny checkpoint against an independent
NumPy forward of that layout, the tensor-name variants real files use, saving and reloading,
broken files, the hub download (with urlopen faked, never the network), the strict device,
and parity with transformers' GPT2LMHeadModel when it is installed."""
import json
import re

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import tinygpt as tg
import tinygpt.pretrained as pretrained
from tinygpt import backend
from tinygpt.model import GPTModel
from tinygpt.pretrained import GPT2_NAMES, download_gpt2, load_gpt2, save_gpt2
from conftest import host

V, P, E, H, L = 50, 16, 12, 3, 2  # vocabulary, positions, embedding, heads, layers


def hf_config(vocab=V, ctx=P, emb=E, heads=H, layers=L) -> dict:
    """config.json as Hugging Face writes it for GPT-2, with the real field names."""
    return {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
            "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": ctx, "n_embd": emb, "n_head": heads,
            "n_inner": None, "n_layer": layers, "n_positions": ctx, "resid_pdrop": 0.1, "scale_attn_weights": True,
            "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
            "summary_type": "cls_index", "summary_use_proj": True, "vocab_size": vocab}


def hf_tensors(seed=0, vocab=V, ctx=P, emb=E, layers=L) -> dict[str, np.ndarray]:
    """Random float32 GPT-2 weights under Hugging Face's names, Conv1D matrices as (in, out),
    plus the (1, 1, P, P) causal-mask buffer real files carry. Random matrices are not
    symmetric, so a missing transpose of a square one changes the logits."""
    rng = np.random.default_rng(seed)

    def r(*shape, scale=0.2, mean=0.0):
        return (mean + scale * rng.standard_normal(shape)).astype(np.float32)

    t = {"wte.weight": r(vocab, emb), "wpe.weight": r(ctx, emb, scale=0.1)}
    for i in range(layers):
        h = f"h.{i}."
        t |= {h + "ln_1.weight": r(emb, scale=0.1, mean=1.0), h + "ln_1.bias": r(emb, scale=0.1),
              h + "attn.bias": np.tril(np.ones((ctx, ctx), np.float32))[None, None],
              h + "attn.c_attn.weight": r(emb, 3 * emb, scale=0.3), h + "attn.c_attn.bias": r(3 * emb, scale=0.1),
              h + "attn.c_proj.weight": r(emb, emb), h + "attn.c_proj.bias": r(emb, scale=0.1),
              h + "ln_2.weight": r(emb, scale=0.1, mean=1.0), h + "ln_2.bias": r(emb, scale=0.1),
              h + "mlp.c_fc.weight": r(emb, 4 * emb), h + "mlp.c_fc.bias": r(4 * emb, scale=0.1),
              h + "mlp.c_proj.weight": r(4 * emb, emb), h + "mlp.c_proj.bias": r(emb, scale=0.1)}
    return t | {"ln_f.weight": r(emb, scale=0.1, mean=1.0), "ln_f.bias": r(emb, scale=0.1)}


def write_hf_gpt2(folder, tensors, config):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture
def tiny(tmp_path):
    """(folder, tensors): a tiny GPT-2 checkpoint in Hugging Face layout."""
    tensors = hf_tensors()
    return write_hf_gpt2(tmp_path / "tiny-gpt2", tensors, hf_config()), tensors


IDS = np.random.default_rng(1).integers(0, V, size=(2, P))


# transformers' activations.py, formula for formula (the names GPT2Config's activation_function takes)
HF_GELUS = {
    "gelu_new": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
    "gelu_pytorch_tanh": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * np.power(x, 3)))),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + np.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
}


def reference_logits(t: dict, ids: np.ndarray, n_head: int = H, eps: float = 1e-5, activation: str = "gelu_new",
                     reorder_and_upcast_attn: bool = False) -> np.ndarray:
    """GPT-2's forward written straight from the Hugging Face layout, in float64: Conv1D is
    x @ W + b, c_attn's columns are [q | k | v], pre-LayerNorm blocks, GELU (tanh form, as
    transformers writes the named variant), and the output head is lm_head.weight where the
    file has one (untied), else wte^T. With reorder_and_upcast_attn the 1/sqrt(D) multiplies
    the product as transformers' baddbmm(alpha=...) does, instead of dividing the scores."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    gelu = HF_GELUS[activation]
    B, T = ids.shape
    x = t["wte.weight"][ids] + t["wpe.weight"][:T]
    D = x.shape[-1] // n_head

    def layer_norm(x, w, b):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * w + b

    def split_heads(a):  # [B, T, E] -> [B, H, T, D]
        return a.reshape(B, T, n_head, D).transpose(0, 2, 1, 3)

    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    i = 0
    while f"h.{i}.ln_1.weight" in t:
        h = f"h.{i}."
        a = layer_norm(x, t[h + "ln_1.weight"], t[h + "ln_1.bias"])
        qkv = a @ t[h + "attn.c_attn.weight"] + t[h + "attn.c_attn.bias"]
        q, k, v = (split_heads(part) for part in np.split(qkv, 3, axis=-1))
        scores = (1 / np.sqrt(D)) * (q @ k.transpose(0, 1, 3, 2)) if reorder_and_upcast_attn else \
            q @ k.transpose(0, 1, 3, 2) / np.sqrt(D)
        scores = np.where(future, -np.inf, scores)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        context = (weights @ v).transpose(0, 2, 1, 3).reshape(B, T, -1)
        x = x + context @ t[h + "attn.c_proj.weight"] + t[h + "attn.c_proj.bias"]
        m = layer_norm(x, t[h + "ln_2.weight"], t[h + "ln_2.bias"])
        x = x + gelu(m @ t[h + "mlp.c_fc.weight"] + t[h + "mlp.c_fc.bias"]) @ t[h + "mlp.c_proj.weight"] + t[h + "mlp.c_proj.bias"]
        i += 1
    return layer_norm(x, t["ln_f.weight"], t["ln_f.bias"]) @ t.get("lm_head.weight", t["wte.weight"]).T


def logits(model, ids=IDS) -> np.ndarray:
    return host(model(backend.make_array(ids, device=model.tok_emb.weight.device)))


def tied_model(qkv_bias=True, seed=3, **overrides):
    tg.manual_seed(seed)
    return GPTModel({"vocab_size": V, "context_length": P, "emb_dim": E, "n_heads": H, "n_layers": L,
                     "drop_rate": 0.0, "qkv_bias": qkv_bias, "tie_weights": True, **overrides}).eval()


# --- loading -----------------------------------------------------------------------------------

def test_loaded_logits_match_an_independent_numpy_gpt2_forward_of_the_hf_layout(tiny):
    folder, tensors = tiny
    got = logits(load_gpt2(folder))
    want = reference_logits(tensors, IDS)
    assert got.dtype == np.float32 and got.shape == (2, P, V)
    assert np.abs(want).max() > 0.5  # logits are not all near zero, so the comparison means something
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_reference_forward_detects_a_missing_transpose_or_a_row_split_of_c_attn(tiny):
    """The weights are random enough that the two classic mapping mistakes change the logits."""
    _, tensors = tiny
    want = reference_logits(tensors, IDS)
    transposed = dict(tensors, **{"h.0.attn.c_proj.weight": tensors["h.0.attn.c_proj.weight"].T})
    assert np.abs(reference_logits(transposed, IDS) - want).max() > 1e-2
    w = tensors["h.0.attn.c_attn.weight"]  # (E, 3E): mistake = q/k/v interleaved instead of side by side
    interleaved = dict(tensors, **{"h.0.attn.c_attn.weight": w.reshape(E, E, 3).transpose(0, 2, 1).reshape(E, 3 * E)})
    assert np.abs(reference_logits(interleaved, IDS) - want).max() > 1e-2


def test_loaded_model_is_tied_has_qkv_bias_the_hf_context_length_and_is_in_eval_mode(tiny):
    folder, tensors = tiny
    model = load_gpt2(folder)
    assert model.cfg["qkv_bias"] is True
    assert model.out_head.weight is model.tok_emb.weight
    assert model.cfg["context_length"] == P and model.pos_emb.weight.shape == (P, E)
    assert (model.cfg["vocab_size"], model.cfg["emb_dim"], model.cfg["n_heads"], model.cfg["n_layers"]) == (V, E, H, L)
    assert model.training is False and all(not m.training for m in model.trf_blocks)
    assert model.tok_emb.weight.dtype == np.float32
    # the query/key/value split: columns [0, E), [E, 2E), [2E, 3E) of c_attn, transposed
    w = tensors["h.1.attn.c_attn.weight"]
    att = model.trf_blocks[1].att
    for j, lin in enumerate((att.W_query, att.W_key, att.W_value)):
        assert np.array_equal(host(lin.weight), w[:, j * E:(j + 1) * E].T)
        assert np.array_equal(host(lin.bias), tensors["h.1.attn.c_attn.bias"][j * E:(j + 1) * E])


def test_load_accepts_a_transformer_prefix_and_an_lm_head_equal_to_wte(tiny, tmp_path):
    folder, tensors = tiny
    prefixed = {("" if k.startswith("lm_head") else "transformer.") + k: v
                for k, v in (tensors | {"lm_head.weight": tensors["wte.weight"]}).items()}
    assert "transformer.h.0.attn.bias" in prefixed and "lm_head.weight" in prefixed
    other = write_hf_gpt2(tmp_path / "prefixed", prefixed, hf_config())
    np.testing.assert_array_equal(logits(load_gpt2(other)), logits(load_gpt2(folder)))


def test_load_accepts_a_config_with_only_n_ctx(tiny, tmp_path):
    folder, tensors = tiny
    config = {k: v for k, v in hf_config().items() if k != "n_positions"}
    model = load_gpt2(write_hf_gpt2(tmp_path / "n_ctx", tensors, config))
    assert model.cfg["context_length"] == P


def test_loading_onto_the_strict_device_gives_the_same_logits(tiny):
    folder, _ = tiny
    on_cpu = load_gpt2(folder)
    strict = load_gpt2(folder, device="strict")
    assert strict.tok_emb.weight.device == "strict" and strict.trf_blocks[0].att.W_query.weight.device == "strict"
    assert tg.default_device() == "cpu"  # loading onto a device does not change the default
    # float32 through two implementations (strict runs the plain ops, the cpu the fast kernels):
    # the tolerance of tests/test_kernels.py for float32
    np.testing.assert_allclose(logits(strict), logits(on_cpu), rtol=2e-5, atol=2e-6)


# --- config.json: every GPT2Config field honoured or refused -------------------------------------

def nothing_may_load(monkeypatch):
    """Make building a model or opening the weights fail the test: a refused config is refused first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a refused config.json must be refused before anything is built or read")

    monkeypatch.setattr(pretrained, "GPTModel", forbidden)
    monkeypatch.setattr(pretrained, "safe_open", forbidden)


REFUSED = [  # (field, value, words of the reason)
    ("activation_function", "gelu", "tanh approximation"),
    ("activation_function", "relu", "tanh approximation"),
    ("activation_function", "silu", "tanh approximation"),
    ("scale_attn_weights", False, "1/sqrt(head_dim)"),
    ("scale_attn_by_inverse_layer_idx", True, "1/sqrt(head_dim) only"),
    ("n_inner", 5 * E, f"4 * n_embd = {4 * E}"),
    ("add_cross_attention", True, "cross-attention"),
    ("model_type", "gpt_neo", "only GPT-2"),
    ("is_encoder_decoder", True, "decoder only"),
    ("pruned_heads", {"0": [1]}, "n_head heads"),
]


@pytest.mark.parametrize("field, value, reason", REFUSED, ids=[f"{f}={v}" for f, v, _ in REFUSED])
def test_a_config_field_tinygpt_does_not_compute_is_refused_by_name_and_value_before_loading(
        tiny, tmp_path, monkeypatch, field, value, reason):
    _, tensors = tiny
    folder = write_hf_gpt2(tmp_path / "refused", tensors, hf_config() | {field: value})
    nothing_may_load(monkeypatch)
    with pytest.raises(ValueError) as info:
        load_gpt2(folder)
    message = str(info.value)
    assert message.startswith(str(folder / "config.json") + ": "), message
    assert f"{field}={value!r} is not supported" in message and reason in message, message
    assert "\n" not in message


INVALID = [
    ("layer_norm_epsilon", 0, "layer_norm_epsilon must be a number in (0, 1), got 0"),
    ("layer_norm_epsilon", "1e-5", "layer_norm_epsilon must be a number in (0, 1), got '1e-5'"),
    ("n_embd", -12, "n_embd must be a positive integer, got -12"),
    ("n_layer", 2.0, "n_layer must be a positive integer, got 2.0"),
    ("n_head", 5, f"n_head=5 does not divide n_embd={E}"),
    ("reorder_and_upcast_attn", "yes", "reorder_and_upcast_attn must be true or false, got 'yes'"),
    ("tie_word_embeddings", 1, "tie_word_embeddings must be true or false, got 1"),
]


@pytest.mark.parametrize("field, value, expected", INVALID, ids=[f"{f}={v}" for f, v, _ in INVALID])
def test_a_config_value_no_gpt2_can_have_is_refused_naming_it(tiny, tmp_path, monkeypatch, field, value, expected):
    _, tensors = tiny
    folder = write_hf_gpt2(tmp_path / "invalid", tensors, hf_config() | {field: value})
    nothing_may_load(monkeypatch)
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_gpt2(folder)


def test_every_refused_field_of_a_config_is_named_in_one_error():
    hf = hf_config() | {"activation_function": "gelu", "scale_attn_by_inverse_layer_idx": True}
    with pytest.raises(ValueError) as info:
        pretrained.config_from_hf(hf)
    message = str(info.value)
    assert message.startswith("config.json: ")
    assert "activation_function='gelu'" in message and "scale_attn_by_inverse_layer_idx=True" in message


def test_a_config_json_that_is_not_an_object_is_refused(tiny, tmp_path):
    folder, _ = tiny
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object .* got list"):
        load_gpt2(folder)


def test_layer_norm_epsilon_is_honoured_in_every_layernorm_and_changes_the_logits(tiny, tmp_path):
    _, tensors = tiny
    model = load_gpt2(write_hf_gpt2(tmp_path / "eps", tensors, hf_config() | {"layer_norm_epsilon": 1e-3}))
    norms = [model.final_norm] + [n for b in model.trf_blocks for n in (b.norm1, b.norm2)]
    assert [n.eps for n in norms] == [1e-3] * (2 * L + 1) and model.cfg["layer_norm_eps"] == 1e-3
    got = logits(model)
    np.testing.assert_allclose(got, reference_logits(tensors, IDS, eps=1e-3), rtol=1e-4, atol=2e-5)
    assert np.abs(got - reference_logits(tensors, IDS, eps=1e-5)).max() > 1e-2  # ignoring it would be visible


def test_layer_norm_epsilon_is_saved_back_and_reloads_to_the_same_logits(tiny, tmp_path):
    _, tensors = tiny
    model = load_gpt2(write_hf_gpt2(tmp_path / "eps", tensors, hf_config() | {"layer_norm_epsilon": 1e-3}))
    out = save_gpt2(model, tmp_path / "saved")
    assert json.loads((out / "config.json").read_text())["layer_norm_epsilon"] == 1e-3
    np.testing.assert_array_equal(logits(load_gpt2(out)), logits(model))


@pytest.mark.parametrize("activation", sorted(HF_GELUS))
def test_each_tanh_gelu_name_loads_and_matches_transformers_formula_for_it(tiny, tmp_path, activation):
    _, tensors = tiny
    model = load_gpt2(write_hf_gpt2(tmp_path / activation, tensors, hf_config() | {"activation_function": activation}))
    want = reference_logits(tensors, IDS, activation=activation)
    np.testing.assert_allclose(logits(model), want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("dtype, rtol, atol", [(np.float32, 1e-4, 2e-5), (np.float64, 1e-10, 1e-10)])
def test_reorder_and_upcast_attn_is_the_same_math_at_float32_and_float64(tiny, tmp_path, dtype, rtol, atol):
    """transformers' flag moves the 1/sqrt(D) into the product and computes attention in
    float32, which changes only half-precision results: tinygpt's float32 logits match the
    float64 reference within float32 rounding, its float64 logits within float64 rounding."""
    _, tensors = tiny
    folder = write_hf_gpt2(tmp_path / "reorder", tensors, hf_config() | {"reorder_and_upcast_attn": True})
    previous = tg.default_dtype()
    tg.set_default_dtype(dtype)
    try:
        model = load_gpt2(folder)
    finally:
        tg.set_default_dtype(previous)
    got = logits(model)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, reference_logits(tensors, IDS, reorder_and_upcast_attn=True), rtol=rtol, atol=atol)


def test_tie_word_embeddings_false_loads_lm_head_as_a_separate_out_head(tiny, tmp_path):
    _, tensors = tiny
    untied = tensors | {"lm_head.weight": hf_tensors(seed=9)["wte.weight"]}
    model = load_gpt2(write_hf_gpt2(tmp_path / "untied", untied, hf_config() | {"tie_word_embeddings": False}))
    assert model.out_head.weight is not model.tok_emb.weight and model.cfg["tie_weights"] is False
    got = logits(model)
    np.testing.assert_allclose(got, reference_logits(untied, IDS), rtol=1e-4, atol=2e-5)
    assert np.abs(got - reference_logits(tensors, IDS)).max() > 0.1  # the tied head would be visibly different


def test_tie_word_embeddings_false_without_lm_head_in_the_file_names_the_missing_tensor(tiny, tmp_path):
    _, tensors = tiny
    folder = write_hf_gpt2(tmp_path / "untied", tensors, hf_config() | {"tie_word_embeddings": False})
    with pytest.raises(ValueError, match=r"missing lm_head\.weight"):
        load_gpt2(folder)


def test_fields_that_cannot_change_the_logits_are_accepted(tiny, tmp_path):
    folder, tensors = tiny
    extra = {"use_cache": False, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
             "architectures": ["GPT2ForSequenceClassification"], "summary_type": "last", "summary_use_proj": False,
             "resid_pdrop": 0.5, "embd_pdrop": 0.5, "attn_pdrop": 0.5, "initializer_range": 1.0,
             "transformers_version": "4.57.0", "task_specific_params": {"text-generation": {"do_sample": True}},
             "n_ctx": 4 * P, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
             "add_cross_attention": False, "n_inner": 4 * E, "tie_word_embeddings": True, "pruned_heads": {}}
    model = load_gpt2(write_hf_gpt2(tmp_path / "extra", tensors, hf_config() | extra))
    assert model.cfg["context_length"] == P  # n_positions wins over n_ctx, as in transformers
    np.testing.assert_array_equal(logits(model), logits(load_gpt2(folder)))


def test_a_config_without_fields_takes_gpt2configs_defaults():
    cfg = pretrained.config_from_hf({})
    assert (cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"], cfg["n_heads"], cfg["n_layers"]) == \
        (50257, 1024, 768, 12, 12)
    assert cfg["layer_norm_eps"] == 1e-5 and cfg["tie_weights"] is True


# --- saving ------------------------------------------------------------------------------------

def test_save_then_load_gives_identical_logits(tiny, tmp_path):
    folder, _ = tiny
    model = load_gpt2(folder)
    out = save_gpt2(model, tmp_path / "saved")
    assert out == tmp_path / "saved"
    np.testing.assert_array_equal(logits(load_gpt2(out)), logits(model))


def test_saved_file_has_exactly_the_hf_names_conv1d_shapes_and_the_original_values(tiny, tmp_path):
    folder, tensors = tiny
    out = save_gpt2(load_gpt2(folder), tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    saved = load_file(str(out / "model.safetensors"))
    weights = {k: v for k, v in tensors.items() if not k.endswith(".attn.bias")}
    assert sorted(saved) == sorted(weights)
    for name, array in weights.items():
        assert saved[name].shape == array.shape and saved[name].dtype == np.float32, name
        assert np.array_equal(saved[name], array), name
    assert saved["h.0.attn.c_attn.weight"].shape == (E, 3 * E) and saved["h.0.mlp.c_fc.weight"].shape == (E, 4 * E)
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses safetensors without it
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head")} == \
        {"vocab_size": V, "n_positions": P, "n_ctx": P, "n_embd": E, "n_layer": L, "n_head": H}
    assert config["model_type"] == "gpt2" and config["layer_norm_epsilon"] == 1e-5


def test_save_writes_an_untied_model_with_its_lm_head_and_tie_word_embeddings_false(tmp_path):
    model = tied_model(tie_weights=False)
    assert model.out_head.weight is not model.tok_emb.weight
    out = save_gpt2(model, tmp_path / "untied")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    saved = load_file(str(out / "model.safetensors"))
    np.testing.assert_array_equal(saved["lm_head.weight"], host(model.out_head.weight))
    np.testing.assert_array_equal(saved["transformer.wte.weight"], host(model.tok_emb.weight))
    reloaded = load_gpt2(out)
    assert reloaded.out_head.weight is not reloaded.tok_emb.weight
    np.testing.assert_array_equal(logits(reloaded), logits(model))


def test_save_refuses_a_classifier_and_writes_nothing(tmp_path):
    model = tied_model(tie_weights=False, num_classes=2)
    with pytest.raises(ValueError, match="num_classes=2"):
        save_gpt2(model, tmp_path / "classifier")
    assert list(tmp_path.iterdir()) == []


def test_save_accepts_an_untied_model_whose_out_head_equals_tok_emb(tmp_path):
    model = tied_model(tie_weights=False)
    model.out_head.weight.data = model.tok_emb.weight.data.copy()
    reloaded = load_gpt2(save_gpt2(model, tmp_path / "equal"))
    np.testing.assert_array_equal(logits(reloaded), logits(model))


def test_model_without_qkv_bias_saves_zero_c_attn_biases_and_reloads_with_identical_logits(tmp_path):
    model = tied_model(qkv_bias=False)
    out = save_gpt2(model, tmp_path / "nobias")
    saved = load_file(str(out / "model.safetensors"))
    for i in range(L):
        assert saved[f"h.{i}.attn.c_attn.bias"].shape == (3 * E,)
        assert saved[f"h.{i}.attn.c_attn.bias"].dtype == np.float32
        assert not saved[f"h.{i}.attn.c_attn.bias"].any()
    reloaded = load_gpt2(out)
    assert reloaded.cfg["qkv_bias"] is True
    np.testing.assert_array_equal(logits(reloaded), logits(model))


def test_saving_over_an_existing_folder_replaces_it_and_leaves_no_temporary_folder(tiny, tmp_path):
    folder, _ = tiny
    out = tmp_path / "out"
    out.mkdir()
    save_gpt2(tied_model(seed=7), out)  # (a folder holding other files is refused: see test_outputs.py)
    model = load_gpt2(folder)
    save_gpt2(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny-gpt2"]  # no .tmp-* left behind
    np.testing.assert_array_equal(logits(load_gpt2(out)), logits(model))


def test_a_failed_save_keeps_the_previous_folder_and_removes_its_temporary_folder(tiny, tmp_path, monkeypatch):
    folder, _ = tiny
    out = save_gpt2(load_gpt2(folder), tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(pretrained, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_gpt2(tied_model(seed=7), out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny-gpt2"]


# --- broken files ------------------------------------------------------------------------------

def test_missing_unexpected_and_misshaped_tensors_raise_one_error_listing_all_three(tiny, tmp_path):
    _, tensors = tiny
    broken = dict(tensors)
    del broken["h.1.ln_2.bias"]
    broken["h.0.mlp.extra.weight"] = np.zeros((E, E), np.float32)
    broken["h.0.mlp.c_fc.weight"] = np.zeros((4 * E, E), np.float32)  # PyTorch Linear orientation: wrong here
    folder = write_hf_gpt2(tmp_path / "broken", broken, hf_config())
    with pytest.raises(ValueError) as info:
        load_gpt2(folder)
    message = str(info.value)
    for name in ("h.1.ln_2.bias", "h.0.mlp.extra.weight", "h.0.mlp.c_fc.weight"):
        assert name in message, message
    assert "missing" in message and "unexpected" in message and str((4 * E, E)) in message


def test_a_config_that_does_not_fit_the_file_names_the_misshaped_tensors(tiny, tmp_path):
    _, tensors = tiny
    folder = write_hf_gpt2(tmp_path / "wrong-vocab", tensors, hf_config(vocab=V + 1))
    with pytest.raises(ValueError, match=r"wte\.weight has shape \(50, 12\), expected \(51, 12\)"):
        load_gpt2(folder)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_a_folder_without_config_or_weights_raises_file_not_found_naming_the_file(tiny, missing):
    folder, _ = tiny
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        load_gpt2(folder)


def test_an_unknown_name_that_is_not_a_folder_raises_naming_the_allowed_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("an unknown name must not reach the network")

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", no_network)
    with pytest.raises(FileNotFoundError) as info:
        load_gpt2("gpt3-mini", cache_dir=tmp_path / "cache")
    assert "gpt3-mini" in str(info.value)
    for name in GPT2_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="gpt2-medium"):
        download_gpt2("gpt3-mini", cache_dir=tmp_path / "cache")


# --- download, with urlopen faked ----------------------------------------------------------------

class FakeResponse:
    """What urllib.request.urlopen returns, as far as download_gpt2 uses it."""

    def __init__(self, body: bytes, chunk: int = 1000, fail_after: int | None = None, content_length: int | None = None):
        self.headers = {"Content-Length": str(len(body) if content_length is None else content_length)}
        self.body, self.chunk, self.fail_after, self.pos = body, chunk, fail_after, 0

    def read(self, n=-1):
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        n = min(self.chunk, n if n > 0 else len(self.body))
        out = self.body[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def fake_hub(monkeypatch, folder, calls, **response_options):
    """Serve config.json and model.safetensors from `folder` for hub URLs; record each URL."""
    def urlopen(url, timeout=None):
        calls.append(url)
        assert url.startswith("https://huggingface.co/") and "/gpt2/" in url
        return FakeResponse((folder / url.rsplit("/", 1)[-1]).read_bytes(), **response_options)

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", urlopen)


def test_download_without_network_raises_runtime_error_pointing_to_a_local_folder(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise OSError("Name or service not known")

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="local folder"):
        load_gpt2("gpt2", cache_dir=tmp_path)
    assert list(tmp_path.rglob("*.part")) == []
    assert not (tmp_path / "gpt2" / "config.json").exists()


def test_a_download_that_breaks_midway_leaves_no_part_file_and_no_target(tiny, tmp_path, monkeypatch):
    folder, _ = tiny
    calls = []
    fake_hub(monkeypatch, folder, calls, fail_after=3000)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="connection reset"):
        download_gpt2("gpt2", cache_dir=cache)
    assert list(cache.rglob("*.part")) == []
    assert not (cache / "gpt2" / "model.safetensors").exists()


def test_download_lands_in_the_cache_loads_and_is_not_repeated(tiny, tmp_path, monkeypatch):
    folder, _ = tiny
    calls = []
    fake_hub(monkeypatch, folder, calls)
    cache = tmp_path / "cache"
    model = load_gpt2("gpt2", cache_dir=cache)
    assert [url.rsplit("/", 1)[-1] for url in calls] == ["config.json", "model.safetensors"]
    assert all("openai-community/gpt2/" in url for url in calls)
    for file in ("config.json", "model.safetensors"):
        assert (cache / "gpt2" / file).read_bytes() == (folder / file).read_bytes()
    assert list(cache.rglob("*.part")) == []
    np.testing.assert_array_equal(logits(model), logits(load_gpt2(folder)))

    again = load_gpt2("gpt2", cache_dir=cache)
    assert download_gpt2("gpt2", cache_dir=cache) == cache / "gpt2"
    assert len(calls) == 2  # both files were already cached
    np.testing.assert_array_equal(logits(again), logits(model))


def test_a_download_cut_short_is_not_accepted_as_complete(tiny, tmp_path, monkeypatch):
    """http.client's read(n) returns b"" when the server closes the connection early; it does
    not raise. A file shorter than its Content-Length must not be renamed into the cache, or
    every later load finds a corrupt file that is never downloaded again."""
    folder, _ = tiny
    calls = []
    body = (folder / "model.safetensors").read_bytes()

    def urlopen(url, timeout=None):
        calls.append(url)
        full = (folder / url.rsplit("/", 1)[-1]).read_bytes()
        if url.endswith("model.safetensors"):
            return FakeResponse(full[:len(full) // 2], content_length=len(full))  # connection closed halfway
        return FakeResponse(full)

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", urlopen)
    cache = tmp_path / "cache"
    with pytest.raises((RuntimeError, OSError)):
        download_gpt2("gpt2", cache_dir=cache)
    target = cache / "gpt2" / "model.safetensors"
    assert not target.exists() or target.read_bytes() == body
    assert list(cache.rglob("*.part")) == []


# --- transformers parity (optional dependency) ----------------------------------------------------

def transformers_logits(folder, ids=IDS) -> np.ndarray:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    # eager: transformers' reference attention, the only one that reads scale_attn_* and reorder_and_upcast_attn
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(torch.from_numpy(ids)).logits.float().numpy()


def test_transformers_gives_the_same_logits_on_the_hf_folder(tiny):
    folder, tensors = tiny
    theirs = transformers_logits(folder)
    np.testing.assert_allclose(logits(load_gpt2(folder)), theirs, rtol=0, atol=1e-4)
    np.testing.assert_allclose(reference_logits(tensors, IDS), theirs, rtol=0, atol=1e-4)


def test_transformers_reads_a_folder_written_by_save_gpt2(tmp_path):
    model = tied_model(qkv_bias=False)
    model.trf_blocks[0].att.out_proj.weight.data *= 40  # GPT-2's init makes logits tiny; make them non-trivial
    model.tok_emb.weight.data *= 20
    out = save_gpt2(model, tmp_path / "saved")
    ours = logits(model)
    assert np.abs(ours).max() > 0.1
    np.testing.assert_allclose(transformers_logits(out), ours, rtol=0, atol=1e-4)


def test_transformers_reads_a_loaded_then_saved_folder(tiny, tmp_path):
    folder, _ = tiny
    model = load_gpt2(folder)
    out = save_gpt2(model, tmp_path / "saved")
    np.testing.assert_allclose(transformers_logits(out), logits(model), rtol=0, atol=1e-4)


HONOURED = [{"layer_norm_epsilon": 1e-3}, {"activation_function": "gelu_pytorch_tanh"}, {"activation_function": "gelu_fast"},
            {"reorder_and_upcast_attn": True}, {"tie_word_embeddings": False}]


@pytest.mark.parametrize("fields", HONOURED, ids=[",".join(f"{k}={v}" for k, v in f.items()) for f in HONOURED])
def test_transformers_gives_the_same_logits_for_each_honoured_field(tiny, tmp_path, fields):
    _, tensors = tiny
    if "tie_word_embeddings" in fields:  # as transformers saves an untied GPT-2
        tensors = {"transformer." + k: v for k, v in tensors.items()} | {"lm_head.weight": hf_tensors(seed=9)["wte.weight"]}
    folder = write_hf_gpt2(tmp_path / "honoured", tensors, hf_config() | fields)
    np.testing.assert_allclose(logits(load_gpt2(folder)), transformers_logits(folder), rtol=0, atol=1e-4)


@pytest.mark.parametrize("fields", [{"activation_function": "gelu"}, {"scale_attn_by_inverse_layer_idx": True},
                                    {"scale_attn_weights": False}], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_transformers_computes_something_else_for_each_refused_field_so_ignoring_it_would_be_wrong(tiny, tmp_path, fields):
    folder, tensors = tiny
    theirs = transformers_logits(write_hf_gpt2(tmp_path / "refused", tensors, hf_config() | fields))
    assert np.abs(theirs - logits(load_gpt2(folder))).max() > 2e-4  # twice the parity tolerance


def test_transformers_reads_an_untied_model_written_by_save_gpt2(tmp_path):
    model = tied_model(tie_weights=False)
    model.tok_emb.weight.data *= 20  # as above: non-trivial logits
    out = save_gpt2(model, tmp_path / "untied")
    np.testing.assert_allclose(transformers_logits(out), logits(model), rtol=0, atol=1e-4)
