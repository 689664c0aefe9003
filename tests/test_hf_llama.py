"""LlamaModel against transformers: tiny random LlamaForCausalLM, Qwen3ForCausalLM and
MistralForCausalLM saved with save_pretrained, loaded by tinygpt, compared in float64 (logits
and every parameter gradient within 1e-10) and float32 (within 1e-4), by greedy generation,
parameter counts of the presets, and the save -> transformers -> tinygpt round trip.

float64 needs care on transformers' side: whatever the model's dtype, its RMSNorm computes in
float32 and its rotary embedding computes inv_freq and the angles' cos/sin in float32. For the
float64 comparisons `float64_throughout` replaces those two forwards by the same lines without
the float32 casts (inv_freq recomputed by transformers' own init function in float64, and
checked against its float32 one); the rest of transformers' model runs as it is. The float32
comparisons use transformers untouched."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.hf_llama import HFConfigError, load_llama, save_llama, weight_map
from tinygpt.llama import LLAMA_PRESETS, LlamaModel, count_parameters

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
torch = pytest.importorskip("torch", reason="torch is not installed")

BASE = {"vocab_size": 61, "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": None, "pad_token_id": None}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CONFIGS = {  # kv heads 1, 2 and n_heads (4): groups of 4, 2 and 1 query heads
    "llama-untied-gqa2": ("LlamaForCausalLM", {"num_key_value_heads": 2, "tie_word_embeddings": False}),
    "llama-tied-mha": ("LlamaForCausalLM", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama3-scaling-mqa": ("LlamaForCausalLM", {"num_key_value_heads": 1, "tie_word_embeddings": True,
                                                "rope_parameters": LLAMA3}),
    "llama-head-dim-6": ("LlamaForCausalLM", {"num_key_value_heads": 2, "head_dim": 6, "hidden_size": 20}),
    "qwen3-qk-norm": ("Qwen3ForCausalLM", {"num_key_value_heads": 2, "head_dim": 6, "tie_word_embeddings": True,
                                           "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "qwen3-untied-mqa": ("Qwen3ForCausalLM", {"num_key_value_heads": 1, "head_dim": 8, "tie_word_embeddings": False}),
    "mistral-gqa2": ("MistralForCausalLM", {"num_key_value_heads": 2, "sliding_window": None}),
}


def hf_model(name: str, seed: int = 0):
    """A random transformers model of CONFIGS[name]: weights N(0, 0.2), norm weights in
    [0.5, 1.5] (not all 1, so a norm weight used in the wrong place shows)."""
    cls, fields = CONFIGS[name]
    config_cls = getattr(transformers, cls.replace("ForCausalLM", "Config"))
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config_cls(**{**BASE, **fields}))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in pname else p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(params=list(CONFIGS))
def saved(request, tmp_path):
    """(name, transformers model in float32, its save_pretrained folder)."""
    model = hf_model(request.param)
    model.save_pretrained(tmp_path / request.param)
    return request.param, model, tmp_path / request.param


def float64_throughout(model):
    """model in float64 with its two float32 islands (RMSNorm, rotary angles) computed in float64."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = model.to(torch.float64)

    def rms_norm_forward(self, hidden_states):  # LlamaRMSNorm.forward without .to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    def rotary_forward(self, x, position_ids):  # LlamaRotaryEmbedding.forward without .float()
        freqs = position_ids[..., None].to(torch.float64) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_norm_forward, module)
        if type(module).__name__.endswith("RotaryEmbedding"):
            init = ROPE_INIT_FUNCTIONS.get(module.rope_type, module.compute_default_rope_parameters)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(torch, "float", torch.float64)  # the init functions' dtype=torch.float
                inv_freq, _ = init(module.config)
            assert inv_freq.dtype == torch.float64
            np.testing.assert_allclose(inv_freq.numpy(), module.original_inv_freq.double().numpy(), rtol=1e-6)
            module.inv_freq = inv_freq
            module.forward = types.MethodType(rotary_forward, module)
    return model


def ids_and_targets(vocab: int, batch: int = 2, steps: int = 9, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(batch, steps)), rng.integers(0, vocab, size=(batch, steps))


def hf_loss_and_grads(model, ids, targets):
    model.zero_grad()
    logits = model(torch.from_numpy(ids)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).reshape(-1))
    loss.backward()
    return logits.detach().numpy(), {n: p.grad.numpy() for n, p in model.named_parameters()}


def ours_loss_and_grads(model, ids, targets):
    model.zero_grad()
    logits = model(ids)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
    return logits.numpy(), {n: p.grad.numpy() for n, p in model.named_parameters()}


