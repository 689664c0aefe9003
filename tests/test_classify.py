"""Classification finetuning (book chapter 6)."""
import numpy as np
import pytest

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.checkpoint import load_checkpoint, save_checkpoint
from tinygpt.data import CharTokenizer
from tinygpt.finetune.classify import (ClassificationDataset, balance_classes, calc_accuracy, class_logits, classify,
                                       make_classifier, random_split, read_labelled_file, train_classifier_simple)
from tinygpt.model import GPTModel, count_parameters
from tinygpt.optim import AdamW
from conftest import host

CFG = {"vocab_size": 40, "context_length": 40, "emb_dim": 32, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0, "qkv_bias": False}
NAMES = ["ham", "spam"]


def toy_data(n=240, seed=0):
    """A separable problem: spam texts contain the word "win", ham texts the word "hello"."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "sigma"]
    texts, labels = [], []
    for i in range(n):
        label = NAMES[i % 2]
        w = list(rng.choice(words, size=rng.integers(2, 5)))
        w.insert(int(rng.integers(0, len(w) + 1)), "win" if label == "spam" else "hello")
        texts.append(" ".join(w))
        labels.append(label)
    return texts, labels


def test_make_classifier_replaces_the_head_and_freezes_all_but_the_last_block():
    tg.manual_seed(0)
    model = make_classifier(GPTModel(CFG), num_classes=3)
    assert model.out_head.weight.shape == (3, 32) and model.out_head.bias.shape == (3,)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("trf_blocks.1.", "final_norm.", "out_head."))}
    ids = np.random.default_rng(0).integers(0, 40, (2, 6))
    F.cross_entropy(class_logits(model, ids, [6, 3]), np.array([0, 2])).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def test_classifier_config_counts_and_reloads_through_a_checkpoint(tmp_path):
    tg.manual_seed(0)
    model = make_classifier(GPTModel({**CFG, "tie_weights": True}), num_classes=2, trainable_blocks=None)
    assert model.out_head.weight is not model.tok_emb.weight
    assert model.num_parameters() == count_parameters(model.cfg)
    tok = CharTokenizer.from_text("abc")
    save_checkpoint(tmp_path, 1, model, tok)
    loaded = load_checkpoint(tmp_path).model
    ids = np.random.default_rng(1).integers(0, 40, (2, 5))
    np.testing.assert_array_equal(host(class_logits(loaded, ids, [5, 2])), host(class_logits(model, ids, [5, 2])))


def test_class_logits_come_from_the_last_real_token_not_the_padding(device):
    tg.manual_seed(0)
    model = make_classifier(GPTModel(CFG), num_classes=2)
    text = np.array([[5, 9, 3]])
    padded = np.array([[5, 9, 3, 0, 0, 0], [7, 7, 7, 7, 7, 7]])
    alone = host(class_logits(model, text, [3]))[0]
    np.testing.assert_allclose(host(class_logits(model, padded, [3, 6]))[0], alone, rtol=1e-5, atol=1e-6)
    assert np.abs(host(model(padded))[0, -1] - alone).max() > 1e-3  # the last (padding) position differs


def test_classifier_gradients_match_finite_differences_with_frozen_layers(device):
    tg.manual_seed(3)
    model = make_classifier(GPTModel({**CFG, "vocab_size": 11, "emb_dim": 8, "context_length": 6}), num_classes=3)
    ids, lengths, labels = np.random.default_rng(2).integers(0, 11, (3, 6)), [6, 2, 4], np.array([0, 2, 1])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert tg.gradcheck(lambda *ps: F.cross_entropy(class_logits(model, ids, lengths), labels), trainable,
                        atol=1e-7, rtol=1e-4, raise_exception=True)


def test_finetuning_learns_a_separable_toy_problem_and_the_model_reloads(tmp_path):
    texts, labels = toy_data()
    tok = CharTokenizer.from_text(" ".join(texts))
    tg.manual_seed(0)
    model = make_classifier(GPTModel({**CFG, "vocab_size": tok.n_vocab}), 2, trainable_blocks=None)
    train, val, test = random_split(len(texts))
    subset = lambda idx: ClassificationDataset([texts[i] for i in idx], [labels[i] for i in idx], tok, NAMES, pad_token_id=0)
    train_set, val_set, test_set = subset(train), subset(val), subset(test)
    before = calc_accuracy(test_set, model)
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    losses, _, _, _, seen = train_classifier_simple(model, train_set, val_set, opt, num_epochs=5, eval_freq=20,
                                                     eval_iter=5, show=lambda s: None)
    assert losses[-1] < losses[0] / 5
    assert seen == 5 * (len(train) // 8) * 8
    after = calc_accuracy(test_set, model)
    assert after >= 0.9 > before + 0.2, (before, after)
    assert classify("gamma win beta", model, tok, NAMES)[0] == "spam"
    label, probs = classify("hello delta", model, tok, NAMES)
    assert label == "ham" and probs["ham"] > 0.5 and abs(sum(probs.values()) - 1) < 1e-6
    save_checkpoint(tmp_path, 1, model, tok)
    assert calc_accuracy(test_set, load_checkpoint(tmp_path).model) == after


def test_read_labelled_file_and_its_errors(tmp_path):
    good = tmp_path / "sms.tsv"
    good.write_text("label\ttext\nham\thello there\nspam\twin now\n")
    assert read_labelled_file(good, "text", "label") == (["hello there", "win now"], ["ham", "spam"])
    with pytest.raises(ValueError, match=r"sms\.tsv has no column 'message'.*\['label', 'text'\]"):
        read_labelled_file(good, "message", "label")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv is empty"):
        read_labelled_file(empty, "text", "label")
    blank = tmp_path / "blank.csv"
    blank.write_text("text,label\nfine,ham\n,spam\n")
    with pytest.raises(ValueError, match=r"blank\.csv, line 3: empty text"):
        read_labelled_file(blank, "text", "label")


def test_dataset_pads_truncates_and_rejects_unknown_labels():
    tok = CharTokenizer.from_text("abcdef")
    ds = ClassificationDataset(["abc", "abcdef"], ["ham", "spam"], tok, NAMES, max_length=4, pad_token_id=0)
    assert ds.ids.shape == (2, 4) and list(ds.lengths) == [3, 4] and list(ds.labels) == [0, 1]
    assert ds.ids[0, 3] == 0 and tok.decode(ds.ids[1].tolist()) == "abcd"
    with pytest.raises(ValueError, match="label 'eggs' of example 1"):
        ClassificationDataset(["a", "b"], ["ham", "eggs"], tok, NAMES)


def test_balance_classes_undersamples_to_the_smallest_class_and_split_covers_everything():
    texts = [f"t{i}" for i in range(10)]
    labels = ["ham"] * 7 + ["spam"] * 3
    bt, bl = balance_classes(texts, labels, seed=1)
    assert bl.count("ham") == bl.count("spam") == 3 and set(bt) >= {"t7", "t8", "t9"}
    assert balance_classes(texts, labels, seed=1) == (bt, bl)
    train, val, test = random_split(10, 0.7, 0.1, seed=2)
    assert (len(train), len(val), len(test)) == (7, 1, 2)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(10))
