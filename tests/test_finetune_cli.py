"""`tinygpt finetune-classify`, `classify`, `finetune-instruct` and `chat`: tiny models end to
end, LoRA, exact resume, and error messages for bad input. No network: GPT-2's BPE ranks
come from the shared data folder, and the "pretrained" models are tiny ones saved here."""
import csv
import io
import json
import re
import sys

import numpy as np
import pytest

import tinygpt as tg
from tinygpt import nn
from tinygpt.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from tinygpt.cli import main
from tinygpt.data import CharTokenizer, encode_text, gpt2_tokenizer
from tinygpt.finetune.classify import (ClassificationDataset, calc_accuracy, classify, make_classifier, random_split,
                                       read_labelled_file)
from tinygpt.finetune.instruct import RESPONSE_MARKER, format_input, generate_response
from tinygpt.finetune.lora import LinearWithLoRA
from tinygpt.generate import generate
from tinygpt.model import GPTModel
from tinygpt.pretrained import save_gpt2
from tinygpt.throughput import without_timing
from conftest import SHARED_DATA, host

GPT2_FILE = SHARED_DATA / "gpt2.tiktoken"
INSTRUCTIONS = SHARED_DATA / "instruction-data.json"
ALPHABET = "abcdefghijklmnopqrstuvwxyz "
CHAR_CFG = {"context_length": 64, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0, "qkv_bias": False}
GPT2_CFG = {"vocab_size": 50257, "context_length": 128, "emb_dim": 16, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0}
# the book's lr (5e-5) is for a pretrained GPT-2; a random tiny model needs far more to move in a few steps
FAST = ["--no-progress", "--lr", "1e-2", "--eval-freq", "10", "--eval-iter", "2"]
INSTRUCT_FAST = ["--no-progress", "--lr", "1e-2", "--batch-size", "2", "--eval-iter", "1", "--sample-tokens", "3"]


def toy_rows(n=160, names=("ham", "spam"), seed=0):
    """A separable problem: the second label's texts hold the word "win", the first's "hello"."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "sigma"]
    rows = []
    for i in range(n):
        label = names[i % 2]
        w = list(rng.choice(words, size=rng.integers(2, 5)))
        w.insert(int(rng.integers(0, len(w) + 1)), "win" if label == names[1] else "hello")
        rows.append((" ".join(w), label))
    return rows


def write_csv(path, rows, header=("Text", "Label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def save_char_base(run_dir, drop_rate=0.0):
    """A tiny `tinygpt train`-style checkpoint with a character tokenizer (no end-of-text)."""
    tok = CharTokenizer.from_text(ALPHABET)
    tg.manual_seed(0)
    save_checkpoint(run_dir, 0, GPTModel({**CHAR_CFG, "vocab_size": tok.n_vocab, "drop_rate": drop_rate}), tok)
    return run_dir


@pytest.fixture
def char_base(tmp_path):
    return save_char_base(tmp_path / "base")


@pytest.fixture
def toy_csv(tmp_path):
    return write_csv(tmp_path / "toy.csv", toy_rows())


@pytest.fixture
def hf_base(tmp_path):
    """A tiny GPT-2 as a Hugging Face folder (qkv bias, tied head, as GPT-2), for the GPT-2 tokenizer."""
    if not GPT2_FILE.exists():
        pytest.skip(f"{GPT2_FILE} not present (shared test data)")
    tg.manual_seed(0)
    return save_gpt2(GPTModel({**GPT2_CFG, "qkv_bias": True, "tie_weights": True}), tmp_path / "hf-gpt2")


@pytest.fixture
def instruction_file(tmp_path):
    """The first 40 records of the book's instruction data: 34 train / 2 val / 4 test."""
    if not INSTRUCTIONS.exists():
        pytest.skip(f"{INSTRUCTIONS} not present (shared test data)")
    records = json.loads(INSTRUCTIONS.read_text(encoding="utf-8"))[:40]
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def printed_accuracy(out):
    match = re.search(r"accuracy: train ([\d.]+)%, val ([\d.]+)%, test ([\d.]+)%", out)
    assert match, out
    return {"train": float(match[1]), "val": float(match[2]), "test": float(match[3])}