def test_float64_logits_and_every_gradient_match_transformers_within_1e_10(saved):
    name, hf, folder = saved
    tg.set_default_dtype(np.float64)
    ours = load_llama(folder)
    ids, targets = ids_and_targets(hf.config.vocab_size)
    their_logits, their_grads = hf_loss_and_grads(float64_throughout(hf), ids, targets)
    our_logits, our_grads = ours_loss_and_grads(ours, ids, targets)
    assert np.abs(their_logits).max() > 1.0  # logits far from zero, so 1e-10 is a real bound
    np.testing.assert_allclose(our_logits, their_logits, rtol=0, atol=1e-10)
    mapping = weight_map(ours.cfg)
    assert len(our_grads) == len(their_grads) == len(mapping)
    for ours_name, hf_name in mapping:
        np.testing.assert_allclose(our_grads[ours_name], their_grads[hf_name], rtol=0, atol=1e-10, err_msg=ours_name)


def test_float32_logits_match_transformers_as_it_is_within_1e_4(saved):
    name, hf, folder = saved
    ids, _ = ids_and_targets(hf.config.vocab_size)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    ours = load_llama(folder)(ids).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name, seed", [("llama-untied-gqa2", 0), ("llama3-scaling-mqa", 2), ("qwen3-qk-norm", 0)])
def test_greedy_generation_of_32_tokens_equals_transformers_generate(name, seed, tmp_path):
    from tinygpt.generate import generate

    hf = hf_model(name, seed)  # a seed whose continuation is not one token repeated
    hf.save_pretrained(tmp_path)
    tg.set_default_dtype(np.float64)
    ours = load_llama(tmp_path)
    prompt, _ = ids_and_targets(hf.config.vocab_size, batch=1, steps=5, seed=3)
    expected = float64_throughout(hf).generate(torch.from_numpy(prompt), max_new_tokens=32, do_sample=False,
                                                attention_mask=torch.ones_like(torch.from_numpy(prompt)),
                                                pad_token_id=0).numpy()
    assert expected.shape == (1, 37) and len(set(expected[0, 5:].tolist())) > 3
    for use_cache in (True, False):
        got = generate(ours, prompt, 32, context_size=64, use_cache=use_cache)
        np.testing.assert_array_equal(got, expected, err_msg=f"use_cache={use_cache}")


def test_greedy_generation_at_batch_3_equals_transformers_padded_batch(tmp_path):
    """Three prompts of equal length in one batch; and prompts of lengths 5, 3, 1, which
    transformers runs as one left-padded batch with an attention mask and tinygpt row by row
    (tinygpt's generate takes no padding mask): the same 32 tokens for every row."""
    from tinygpt.generate import generate

    hf = hf_model("qwen3-qk-norm")
    hf.save_pretrained(tmp_path)
    tg.set_default_dtype(np.float64)
    ours, theirs = load_llama(tmp_path), float64_throughout(hf)
    prompts, _ = ids_and_targets(hf.config.vocab_size, batch=3, steps=5, seed=4)
    expected = theirs.generate(torch.from_numpy(prompts), attention_mask=torch.ones(3, 5, dtype=torch.long),
                               max_new_tokens=32, do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(generate(ours, prompts, 32, context_size=64), expected)
    lengths = [5, 3, 1]
    padded = np.zeros((3, 5), dtype=np.int64)
    mask = np.zeros((3, 5), dtype=np.int64)
    for row, n in enumerate(lengths):
        padded[row, 5 - n:], mask[row, 5 - n:] = prompts[row, :n], 1
    expected = theirs.generate(torch.from_numpy(padded), attention_mask=torch.from_numpy(mask), max_new_tokens=32,
                               do_sample=False, pad_token_id=0).numpy()
    for row, n in enumerate(lengths):
        got = generate(ours, prompts[row:row + 1, :n], 32, context_size=64)
        np.testing.assert_array_equal(got[0, n:], expected[row, 5:], err_msg=f"row {row}")


@pytest.mark.parametrize("preset, cls", [("smollm2-135m", "LlamaForCausalLM"), ("qwen3-0.6b", "Qwen3ForCausalLM"),
                                         ("llama3.2-1b", "LlamaForCausalLM")])
def test_preset_parameter_counts_equal_transformers_built_on_the_meta_device(preset, cls):
    from tinygpt.hf_llama import config_to_hf

    cfg = LLAMA_PRESETS[preset]
    hf = config_to_hf(cfg)
    config = getattr(transformers, cls.replace("ForCausalLM", "Config"))(**{k: v for k, v in hf.items()
                                                                           if k not in ("architectures", "model_type")})
    with torch.device("meta"):  # no weights allocated
        model = getattr(transformers, cls)(config)
    expected = {"smollm2-135m": 134_515_008, "qwen3-0.6b": 596_049_920, "llama3.2-1b": 1_235_814_400}[preset]
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg) == expected


