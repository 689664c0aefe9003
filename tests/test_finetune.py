"""Instruction data (book chapter 7) and LoRA (appendix E)."""
import json

import numpy as np
import pytest

import tinygpt as tg
import tinygpt.functional as F
from tinygpt import nn
from tinygpt.finetune import (InstructionDataset, LinearWithLoRA, extract_response, format_input, format_response,
                              instruction_collate, load_instruction_data, merge_lora, replace_linear_with_lora)
from tinygpt.model import GPT_CONFIG_124M, GPTModel
from conftest import SHARED_DATA, host

INSTRUCTIONS = SHARED_DATA / "instruction-data.json"
TINY = {"vocab_size": 29, "context_length": 8, "emb_dim": 12, "n_heads": 3, "n_layers": 2, "drop_rate": 0.0, "qkv_bias": False}


def needs(path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not found (shared test data)")


# ------------------------------------------------------------------ instruction data

def test_format_input_is_the_books_alpaca_prompt():
    entry = {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion",
             "output": "The correct spelling is 'Occasion.'"}
    assert format_input(entry) + format_response(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nIdentify the correct spelling of the following word."
        "\n\n### Input:\nOcassion"
        "\n\n### Response:\nThe correct spelling is 'Occasion.'")


def test_format_input_leaves_out_an_empty_input():
    text = format_input({"instruction": "What is an antonym of 'complicated'?", "input": "", "output": "simple"})
    assert "### Input" not in text and text.endswith("### Instruction:\nWhat is an antonym of 'complicated'?")


def test_collate_gives_the_books_example_exactly():
    inputs, targets = instruction_collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], pad_token_id=50256, ignore_index=-100)
    np.testing.assert_array_equal(inputs, [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]])
    np.testing.assert_array_equal(targets, [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]])
    assert inputs.dtype == targets.dtype == np.int64


def test_collate_truncates_to_allowed_max_length():
    inputs, targets = instruction_collate([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3)
    np.testing.assert_array_equal(inputs, [[0, 1, 2], [5, 6, 50256]])
    np.testing.assert_array_equal(targets, [[1, 2, 3], [6, 50256, -100]])


def test_collate_can_mask_the_prompt_so_only_the_response_is_scored():
    # prompt lengths 3 and 1: targets predicting prompt tokens 1..2 (row 0) are ignored
    _, targets = instruction_collate([[10, 11, 12, 13], [20, 21]], prompt_lengths=[3, 1])
    np.testing.assert_array_equal(targets, [[-100, -100, 13, 50256], [21, 50256, -100, -100]])


def test_ignored_targets_do_not_count_in_the_loss():
    _, targets = instruction_collate([[1, 2, 3], [4]], pad_token_id=0)
    logits = np.random.default_rng(0).standard_normal((2, 3, 5))
    loss = F.cross_entropy(tg.tensor(logits, dtype=np.float64), targets).item()
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    kept = [(r, c) for r in range(2) for c in range(3) if targets[r, c] != -100]
    assert len(kept) == 4  # row 0: 2, 3, end-of-text; row 1: end-of-text
    np.testing.assert_allclose(loss, -np.mean([logp[r, c, targets[r, c]] for r, c in kept]), rtol=1e-12)


@needs(INSTRUCTIONS)
def test_load_instruction_data_reads_the_books_file():
    records = load_instruction_data(INSTRUCTIONS)
    assert len(records) == 1100
    assert sum(1 for r in records if r["input"]) == 325


def test_load_instruction_data_names_the_file_and_record(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"input": "x", "output": "y"}]))
    with pytest.raises(ValueError, match=r"bad\.json: record 1 has no text for 'instruction'"):
        load_instruction_data(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match="non-empty"):
        load_instruction_data(path)


@needs(SHARED_DATA / "gpt2.tiktoken")
def test_instruction_dataset_tokenises_prompt_and_response():
    from tinygpt.data import gpt2_tokenizer

    tok = gpt2_tokenizer(SHARED_DATA / "gpt2.tiktoken")
    entry = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    ds = InstructionDataset([entry], tok)
    assert tok.decode(ds[0]) == format_input(entry) + format_response(entry)
    assert tok.decode(ds[0][:ds.prompt_length(0)]) == format_input(entry)


def test_extract_response_takes_the_text_after_the_marker():
    prompt = format_input({"instruction": "Add 2 and 2.", "input": ""})
    assert extract_response(prompt + "\n\n### Response:\nThe sum is 4.<|endoftext|>", prompt) == "The sum is 4."
    assert extract_response("\n\n### Response:\n  Yes. ") == "Yes."


# ------------------------------------------------------------------ LoRA

def test_lora_trainable_parameters_match_the_books_124m_classifier():
    model = GPTModel(GPT_CONFIG_124M)
    model.out_head = nn.Linear(768, 2)  # the chapter-6 classification head
    replace_linear_with_lora(model, rank=16, alpha=16)
    assert model.num_parameters(trainable_only=True) == 2_666_528


def test_lora_starts_as_the_base_model_and_trains_only_the_adapters(device):
    tg.manual_seed(1)
    model = GPTModel(TINY)
    ids = np.random.default_rng(0).integers(0, 29, (2, 8))
    before = host(model(ids))
    replace_linear_with_lora(model, rank=2, alpha=4)
    assert isinstance(model.trf_blocks[0].att.W_query, LinearWithLoRA)
    assert isinstance(model.trf_blocks[1].ff.layers[2], LinearWithLoRA) and isinstance(model.out_head, LinearWithLoRA)
    np.testing.assert_array_equal(host(model(ids)), before)  # B = 0: no change yet
    F.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).backward()
    for name, p in model.named_parameters():
        if ".lora." in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(np.abs(host(p.grad)).max() > 0 for name, p in model.named_parameters() if name.endswith(".lora.B"))


def test_lora_gradients_match_finite_differences(device):
    tg.manual_seed(2)
    model = replace_linear_with_lora(GPTModel(TINY), rank=2, alpha=3)
    rng = np.random.default_rng(3)
    for name, p in model.named_parameters():  # B != 0, so that A's gradient is not zero
        if ".lora." in name:
            p.data = tg.tensor(rng.standard_normal(p.shape) * 0.3, dtype=p.dtype).data
    ids = rng.integers(0, 29, (2, 6))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert tg.gradcheck(lambda *ps: F.cross_entropy(model(ids[:, :-1]), ids[:, 1:]), trainable,
                        atol=1e-7, rtol=1e-4, raise_exception=True)


def test_merge_lora_folds_adapters_into_weights_with_the_same_logits(device):
    tg.manual_seed(4)
    model = replace_linear_with_lora(GPTModel(TINY), rank=3, alpha=6)
    rng = np.random.default_rng(5)
    for name, p in model.named_parameters():
        if name.endswith(".lora.B"):
            p.data = tg.tensor(rng.standard_normal(p.shape) * 0.1, dtype=p.dtype).data
    ids = rng.integers(0, 29, (2, 8))
    with_adapters = host(model(ids))
    merge_lora(model)
    assert not any(".lora." in name for name, _ in model.named_parameters())
    assert isinstance(model.trf_blocks[0].att.W_query, nn.Linear)
    np.testing.assert_allclose(host(model(ids)), with_adapters, rtol=1e-5, atol=1e-5)
    assert np.abs(with_adapters - host(GPTModel(TINY)(ids))).max() > 1e-3  # the adapters did change the model


def test_lora_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        replace_linear_with_lora(GPTModel(TINY), rank=0, alpha=1)