def classify_lines(out):
    """(label, {label: probability as printed}, text) of each line `tinygpt classify` printed."""
    lines = []
    for line in out.splitlines():
        label, probs, text = line.split("\t")  # "spam\tham 0.002  spam 0.998\tthe text"
        lines.append((label, dict(pair.split(" ") for pair in probs.split("  ")), text))
    return lines


def history(run_dir):
    return json.loads((run_dir / "history.json").read_text())


def lora_count(model, rank):
    """rank * (in + out) for every Linear layer: what LoRA trains."""
    return sum(rank * (m.in_features + m.out_features) for _, m in model.named_modules() if isinstance(m, nn.Linear))


# ------------------------------------------------------------------ finetune-classify and classify

def test_finetune_classify_learns_a_toy_problem_and_classify_uses_the_saved_labels(char_base, tmp_path, capsys):
    data = write_csv(tmp_path / "toy.csv", toy_rows(names=("ok", "junk")), header=("message", "kind"))
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "finetune-classify", "--data", data, "--init", char_base, "--out", run,
                             "--text-column", "message", "--label-column", "kind", "--epochs", "5", *FAST)
    assert code == 0, err
    assert "labels ['junk', 'ok']; 112 train / 16 val / 32 test" in out
    assert "trainable parameters: " in out and "(LoRA adapters)" not in out
    losses = history(run)["train_loss"]
    assert history(run)["step"] == [1, 11, 21, 31, 41, 51, 61] and losses[-1] < losses[0] / 5, losses
    printed = printed_accuracy(out)
    assert printed["test"] >= 90, out

    ck = load_checkpoint(run)
    meta = ck.trainer_state["meta"]
    assert ck.trainer_state["step"] == 5 * (112 // 8)
    assert meta["task"] == "classify" and meta["labels"] == ["junk", "ok"]
    assert (meta["text_column"], meta["label_column"], meta["data"]) == ("message", "kind", str(data))
    # the reloaded model scores the held-out texts as the trained one did
    texts, labels = read_labelled_file(data, "message", "kind")
    _, _, test = random_split(len(texts), 0.7, 0.1, seed=123)
    test_set = ClassificationDataset([texts[i] for i in test], [labels[i] for i in test], ck.tokenizer, meta["labels"],
                                     meta["max_length"], pad_token_id=0)
    assert f"{calc_accuracy(test_set, ck.model):.1%}" == f"{printed['test']:.1f}%"

    code, out, err = run_cli(capsys, "classify", "--checkpoint", run, "gamma win beta", "hello delta kappa")
    assert code == 0, err
    lines = classify_lines(out)
    assert [(label, text) for label, _, text in lines] == [("junk", "gamma win beta"), ("ok", "hello delta kappa")]
    for label, probs, text in lines:
        expected_label, expected = classify(text, ck.model, ck.tokenizer, meta["labels"], meta["max_length"])
        assert label == expected_label
        assert probs == {name: f"{p:.3f}" for name, p in expected.items()}


def test_finetune_classify_with_lora_trains_only_the_adapters_and_the_checkpoint_reloads_them(char_base, toy_csv,
                                                                                                tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "finetune-classify", "--data", toy_csv, "--init", char_base, "--out", run,
                             "--lora-rank", "2", "--max-steps", "30", *FAST)
    assert code == 0, err
    classifier = make_classifier(load_checkpoint(char_base).model, 2)
    adapters = lora_count(classifier, rank=2)
    # 2 blocks x (4 x 2(16+16) + 2(16+64) + 2(64+16)) + head 2(16+2)
    assert adapters == 2 * (4 * 64 + 160 + 160) + 36 == 1188
    assert f"trainable parameters: {adapters:,} of {classifier.num_parameters() + adapters:,} (LoRA adapters)" in out

    ck = load_checkpoint(run)
    assert ck.model.cfg["lora"] == {"rank": 2, "alpha": 16.0} and ck.trainer_state["meta"]["lora"] == ck.model.cfg["lora"]
    assert isinstance(ck.model.trf_blocks[0].att.W_query, LinearWithLoRA) and isinstance(ck.model.out_head, LinearWithLoRA)
    assert ck.model.num_parameters(trainable_only=True) == adapters
    base = load_checkpoint(char_base).model.state_dict()
    for name, p in ck.model.named_parameters():
        if ".lora." not in name and not name.startswith("out_head."):  # the frozen pretrained weights did not move
            np.testing.assert_array_equal(host(p), host(base[name.replace(".linear.", ".")]), err_msg=name)
    assert max(np.abs(host(p)).max() for name, p in ck.model.named_parameters() if name.endswith(".lora.B")) > 0

    meta = ck.trainer_state["meta"]
    texts = ["gamma win beta", "hello delta kappa"]
    code, out, err = run_cli(capsys, "classify", "--checkpoint", run, *texts)
    assert code == 0, err
    for (label, probs, text), expected_text in zip(classify_lines(out), texts):
        expected_label, expected = classify(text, ck.model, ck.tokenizer, meta["labels"], meta["max_length"])
        assert text == expected_text and label == expected_label  # classify merges the adapters: same answer
        assert probs == {name: f"{p:.3f}" for name, p in expected.items()}


@pytest.mark.parametrize("how", [["--lora-rank", "2"], ["--trainable-blocks", "1"]], ids=["lora", "top-block"])
def test_an_interrupted_and_resumed_classifier_run_ends_like_a_straight_run(toy_csv, tmp_path, capsys, how):
    base = save_char_base(tmp_path / "base", drop_rate=0.1)  # dropout: the resumed run must restore the RNG too
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--data", toy_csv, "--init", base, *how, *FAST]
    code, straight_out, err = run_cli(capsys, "finetune-classify", *common, "--out", straight, "--max-steps", "20")
    assert code == 0, err
    assert run_cli(capsys, "finetune-classify", *common, "--out", split, "--max-steps", "10")[0] == 0
    assert resolve_checkpoint(split).name == "step_000010"
    code, out, err = run_cli(capsys, "finetune-classify", "--resume", split, "--max-steps", "20", "--no-progress")
    assert code == 0, err
    assert f"resuming {split / 'checkpoints' / 'step_000010'} at step 10" in out
    assert resolve_checkpoint(split).name == "step_000020"  # 14 batches an epoch: the resumed part crosses an epoch
    assert without_timing(history(split)) == without_timing(history(straight))
    a, b = load_checkpoint(split), load_checkpoint(straight)
    assert a.model.cfg == b.model.cfg
    for name, tensor in b.model.state_dict().items():
        assert np.array_equal(host(a.model.state_dict()[name]), host(tensor)), name
    assert printed_accuracy(out) == printed_accuracy(straight_out)


def test_finetune_classify_from_a_hugging_face_folder_uses_the_gpt2_tokenizer(hf_base, toy_csv, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setenv("TINYGPT_BPE_FILE", str(GPT2_FILE))
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "finetune-classify", "--data", toy_csv, "--init", hf_base, "--out", run,
                             "--max-steps", "2", *FAST)
    assert code == 0, err
    tok = gpt2_tokenizer(GPT2_FILE)
    texts, _ = read_labelled_file(toy_csv, "Text", "Label")
    train, _, _ = random_split(len(texts), 0.7, 0.1, seed=123)
    longest = max(len(tok.encode(texts[i])) for i in train)
    assert f"padded to {longest} tokens" in out
    ck = load_checkpoint(run)
    assert ck.tokenizer.name == "gpt2" and ck.trainer_state["meta"]["max_length"] == longest
    assert ck.model.cfg["num_classes"] == 2 and ck.model.cfg["qkv_bias"] is True
    code, out, err = run_cli(capsys, "classify", "--checkpoint", run, "hello alpha")
    assert code == 0, err
    assert classify_lines(out)[0][0] in ("ham", "spam") and classify_lines(out)[0][2] == "hello alpha"


def test_finetune_classify_measures_text_length_as_the_dataset_encodes_it(hf_base, tmp_path, capsys):
    # the dataset lets "<|endoftext|>" through as the special token; measuring the longest
    # text must do the same instead of refusing the text
    data = write_csv(tmp_path / "eot.csv", [(f"{text} <|endoftext|> more", label) for text, label in toy_rows(40)])
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "finetune-classify", "--data", data, "--init", hf_base, "--out", run,
                           "--bpe-file", GPT2_FILE, "--max-steps", "1", *FAST)
    assert code == 0, err
    texts, _ = read_labelled_file(data, "Text", "Label")
    train, _, _ = random_split(len(texts), 0.7, 0.1, seed=123)
    longest = max(len(encode_text(gpt2_tokenizer(GPT2_FILE), texts[i])) for i in train)
    assert load_checkpoint(run, bpe_file=GPT2_FILE).trainer_state["meta"]["max_length"] == longest


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("name, text, message", [
    ("columns.csv", "Text,Kind\nhello,ham\nwin,spam\n", "columns.csv has no column 'Label'; its columns are ['Text', 'Kind']"),
    ("empty.csv", "", "empty.csv is empty"),
    ("header.csv", "Text,Label\n", "header.csv has a header but no rows"),
    ("blank.csv", "Text,Label\nhello,ham\n,spam\n", "blank.csv, line 3: empty text"),
    ("one-label.csv", "Text,Label\nhello,ham\nhi there,ham\n",
     "column 'Label' has only one label, 'ham'; a classifier needs at least 2"),
])
def test_finetune_classify_names_the_file_and_the_problem_of_bad_data(char_base, tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "finetune-classify", "--data", path, "--init", char_base, "--out", out, "--no-progress")
    assert code == 1
    assert str(path) in err and message in err, err
    assert "Traceback" not in err and not out.exists()