@pytest.mark.parametrize("name", ["llama-untied-gqa2", "qwen3-qk-norm", "llama3-scaling-mqa"])
def test_save_then_transformers_load_then_tinygpt_load_is_exact(name, tmp_path):
    tg.manual_seed(5)
    hf_cfg = CONFIGS[name][1]
    cfg = {"vocab_size": 61, "context_length": 64, "emb_dim": hf_cfg.get("hidden_size", 24), "n_heads": 4,
           "n_kv_heads": hf_cfg["num_key_value_heads"], "n_layers": 2, "hidden_dim": 40,
           "head_dim": hf_cfg.get("head_dim", 6), "qk_norm": name.startswith("qwen3"),
           "tie_weights": bool(hf_cfg.get("tie_word_embeddings")),
           "rope_scaling": {k: v for k, v in LLAMA3.items() if k != "rope_theta"} if "scaling" in name else None}
    model = LlamaModel(cfg)
    for p in model.parameters():
        p.data = p.data + 0.1 * tg.randn(*p.shape).data  # norm weights away from 1
    save_llama(model, tmp_path / "ours")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids, _ = ids_and_targets(61)
    with torch.no_grad():
        np.testing.assert_allclose(theirs(torch.from_numpy(ids)).logits.numpy(), model(ids).numpy(), rtol=0, atol=1e-4)
    theirs.save_pretrained(tmp_path / "theirs")
    again = load_llama(tmp_path / "theirs")
    for (n, p), (m, q) in zip(model.named_parameters(), again.named_parameters()):
        assert n == m and np.array_equal(p.numpy(), q.numpy()), n
    np.testing.assert_array_equal(again(ids).numpy(), model(ids).numpy())


def test_a_sharded_folder_loads_like_the_single_file(tmp_path):
    hf = hf_model("llama-untied-gqa2")
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "shards").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "shards" / "model.safetensors.index.json").exists()
    ids, _ = ids_and_targets(61)
    np.testing.assert_array_equal(load_llama(tmp_path / "shards")(ids).numpy(), load_llama(tmp_path / "one")(ids).numpy())


def test_bfloat16_weights_load_as_the_float32_transformers_converts_them_to(tmp_path):
    hf = hf_model("llama-tied-mha").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model = load_llama(tmp_path)
    for ours_name, hf_name in weight_map(model.cfg):
        expected = hf.state_dict()[hf_name].float().numpy()
        np.testing.assert_array_equal(dict(model.named_parameters())[ours_name].numpy(), expected)


# --- refused configs and broken folders: one line each ------------------------------------------

REFUSED = [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type='yarn' is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5 is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"mlp_bias": True}, "mlp_bias=True is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"model_type": "qwen2"}, "model_type='qwen2' is not supported"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, "quantization_config={"),
    ({"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
     "sliding_window=8 with use_sliding_window=true is not supported"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps=-1e-06 must be a number in (0, 1)"),
    ({"num_key_value_heads": 3}, "n_kv_heads=3 does not divide n_heads=4"),
    ({"head_dim": 5}, "head_dim=5 must be even"),
    ({"hidden_size": 0}, "hidden_size=0 must be a positive integer"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
     "rope_type 'llama3' needs low_freq_factor, high_freq_factor, original_max_position_embeddings"),
]


@pytest.mark.parametrize("fields, message", REFUSED, ids=[m.split(" ")[0] for _, m in REFUSED])
def test_each_unsupported_config_field_is_refused_in_one_line_naming_it(tmp_path, fields, message):
    hf_model("llama-untied-gqa2").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(HFConfigError) as e:
        load_llama(tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value) and str(tmp_path / "config.json") in str(e.value)


@pytest.mark.parametrize("fields", [{"use_sliding_window": False, "sliding_window": 8},
                                    {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}])
def test_a_qwen3_sliding_window_that_transformers_does_not_apply_is_accepted(tmp_path, fields):
    """Without use_sliding_window, or with every layer below max_window_layers, transformers'
    Qwen3 attends to the whole context: the same logits."""
    hf = hf_model("qwen3-qk-norm")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **fields}))
    ids, _ = ids_and_targets(61, steps=12)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        np.testing.assert_allclose(load_llama(tmp_path)(ids).numpy(), theirs(torch.from_numpy(ids)).logits.numpy(),
                                   rtol=0, atol=1e-4)


