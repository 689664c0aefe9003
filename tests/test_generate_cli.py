"""`tinygpt generate`: a Hugging Face GPT-2 folder with the GPT-2 tokenizer, a training
checkpoint with a char tokenizer, streaming, seeded sampling, --no-cache, and errors."""
import sys

import numpy as np
import pytest

import tinygpt as tg
from tinygpt.checkpoint import load_checkpoint, save_checkpoint
from tinygpt.cli import main
from tinygpt.data import CharTokenizer, gpt2_tokenizer
from tinygpt.generate import generate, text_to_token_ids
from tinygpt.model import GPTModel
from tinygpt.pretrained import load_gpt2
from conftest import SHARED_DATA
from test_pretrained import hf_config, hf_tensors, write_hf_gpt2

GPT2_FILE = SHARED_DATA / "gpt2.tiktoken"
PROMPT = "Hello, I am"
TEXT = "the quick brown fox jumps over the lazy dog. "


@pytest.fixture
def gpt2_folder(tmp_path):
    """A tiny GPT-2 in Hugging Face layout with GPT-2's real vocabulary, so its tokenizer fits."""
    if not GPT2_FILE.exists():
        pytest.skip(f"{GPT2_FILE} is missing")
    shape = {"vocab": 50257, "ctx": 32, "emb": 8, "layers": 1}
    return write_hf_gpt2(tmp_path / "tiny-gpt2", hf_tensors(seed=5, **shape), hf_config(heads=2, **shape))


@pytest.fixture
def char_checkpoint(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    tg.manual_seed(11)
    model = GPTModel({"vocab_size": tok.n_vocab, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
                      "drop_rate": 0.0, "qkv_bias": False})
    save_checkpoint(tmp_path / "run", 1, model, tok)
    return tmp_path / "run"


def run_generate(capsys, *args):
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_from_a_hf_folder_prints_the_prompt_and_the_greedy_continuation(gpt2_folder, capsys):
    code, out, err = run_generate(capsys, "--model", str(gpt2_folder), "--prompt", PROMPT, "--max-new-tokens", "5",
                                  "--bpe-file", str(GPT2_FILE))
    assert code == 0, err
    tok = gpt2_tokenizer(GPT2_FILE)
    model = load_gpt2(gpt2_folder)
    prompt = text_to_token_ids(PROMPT, tok)
    assert prompt.tolist() == [[15496, 11, 314, 716]]
    ids = generate(model, prompt, 5, model.cfg["context_length"], eos_id=tok.eot_token)
    assert ids.shape[1] > 4
    assert out == PROMPT + tok.decode(ids[0, 4:].tolist()) + "\n"
    assert "tokens in" in err and "Traceback" not in err


def test_generate_from_a_training_checkpoint_streams_one_character_per_token(char_checkpoint, monkeypatch):
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Recorder())
    assert main(["generate", "--checkpoint", str(char_checkpoint), "--prompt", "the ", "--max-new-tokens", "12"]) == 0
    ck = load_checkpoint(char_checkpoint)
    ids = generate(ck.model, text_to_token_ids("the ", ck.tokenizer), 12, ck.model.cfg["context_length"])
    expected = ck.tokenizer.decode(ids[0, 4:].tolist())
    assert writes[0] == "the "
    # streamed as generated, one write per token (an unknown-character id decodes to "<unk>")
    assert writes[1:13] == [ck.tokenizer.decode([i]) for i in ids[0, 4:].tolist()]
    assert "".join(writes) == "the " + expected + "\n"


def test_sampling_is_reproducible_with_a_seed_and_differs_with_another(char_checkpoint, capsys):
    sample = ["--checkpoint", str(char_checkpoint), "--prompt", "the ", "--max-new-tokens", "30",
              "--temperature", "0.8", "--top-k", "5"]
    first = run_generate(capsys, *sample, "--seed", "1")
    second = run_generate(capsys, *sample, "--seed", "1")
    other = run_generate(capsys, *sample, "--seed", "2")
    assert first[0] == second[0] == other[0] == 0
    assert first[1] == second[1]
    assert first[1] != other[1]
    greedy = run_generate(capsys, "--checkpoint", str(char_checkpoint), "--prompt", "the ", "--max-new-tokens", "30")
    assert first[1] != greedy[1]
    assert "[30 tokens in" in first[2]  # all 30 generated (an unknown-character id prints as "<unk>")


@pytest.mark.parametrize("new_tokens", ["5", "30"])  # 30 slides the 16-token window of the char model
def test_no_cache_gives_the_same_greedy_text(char_checkpoint, capsys, new_tokens):
    greedy = ["--checkpoint", str(char_checkpoint), "--prompt", "the lazy ", "--max-new-tokens", new_tokens]
    cached = run_generate(capsys, *greedy)
    recomputed = run_generate(capsys, *greedy, "--no-cache")
    assert cached[0] == recomputed[0] == 0
    assert cached[1] == recomputed[1]


def test_no_cache_gives_the_same_greedy_text_for_a_hf_folder(gpt2_folder, capsys):
    greedy = ["--model", str(gpt2_folder), "--prompt", PROMPT, "--max-new-tokens", "8", "--bpe-file", str(GPT2_FILE)]
    cached = run_generate(capsys, *greedy)
    recomputed = run_generate(capsys, *greedy, "--no-cache")
    assert cached[0] == recomputed[0] == 0
    assert cached[1] == recomputed[1]


def test_an_unknown_model_name_exits_1_with_a_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_generate(capsys, "--model", "gpt5-tiny", "--prompt", PROMPT)
    assert code == 1
    assert err.startswith("tinygpt: error:") and "gpt5-tiny" in err and "gpt2-medium" in err
    assert "Traceback" not in err and out == ""