def test_finetune_classify_needs_data_unless_resuming_and_refuses_to_reuse_a_run(char_base, toy_csv, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "finetune-classify", "--init", char_base, "--out", run, "--no-progress")
    assert code == 2 and "--data FILE is required (unless --resume DIR)" in err
    assert run_cli(capsys, "finetune-classify", "--data", toy_csv, "--init", char_base, "--out", run, "--max-steps", "1",
                   *FAST)[0] == 0
    latest = (run / "latest").read_text()
    code, _, err = run_cli(capsys, "finetune-classify", "--data", toy_csv, "--init", char_base, "--out", run, *FAST)
    assert code == 2 and f"{run} already holds a run; continue it with --resume {run}" in err
    assert (run / "latest").read_text() == latest
    code, _, err = run_cli(capsys, "finetune-instruct", "--resume", run, "--no-progress")
    assert code == 2 and f"{run} is not a instruct run (its task is 'classify')" in err
    assert "finetune-classify --resume" in err


def test_finetune_classify_resumed_on_other_data_says_so_and_refuses_new_labels(char_base, toy_csv, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "finetune-classify", "--data", toy_csv, "--init", char_base, "--out", run, "--max-steps", "2",
                   *FAST)[0] == 0
    other = write_csv(tmp_path / "other.csv", toy_rows(seed=1))
    code, out, err = run_cli(capsys, "finetune-classify", "--resume", run, "--data", other, "--max-steps", "4", "--no-progress")
    assert code == 0, err
    assert f"continuing on {other} instead of {toy_csv}" in out
    assert load_checkpoint(run).trainer_state["meta"]["data"] == str(other)
    relabelled = write_csv(tmp_path / "relabelled.csv", toy_rows(names=("ham", "eggs")))
    code, _, err = run_cli(capsys, "finetune-classify", "--resume", run, "--data", relabelled, "--max-steps", "6",
                           "--no-progress")
    assert code == 2 and "labels the classifier was not built for: ['eggs']" in err, err


