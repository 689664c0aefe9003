"""tg.compare and `tinygpt compare --hf`: module by module against transformers, stopping at the
first output (or gradient) beyond tolerance; `tinygpt info --model` for the Llama presets."""
from __future__ import annotations

import numpy as np
import pytest

import tinygpt as tg
from tinygpt.compare import compare
from tinygpt.hf_llama import load_llama

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
torch = pytest.importorskip("torch", reason="torch is not installed")
from test_hf_llama import hf_model  # noqa: E402  (needs transformers)

IDS = np.random.default_rng(0).integers(0, 61, size=(2, 7))


@pytest.fixture
def pair(tmp_path):
    hf = hf_model("qwen3-qk-norm")
    hf.save_pretrained(tmp_path)
    return load_llama(tmp_path), hf, tmp_path


def test_a_faithful_model_agrees_everywhere_forward_and_backward(pair):
    ours, hf, _ = pair
    report = tg.compare(ours, hf, IDS, backward=True)
    assert report.first_divergence is None
    forward = [r.module for r in report.rows if r.phase == "forward"]
    backward = [r.module for r in report.rows if r.phase == "backward"]
    assert forward[0] == "tok_emb" and forward[-1] == "out_head" and "trf_blocks.1.att.k_norm" in forward
    assert backward[0] == "out_head" and backward[-1] == "tok_emb"
    assert len(forward) == 31 and "agree within the float32 tolerance" in report.table()


def test_qk_norm_outputs_are_compared_head_for_head_when_tokens_equal_heads(pair):
    """transformers' q_norm sees [B, T, H, D], ours [B, H, T, D]: with T = H = 4 the shapes agree
    but the layouts do not (a comparison by shape alone reported a divergence of 3.6 here)."""
    ours, hf, _ = pair
    report = compare(ours, hf, IDS[:, :4])
    assert report.first_divergence is None and "trf_blocks.1.att.q_norm" in [r.module for r in report.rows]


def test_a_wrong_weight_is_found_at_its_module_and_nothing_after_it_is_listed(pair):
    ours, hf, _ = pair
    ours.trf_blocks[1].att.k_norm.weight.data[0] += 0.01
    report = compare(ours, hf, IDS)
    first = report.first_divergence
    assert first.module == "trf_blocks.1.att.k_norm" and first.hf_module == "model.layers.1.self_attn.k_norm"
    assert report.rows[-1] is first and all(r.ok for r in report.rows[:-1])
    assert "trf_blocks.1.att.k_norm (model.layers.1.self_attn.k_norm in transformers) differs by" in report.table()


def test_a_wrong_backward_is_found_in_the_backward_phase(pair, monkeypatch):
    """A bug only in RMSNorm's backward: every output agrees, the first gradient that passes
    through a wrong RMSNorm backward is flagged (the gradient at the input of final_norm is
    the output gradient of trf_blocks.1, the first module after it in backward order)."""
    from tinygpt import dispatch
    from tinygpt.functional.norms import RMSNorm

    ours, hf, _ = pair
    running = dispatch.implementation(RMSNorm, ours.final_norm.weight.data)  # the plain op or its fast version
    backward = running.backward
    monkeypatch.setattr(running, "backward", staticmethod(lambda ctx, g: tuple(x * 1.01 for x in backward(ctx, g))))
    report = compare(ours, hf, IDS, backward=True)
    assert all(r.ok for r in report.rows if r.phase == "forward")
    assert report.first_divergence.phase == "backward" and report.first_divergence.module == "trf_blocks.1"


def test_gpt2_models_compare_too(tmp_path):
    from tinygpt.pretrained import load_gpt2

    config = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=12, n_layer=2, n_head=3)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    report = compare(load_gpt2(tmp_path), hf, IDS, backward=True)
    assert report.first_divergence is None
    assert {"trf_blocks.0.ff.layers.1", "pos_emb", "final_norm"} <= {r.module for r in report.rows}


def test_the_compare_command_prints_the_table_and_exits_0(pair, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tinygpt.cli import main

    _, _, folder = pair
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the quick brown fox"] * 5, trainers.BpeTrainer(vocab_size=61, special_tokens=["<eos>"],
                                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:40]))
    tok.save(str(folder / "tokenizer.json"))
    assert main(["compare", "--hf", str(folder), "--prompt", "the fox", "--backward"]) == 0
    out = capsys.readouterr().out
    assert "trf_blocks.1.att.k_norm" in out and "backward out_head" in out and "agree within the float32 tolerance" in out


def test_the_compare_command_without_a_folder_is_one_line(tmp_path, capsys):
    from tinygpt.cli import main

    assert main(["compare", "--hf", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("name, total", [("smollm2-135m", "134,515,008"), ("qwen3-0.6b", "596,049,920"),
                                         ("llama3.2-1b", "1,235,814,400")])
def test_info_prints_a_llama_presets_parameter_count(name, total, capsys):
    from tinygpt.cli import main

    assert main(["info", "--model", name]) == 0
    out = capsys.readouterr().out
    assert f"total{' ' * 20}" in out and total in out and "kv heads" in out
