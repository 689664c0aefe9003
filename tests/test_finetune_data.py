"""The pieces the finetuning commands are built from: the book's instruction split, batches
for the DataLoader (instruction and classification), freezing all but the top, the models
finetuning starts from, and streaming text a token at a time."""
import numpy as np
import pytest

import tinygpt as tg
from tinygpt.checkpoint import save_checkpoint
from tinygpt.data import CharTokenizer, DataLoader
from tinygpt.finetune.classify import ClassificationDataset, make_classifier, train_only_the_top
from tinygpt.finetune.instruct import (InstructionDataset, format_input, format_response, generate_response,
                                       split_instruction_data)
from tinygpt.generate import StreamPrinter
from tinygpt.model import GPTModel
from tinygpt.pretrained import load_model_and_tokenizer, save_gpt2
from conftest import SHARED_DATA, host

GPT2_FILE = SHARED_DATA / "gpt2.tiktoken"
TINY = {"vocab_size": 30, "context_length": 16, "emb_dim": 8, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0, "qkv_bias": False}
RECORDS = [
    {"instruction": "Say hi.", "input": "", "output": "Hi."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Name a color.", "input": "", "output": "Red."},
]


def records(n):
    return [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(n)]


# ------------------------------------------------------------------ the instruction split

def test_split_instruction_data_gives_the_books_935_55_110_in_file_order():
    data = records(1100)
    train, val, test = split_instruction_data(data)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train == data[:935] and test == data[935:1045] and val == data[1045:]


def test_split_instruction_data_refuses_fractions_that_leave_nothing_to_train_or_validate():
    with pytest.raises(ValueError, match="train fraction 0.9 and test fraction 0.1 must be positive"):
        split_instruction_data(records(100), 0.9, 0.1)
    with pytest.raises(ValueError, match="1 records leave no training records with train fraction 0.85"):
        split_instruction_data(records(1))


# ------------------------------------------------------------------ batches for the DataLoader

@pytest.fixture
def char_tokenizer():
    return CharTokenizer.from_text("".join(format_input(r) + format_response(r) for r in RECORDS))


def test_instruction_batch_masks_exactly_the_prompt_when_asked(char_tokenizer):
    pad = 0
    dataset = InstructionDataset(RECORDS, char_tokenizer, pad_token_id=pad, mask_prompt=True)
    loader = DataLoader(dataset, batch_size=2, shuffle=True, drop_last=True, seed=123)
    inputs, targets = next(iter(loader))  # the first batch the trainer sees
    for row, i in enumerate(loader.order(0)[:2]):
        ids, p, n = dataset[i], dataset.prompt_length(i), len(dataset[i])
        assert char_tokenizer.decode(ids[:p]) == format_input(RECORDS[i])
        np.testing.assert_array_equal(inputs[row, :n], ids)
        assert (targets[row, :p - 1] == -100).all()  # predicting prompt tokens: not scored
        np.testing.assert_array_equal(targets[row, p - 1:n - 1], ids[p:])  # the response is scored, from its first token
        assert targets[row, n - 1] == pad and (targets[row, n:] == -100).all()  # one end-of-text, then padding


def test_instruction_batch_scores_the_prompt_too_by_default_and_truncates(char_tokenizer):
    dataset = InstructionDataset(RECORDS, char_tokenizer, pad_token_id=0)
    inputs, targets = dataset.batch(np.array([2, 1]))
    for row, i in enumerate([2, 1]):
        n = len(dataset[i])
        np.testing.assert_array_equal(targets[row, :n - 1], dataset[i][1:])
    assert inputs.shape == targets.shape == (2, max(len(dataset[1]), len(dataset[2])))
    unmasked = InstructionDataset(RECORDS, char_tokenizer, pad_token_id=0, allowed_max_length=20)
    inputs, targets = unmasked.batch([0, 1])
    assert inputs.shape == targets.shape == (2, 20) and (targets != -100).all()  # the prompt is scored: kept


def test_instruction_records_left_without_a_target_by_truncation_are_dropped_and_counted(char_tokenizer):
    # with the prompt masked, 20 tokens hold only prompt: such a record has nothing to learn
    short = InstructionDataset(RECORDS, char_tokenizer, pad_token_id=0, allowed_max_length=20, mask_prompt=True)
    assert len(short) == 0 and short.dropped == len(RECORDS)
    prompt_lengths = [len(char_tokenizer.encode(format_input(r))) for r in RECORDS]
    cut = sorted(prompt_lengths)[1]  # the two shorter prompts keep their first response target, the longest none
    kept = InstructionDataset(RECORDS, char_tokenizer, pad_token_id=0, allowed_max_length=cut, mask_prompt=True)
    assert kept.dropped == 1 and len(kept) == 2
    assert max(prompt_lengths) - 1 >= cut  # the dropped one: its first response target lies past the cut
    inputs, targets = kept.batch(range(len(kept)))
    assert ((targets != -100).sum(axis=1) >= 1).all()  # every kept record scores at least one token


def test_classification_batch_takes_the_rows_asked_for(char_tokenizer):
    dataset = ClassificationDataset(["Say", "Red hi", "Add"], ["spam", "ham", "ham"], char_tokenizer, ["ham", "spam"],
                                    pad_token_id=0)
    ids, lengths, labels = dataset.batch(np.array([2, 0, 1]))
    expected = [char_tokenizer.encode(t) + [0] * (6 - len(t)) for t in ("Add", "Say", "Red hi")]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(lengths, [3, 3, 6])
    np.testing.assert_array_equal(labels, [0, 1, 0])


# ------------------------------------------------------------------ freezing

def trainable(model):
    return {name.split(".")[0] + (f".{name.split('.')[1]}" if name.startswith("trf_blocks") else "")
            for name, p in model.named_parameters() if p.requires_grad}


def test_train_only_the_top_counts_blocks_from_the_top():
    tg.manual_seed(0)
    model = make_classifier(GPTModel(TINY), 2)
    assert trainable(train_only_the_top(model, 0)) == {"final_norm", "out_head"}
    assert trainable(train_only_the_top(model, 1)) == {"trf_blocks.1", "final_norm", "out_head"}
    everything = {"tok_emb", "pos_emb", "trf_blocks.0", "trf_blocks.1", "final_norm", "out_head"}
    assert trainable(train_only_the_top(model, None)) == everything  # None: the whole model


@pytest.mark.parametrize("blocks", [3, -1])
def test_train_only_the_top_refuses_more_blocks_than_the_model_has(blocks):
    with pytest.raises(ValueError, match=f"trainable_blocks is {blocks} but the model has 2 transformer blocks"):
        train_only_the_top(GPTModel(TINY), blocks)


# ------------------------------------------------------------------ where finetuning starts

def test_load_model_and_tokenizer_from_a_tinygpt_checkpoint(tmp_path):
    tok = CharTokenizer.from_text("abc")
    tg.manual_seed(0)
    model = GPTModel({**TINY, "vocab_size": tok.n_vocab})
    save_checkpoint(tmp_path / "run", 3, model, tok)
    loaded, loaded_tok = load_model_and_tokenizer(tmp_path / "run")
    assert loaded_tok.chars == ["a", "b", "c"]
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(host(loaded.state_dict()[name]), host(tensor), err_msg=name)


def test_load_model_and_tokenizer_from_a_hugging_face_folder_uses_gpt2s_tokenizer(tmp_path):
    if not GPT2_FILE.exists():
        pytest.skip(f"{GPT2_FILE} not present (shared test data)")
    tg.manual_seed(0)
    model = GPTModel({**TINY, "vocab_size": 50257, "qkv_bias": True, "tie_weights": True})
    loaded, tok = load_model_and_tokenizer(save_gpt2(model, tmp_path / "hf"), bpe_file=GPT2_FILE)
    assert tok.encode("Hello, I am") == [15496, 11, 314, 716]
    ids = np.array([[15496, 11, 314, 716]])
    np.testing.assert_allclose(host(loaded(ids)), host(model(ids)), rtol=1e-6, atol=1e-6)


def test_load_model_and_tokenizer_names_a_source_that_is_not_there(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'gpt3'} is neither one of gpt2"):
        load_model_and_tokenizer(tmp_path / "gpt3")


def test_generate_response_refuses_a_prompt_that_leaves_no_room(char_tokenizer):
    model = GPTModel({**TINY, "vocab_size": char_tokenizer.n_vocab})
    prompt_tokens = len(format_input(RECORDS[0]) + "\n\n### Response:\n")
    with pytest.raises(ValueError, match=f"the prompt has {prompt_tokens} tokens but context_length is 16"):
        generate_response(model, char_tokenizer, RECORDS[0])


# ------------------------------------------------------------------ streaming

class ByteTokenizer:
    """One token per byte, as GPT-2's byte-level BPE can split a character."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def stream(tokens, stop_id=None, finish=True):
    writes = []
    printer = StreamPrinter(ByteTokenizer(), stop_id=stop_id, write=writes.append)
    for token in tokens:
        printer(np.array([token]))  # generate's on_token gets a column [B]
    if finish:
        printer.finish()
    return [w for w in writes if w]


def test_stream_printer_holds_back_half_a_character_until_it_is_whole():
    euro = list("€".encode())  # 3 bytes
    assert stream([ord("a"), *euro, ord("b")]) == ["a", "€", "b"]


def test_stream_printer_prints_nothing_from_the_stop_token_on():
    assert stream([ord("o"), ord("k"), 0, ord("x")], stop_id=0) == ["o", "k"]


def test_stream_printer_finish_shows_what_an_unfinished_character_held_back():
    euro = list("€".encode())
    assert stream([ord("a"), *euro[:2]], finish=False) == ["a"]
    assert stream([ord("a"), *euro[:2]]) == ["a", "\ufffd"]


def test_stream_printer_decodes_each_token_a_bounded_number_of_times():
    # decoding everything so far at every token made long outputs quadratic (issue 13)
    decoded = []

    class CountingTokenizer(ByteTokenizer):
        def decode(self, ids):
            decoded.append(len(ids))
            return super().decode(ids)

    printer = StreamPrinter(CountingTokenizer(), write=lambda text: None)
    text = ("naïve café € " * 400).encode()  # 1- to 3-byte characters, 6,400 tokens
    for token in text:
        printer(np.array([token]))
    printer.finish()
    assert sum(decoded) < 3 * len(text)  # each id decoded at most once per byte of its character
    assert len(printer.ids) == len(text)


def test_stream_printer_prints_a_broken_character_once_it_has_held_too_many_tokens():
    lone = [0xE2] * (StreamPrinter.HOLD_AT_MOST + 1)  # lead bytes that never complete a character
    assert "".join(stream(lone, finish=False)) == "\ufffd" * len(lone)