@pytest.mark.parametrize("option, exit_code, message", [
    (["--lora-rank", "0"], 2, "--lora-rank: must be >= 1, got 0"),
    (["--trainable-blocks", "3"], 1, "trainable_blocks is 3 but the model has 2 transformer blocks"),
])
def test_finetune_classify_refuses_impossible_settings(char_base, toy_csv, tmp_path, capsys, option, exit_code, message):
    code, _, err = run_cli(capsys, "finetune-classify", "--data", toy_csv, "--init", char_base, "--out", tmp_path / "run",
                           *option, "--no-progress")
    assert code == exit_code and message in err, err
    assert not (tmp_path / "run").exists()


def test_init_that_is_neither_a_model_name_nor_a_folder_is_named(toy_csv, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    code, _, err = run_cli(capsys, "finetune-classify", "--data", toy_csv, "--init", missing, "--out", tmp_path / "run",
                           "--no-progress")
    assert code == 1 and f"{missing} is neither one of gpt2" in err, err


def test_classify_refuses_a_checkpoint_that_is_not_a_classifier(char_base, tmp_path, capsys):
    code, _, err = run_cli(capsys, "classify", "--checkpoint", char_base, "some text")
    assert code == 2
    assert f"{resolve_checkpoint(char_base)} is not a classifier from `tinygpt finetune-classify`" in err, err
    assert "tinygpt generate --checkpoint" in err
    missing = tmp_path / "nothing-here"
    code, _, err = run_cli(capsys, "classify", "--checkpoint", missing, "some text")
    assert code == 2 and f"--checkpoint: no such file or folder: {missing}" in err, err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "classify", "--checkpoint", empty, "some text")
    assert code == 1 and f"no checkpoint in {empty}" in err, err