def test_mistral_sliding_window_shorter_than_the_context_caps_the_context(tmp_path):
    """Within sliding_window tokens Mistral's attention is plain causal attention."""
    hf_model("mistral-gqa2").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    assert load_llama(tmp_path).cfg["context_length"] == 16


def _broken(tmp_path, edit):
    hf_model("llama-untied-gqa2").save_pretrained(tmp_path, max_shard_size="20KB")
    edit(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        load_llama(tmp_path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_missing_shard_is_named(tmp_path):
    def remove_a_shard(folder):
        sorted(folder.glob("model-*.safetensors"))[1].unlink()
    message = _broken(tmp_path, remove_a_shard)
    assert "lists shard model-00002-of-" in message and "missing" in message


def _rewrite_index(folder, change):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    change(index["weight_map"])
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_a_missing_tensor_is_named_with_its_expected_shape(tmp_path):
    message = _broken(tmp_path, lambda f: _rewrite_index(f, lambda m: m.pop("model.layers.1.mlp.up_proj.weight")))
    assert "tensor model.layers.1.mlp.up_proj.weight is missing (expected shape (40, 24)" in message


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(tmp_path):
    def widen(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    message = _broken(tmp_path, widen)
    assert "tensor model.layers.0.mlp.gate_proj.weight has shape (40, 24), expected (48, 24)" in message


def test_an_unexpected_tensor_is_named(tmp_path):
    def tie(folder):  # a tied config does not expect lm_head, but a file with an extra tensor is refused
        _rewrite_index(folder, lambda m: m.update({"model.layers.0.self_attn.q_proj.bias": m["model.norm.weight"]}))
    message = _broken(tmp_path, tie)
    assert "tensor model.layers.0.self_attn.q_proj.bias is not part of this config's model" in message


def test_load_model_and_tokenizer_refuses_another_model_type_by_name(tmp_path):
    from tinygpt.pretrained import load_model_and_tokenizer

    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "qwen2"}))
    with pytest.raises(HFConfigError, match=r"model_type='qwen2' is not supported \(tinygpt loads llama, qwen3, mistral\)"):
        load_model_and_tokenizer(tmp_path)


def test_a_lora_finetuned_model_saves_with_its_adapters_merged(tmp_path):
    from tinygpt.finetune import replace_linear_with_lora

    hf_model("llama-untied-gqa2").save_pretrained(tmp_path / "base")
    model = replace_linear_with_lora(load_llama(tmp_path / "base"), rank=2, alpha=4)
    for p in model.parameters():
        if p.requires_grad:  # the adapters, as after some training
            p.data = p.data + 0.05 * tg.randn(*p.shape).data
    ids, _ = ids_and_targets(61)
    save_llama(model, tmp_path / "merged")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        np.testing.assert_allclose(theirs(torch.from_numpy(ids)).logits.numpy(), model(ids).numpy(), rtol=0, atol=1e-4)
    assert np.abs(load_llama(tmp_path / "merged")(ids).numpy() - load_llama(tmp_path / "base")(ids).numpy()).max() > 1e-2


def test_a_classifier_is_not_saved_as_a_causal_lm(tmp_path):
    from tinygpt.finetune.classify import make_classifier

    hf_model("llama-tied-mha").save_pretrained(tmp_path / "base")
    model = make_classifier(load_llama(tmp_path / "base"), num_classes=2)
    with pytest.raises(ValueError, match="classifier \\(num_classes=2\\)"):
        save_llama(model, tmp_path / "out")


def test_loading_holds_the_model_and_one_tensor_at_a_time_not_the_file_twice(tmp_path):
    """Weights are mapped from the file and converted one tensor at a time: the most memory
    allocated while loading is the model plus a few of its largest tensor (the random
    initialisation draws in float64), far from the model twice."""
    import tracemalloc

    config = transformers.LlamaConfig(**{**BASE, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 256,
                                         "num_hidden_layers": 8, "num_key_value_heads": 2, "tie_word_embeddings": False})
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    tracemalloc.start()
    try:
        model = load_llama(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = sum(p.data.nbytes for p in model.parameters())
    largest = max(p.data.nbytes for p in model.parameters())
    assert size > 2_000_000 and size > 8 * largest and peak < size + 2.5 * largest, (peak, size, largest)
