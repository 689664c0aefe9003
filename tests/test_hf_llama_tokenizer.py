"""Hugging Face tokenizers from a folder: ids equal transformers' on a byte-level BPE trained
here with `tokenizers`, the chat template rendered as transformers renders it, and
load_model_and_tokenizer on a Llama folder."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tinygpt.hf_tokenizer import load_hf_tokenizer

tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install -e '.[hf]')")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
pytest.importorskip("jinja2", reason="jinja2 is not installed (pip install -e '.[hf]')")

TEXT = ["hello world, the quick brown fox jumps over the lazy dog", "Ünïcödé and emoji 🦙 and\ttabs\n\nnew lines",
        "Mixed CASE words, numbers 12345 and punctuation!?"]
# a template in the style of real ones: a system default, roles, a generation prompt, raise_exception
TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{% set rest = messages[1:] %}{{ bos_token }}<|system|>"
            "{{ messages[0]['content'] | trim }}\n{% else %}{% set rest = messages %}{{ bos_token }}{% endif %}"
            "{% for m in rest %}{% if m['role'] not in ['user', 'assistant'] %}"
            "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
            "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def folder(tmp_path):
    """A byte-level BPE with a BOS-adding post-processor (as Llama 3's), saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(tmp_path)
    return tmp_path


def test_ids_and_text_equal_transformers_tokenizer(folder):
    ours, theirs = load_hf_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXT + ["unseen words: zebra quixotic", ""]:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids
        assert ids[:1] == [0]  # the post-processor's BOS
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True) == text
    assert ours.eot_token == theirs.eos_token_id == 1 and ours.n_vocab == len(theirs)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_as_transformers_renders_it(folder, messages, add_generation_prompt):
    ours, theirs = load_hf_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    assert expected.startswith("<|bos|>")


def test_a_template_in_tokenizer_config_json_is_read_too(folder):
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ messages[0]['content'] }}!"}))
    assert load_hf_tokenizer(folder).apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"


def test_a_template_error_and_a_missing_template_or_tokenizer_are_one_line(folder):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="unknown role tool"):
        load_hf_tokenizer(folder).apply_chat_template([{"role": "tool", "content": "x"}])
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="has no chat template"):
        load_hf_tokenizer(folder).apply_chat_template([{"role": "user", "content": "x"}])
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not a tokenizer") as e:
        load_hf_tokenizer(folder)
    assert "\n" not in str(e.value)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_hf_tokenizer(folder)


def test_load_model_and_tokenizer_reads_a_llama_folder_and_generates(folder):
    import torch

    from tinygpt.generate import generate
    from tinygpt.llama import LlamaModel
    from tinygpt.pretrained import load_model_and_tokenizer

    config = transformers.LlamaConfig(vocab_size=400, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    model, tokenizer = load_model_and_tokenizer(folder)
    assert isinstance(model, LlamaModel) and model.cfg["n_kv_heads"] == 2
    out = generate(model, np.array([tokenizer.encode("hello world")]), 5, 64)
    assert out.shape == (1, len(tokenizer.encode("hello world")) + 5) and isinstance(tokenizer.decode(out[0]), str)


@pytest.fixture
def llama_folder(folder):
    """folder's tokenizer beside a tiny random Llama of its vocabulary."""
    import torch

    config = transformers.LlamaConfig(vocab_size=400, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      eos_token_id=1, bos_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_chat_on_a_folder_prompts_with_its_template_as_transformers_tokenizes_it(llama_folder, monkeypatch, capsys):
    import tinygpt.finetune.instruct
    from tinygpt.cli import main

    prompts, generate = [], tinygpt.finetune.instruct.generate
    monkeypatch.setattr(tinygpt.finetune.instruct, "generate",
                        lambda model, ids, *a, **k: prompts.append(ids) or generate(model, ids, *a, **k))
    assert main(["chat", "--checkpoint", str(llama_folder), "Name a color.", "--input", "one word",
                 "--max-new-tokens", "4"]) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(llama_folder)
    expected = theirs.apply_chat_template([{"role": "user", "content": "Name a color.\n\none word"}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompts[0].tolist() == [list(expected)]
    assert capsys.readouterr().out.endswith("\n")


def test_generate_reads_a_llama_folder(llama_folder, capsys):
    from tinygpt.cli import main

    assert main(["generate", "--model", str(llama_folder), "--prompt", "hello world", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("hello world")
    # 2 (k, v) x 1 layer x 2 kv heads x 4 head size x 256 tokens x 4 bytes = 16384 bytes
    assert "KV cache 16.0 KB: 256 tokens x 1 layers x 2 of 4 heads" in err


def test_instruction_finetuning_a_llama_folder_with_lora_then_chatting_with_the_run(llama_folder, tmp_path, capsys):
    """finetune-instruct --init FOLDER: the folder's model and tokenizer.json train, the run's
    checkpoint keeps the tokenizer (ids as before), and chat answers from the run."""
    from tinygpt.checkpoint import load_checkpoint
    from tinygpt.cli import main

    records = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ["hello", "world", "fox", "dog"] * 3]
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    assert main(["finetune-instruct", "--init", str(llama_folder), "--data", str(tmp_path / "data.json"), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--lora-rank", "2", "--eval-freq", "1", "--eval-iter", "1",
                 "--responses", "1", "--max-new-tokens", "3", "--no-progress"]) == 0
    checkpoint = load_checkpoint(out, optimizer=False)
    original = load_hf_tokenizer(llama_folder)
    assert checkpoint.tokenizer.encode(TEXT[1]) == original.encode(TEXT[1])
    assert checkpoint.tokenizer.chat_template == original.chat_template and checkpoint.model.cfg["arch"] == "llama"
    assert main(["chat", "--checkpoint", str(out), "Say fox.", "--max-new-tokens", "3"]) == 0


def test_classification_finetuning_a_llama_folder_and_labelling_with_the_run(llama_folder, tmp_path, capsys):
    from tinygpt.cli import main

    rows = ["Text,Label"] + [f"quick brown fox {i},fox" for i in range(8)] + [f"lazy dog {i},dog" for i in range(8)]
    (tmp_path / "data.csv").write_text("\n".join(rows))
    out = str(tmp_path / "run")
    assert main(["finetune-classify", "--init", str(llama_folder), "--data", str(tmp_path / "data.csv"), "--text-column",
                 "Text", "--label-column", "Label", "--out", out, "--max-steps", "2", "--batch-size", "2",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["classify", "--checkpoint", out, "the lazy dog"]) == 0
    label = capsys.readouterr().out.split("\t")[0]
    assert label in ("fox", "dog")