def test_missing_required_arguments_are_usage_errors(capsys):
    assert main(["classify", "some text"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["finetune-classify", "--lora-rank", "two"]) == 2
    assert "--lora-rank: expected an integer, got 'two'" in capsys.readouterr().err


def test_finetune_instruct_refuses_a_tokenizer_without_end_of_text(char_base, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 20))
    code, _, err = run_cli(capsys, "finetune-instruct", "--data", data, "--init", char_base, "--out", tmp_path / "run",
                           "--no-progress")
    assert code == 1
    assert f"{char_base} uses a CharTokenizer, which has none" in err, err
    assert not (tmp_path / "run").exists()


def test_finetune_instruct_names_the_file_and_the_record_without_an_instruction(hf_base, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}, {"input": "x", "output": "y"}]))
    code, _, err = run_cli(capsys, "finetune-instruct", "--data", data, "--init", hf_base, "--out", tmp_path / "run",
                           "--bpe-file", GPT2_FILE, "--no-progress")
    assert code == 1
    assert f"{data}: record 1 has no text for 'instruction'" in err, err


# ------------------------------------------------------------------ finetune-instruct and chat

def save_gpt2_tokenizer_base(run_dir, context_length=128):
    """A tiny `tinygpt train`-style checkpoint with GPT-2's tokenizer (named, not copied)."""
    if not GPT2_FILE.exists():
        pytest.skip(f"{GPT2_FILE} not present (shared test data)")
    tg.manual_seed(0)
    model = GPTModel({**GPT2_CFG, "context_length": context_length, "qkv_bias": False})
    save_checkpoint(run_dir, 0, model, gpt2_tokenizer(GPT2_FILE))
    return run_dir


def answer(model, tokenizer, instruction, max_new_tokens):
    """What `chat` should print for one instruction: the greedy continuation of the prompt
    and response marker, up to (not including) end-of-text."""
    prompt = format_input({"instruction": instruction, "input": ""}) + f"\n\n{RESPONSE_MARKER}\n"
    ids = tokenizer.encode(prompt)
    new = host(generate(model, np.array([ids]), max_new_tokens, model.cfg["context_length"], eos_id=tokenizer.eot_token))
    new = new[0, len(ids):].tolist()
    return tokenizer.decode(new[:new.index(tokenizer.eot_token)] if tokenizer.eot_token in new else new)


def test_finetune_instruct_end_to_end_writes_held_out_responses_and_chat_answers(hf_base, instruction_file, tmp_path,
                                                                                  capsys, monkeypatch):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "finetune-instruct", "--data", instruction_file, "--init", hf_base, "--out", run,
                             "--bpe-file", GPT2_FILE, "--max-steps", "8", "--eval-freq", "7", "--responses", "2",
                             "--max-new-tokens", "5", *INSTRUCT_FAST)
    assert code == 0, err
    assert "34 train / 2 val / 4 test records" in out
    assert f"answering 2 held-out instructions into {run / 'test-responses.json'}" in out
    h = history(run)
    assert h["step"] == [1, 8]
    assert h["train_loss"][-1] < h["train_loss"][0] - 1 and h["val_loss"][-1] < h["val_loss"][0] - 1, h

    ck = load_checkpoint(run, bpe_file=GPT2_FILE)
    assert ck.trainer_state["meta"]["task"] == "instruct" and ck.trainer_state["step"] == 8
    records = json.loads(instruction_file.read_text())
    answered = json.loads((run / "test-responses.json").read_text(encoding="utf-8"))
    assert len(answered) == 2
    for entry, original in zip(answered, records[34:36]):  # the test split follows the 34 training records
        assert {k: v for k, v in entry.items() if k != "model_response"} == original
        assert entry["model_response"] == generate_response(ck.model, ck.tokenizer, original, 5)

    code, out, err = run_cli(capsys, "chat", "--checkpoint", run, "--bpe-file", GPT2_FILE, "--max-new-tokens", "5",
                             "Name a primary color.")
    assert code == 0, err
    expected = answer(ck.model, ck.tokenizer, "Name a primary color.", 5)
    assert expected and out == expected + "\n"

    monkeypatch.setenv("TINYGPT_BPE_FILE", str(GPT2_FILE))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name a primary color.\n\n  Say hi.  \n"))
    code, out, err = run_cli(capsys, "chat", "--checkpoint", run, "--max-new-tokens", "5")
    assert code == 0, err
    assert out == expected + "\n" + answer(ck.model, ck.tokenizer, "Say hi.", 5) + "\n"  # the blank line is skipped


def test_finetune_instruct_with_lora_and_mask_prompt_from_a_tinygpt_checkpoint(instruction_file, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setenv("TINYGPT_BPE_FILE", str(GPT2_FILE))
    base = save_gpt2_tokenizer_base(tmp_path / "base")
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "finetune-instruct", "--data", instruction_file, "--init", base, "--out", run,
                             "--lora-rank", "2", "--mask-prompt", "--max-steps", "3", "--eval-freq", "5",
                             "--responses", "0", *INSTRUCT_FAST)
    assert code == 0, err
    adapters = lora_count(load_checkpoint(base).model, rank=2)
    assert f"trainable parameters: {adapters:,} of " in out and "(LoRA adapters)" in out
    assert not (run / "test-responses.json").exists()  # --responses 0: none asked for
    ck = load_checkpoint(run)
    meta = ck.trainer_state["meta"]
    assert meta["mask_prompt"] is True and meta["lora"] == {"rank": 2, "alpha": 16.0}
    assert meta["allowed_max_length"] == 128
    assert ck.model.num_parameters(trainable_only=True) == adapters

    code, out, err = run_cli(capsys, "chat", "--checkpoint", run, "--max-new-tokens", "4", "Say hi.")
    assert code == 0, err
    assert out == answer(ck.model, ck.tokenizer, "Say hi.", 4) + "\n"  # merged adapters answer as the unmerged model


def test_finetune_instruct_with_prompts_longer_than_the_context_still_trains_and_saves(instruction_file, tmp_path,
                                                                                        capsys):
    # the training examples are cut to the context; the response shown at each evaluation
    # (to the first validation record, 53 prompt tokens here) must not end the run
    base = save_gpt2_tokenizer_base(tmp_path / "base", context_length=48)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "finetune-instruct", "--data", instruction_file, "--init", base, "--out", run,
                           "--bpe-file", GPT2_FILE, "--max-steps", "2", "--responses", "0", *INSTRUCT_FAST)
    assert code == 0, err
    assert load_checkpoint(run, bpe_file=GPT2_FILE).trainer_state["step"] == 2


def test_finetune_classify_refuses_a_data_file_without_the_columns_before_any_download(tmp_path, capsys, monkeypatch):
    """The data is read before the model is fetched: a wrong column is one line, and no download starts."""
    import tinygpt.pretrained as pretrained

    monkeypatch.setattr(pretrained, "download_gpt2", lambda *a, **k: pytest.fail("downloaded before reading the data"))
    data = tmp_path / "bad.csv"
    data.write_text("a,b\n1,2\n")
    assert main(["finetune-classify", "--data", str(data), "--out", str(tmp_path / "run")]) == 1
    assert "has no column 'Text'" in capsys.readouterr().err


def test_download_into_a_file_is_refused_before_downloading(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("keep me")
    assert main(["download", "gpt2", "--dir", str(target)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and target.read_text() == "keep me"
