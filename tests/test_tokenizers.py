"""Tokenizers: GPT-2 via tiktoken (offline from a local ranks file), characters, BPE training."""

from __future__ import annotations

import json
import os
import time
from itertools import pairwise
from pathlib import Path

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygpt.data import BPETokenizer, CharTokenizer, gpt2_tokenizer, train_bpe
from tinygpt.data.gpt2 import GPT2_SHA256

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BPE_FILE = DATA / "gpt2.tiktoken"
VERDICT = DATA / "the-verdict.txt"
needs_bpe_file = pytest.mark.skipif(
    not BPE_FILE.exists(), reason=f"GPT-2 ranks file not found at {BPE_FILE}"
)
needs_verdict = pytest.mark.skipif(
    not VERDICT.exists(), reason=f"the-verdict.txt not found at {VERDICT}"
)

# A small corpus that ships with the tests, so BPE tests never skip: English, French, Greek,
# Japanese, emoji and digits, repeated so that merges have something to find.
CORPUS = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.\n"
    "Le renard brun saute par-dessus le chien paresseux. Ça va très bien, merci !\n"
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.\n"
    "素早い茶色の狐がのろまな犬を飛び越える。🦊🐕 1234 5678 the end.\n"
) * 8


@pytest.fixture(scope="module")
def gpt2() -> tiktoken.Encoding:
    if not BPE_FILE.exists():
        pytest.skip(f"GPT-2 ranks file not found at {BPE_FILE}")
    return gpt2_tokenizer(BPE_FILE)


@pytest.fixture(scope="module")
def corpus_bpe() -> BPETokenizer:
    return train_bpe(CORPUS, 400)


# ---------------------------------------------------------------- GPT-2


def test_gpt2_encodes_hello_i_am_as_in_the_book(gpt2):
    assert gpt2.encode("Hello, I am") == [15496, 11, 314, 716]
    assert gpt2.n_vocab == 50257


@needs_verdict
def test_gpt2_encodes_the_verdict_to_5145_ids_and_back(gpt2):
    text = VERDICT.read_text(encoding="utf-8")
    ids = gpt2.encode(text)
    assert len(ids) == 5145
    assert gpt2.decode(ids) == text


def test_gpt2_endoftext_is_special_id_50256_only_when_allowed(gpt2):
    assert gpt2.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert gpt2.encode("a<|endoftext|>b", allowed_special="all") == [64, 50256, 65]
    with pytest.raises(ValueError):
        gpt2.encode("<|endoftext|>")


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_gpt2_round_trips_arbitrary_text(gpt2, text):
    assert gpt2.decode(gpt2.encode(text, disallowed_special=())) == text


@needs_bpe_file
def test_gpt2_file_from_environment_is_used_without_download(monkeypatch):
    def no_download(name):
        raise AssertionError("must not download when TINYGPT_BPE_FILE is set")

    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    monkeypatch.setenv("TINYGPT_BPE_FILE", str(BPE_FILE))
    assert gpt2_tokenizer().encode("Hello, I am") == [15496, 11, 314, 716]


@needs_bpe_file
def test_gpt2_argument_takes_precedence_over_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYGPT_BPE_FILE", str(tmp_path / "missing.tiktoken"))
    assert gpt2_tokenizer(BPE_FILE).encode("Hello") == [15496]
    with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
        gpt2_tokenizer()


def test_gpt2_without_file_asks_tiktoken_for_gpt2(monkeypatch):
    asked = []
    monkeypatch.delenv("TINYGPT_BPE_FILE", raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: asked.append(name) or "encoding")
    assert gpt2_tokenizer() == "encoding"
    assert asked == ["gpt2"]


def test_gpt2_download_failure_names_both_offline_remedies(monkeypatch):
    def offline(name):
        raise ConnectionError("no route to host")

    monkeypatch.delenv("TINYGPT_BPE_FILE", raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError) as info:
        gpt2_tokenizer()
    message = str(info.value)
    assert "--bpe-file PATH" in message
    assert "TINYGPT_BPE_FILE" in message
    assert "no route to host" in message
    assert isinstance(info.value.__cause__, ConnectionError)


@needs_bpe_file
def test_gpt2_rejects_a_tampered_copy_naming_path_and_both_hashes(tmp_path):
    lines = BPE_FILE.read_bytes().splitlines(keepends=True)
    token, rank = lines[1000].split()
    lines[1000] = token + b" " + str(int(rank) + 1).encode() + b"\n"  # one rank off by one
    tampered = tmp_path / "gpt2.tiktoken"
    tampered.write_bytes(b"".join(lines))
    import hashlib

    actual = hashlib.sha256(tampered.read_bytes()).hexdigest()
    with pytest.raises(ValueError) as info:
        gpt2_tokenizer(tampered)
    message = str(info.value)
    assert str(tampered) in message and GPT2_SHA256 in message and actual in message


def test_gpt2_rejects_an_unrelated_file(tmp_path):
    bogus = tmp_path / "ranks.tiktoken"
    bogus.write_bytes(b"YQ== 0\n")
    with pytest.raises(ValueError, match="sha256 expected 306cd27f"):
        gpt2_tokenizer(bogus)


# ---------------------------------------------------------------- characters


def test_char_vocabulary_is_sorted_with_unk_first():
    tok = CharTokenizer.from_text("hello world")
    assert tok.itos == ["<unk>", " ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.n_vocab == 9
    assert tok.encode("hello") == [4, 3, 5, 5, 6]
    assert tok.decode([4, 3, 5, 5, 6]) == "hello"


def test_char_vocabulary_does_not_depend_on_corpus_order():
    assert (
        CharTokenizer.from_text("dlrow olleh").itos == CharTokenizer.from_text("hello world").itos
    )


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1))
def test_char_round_trips_text_of_its_corpus(text):
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text, errors="strict")
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert 0 not in ids


def test_char_unknown_characters_become_unk_by_default():
    tok = CharTokenizer.from_text("abc")
    assert tok.encode("abzc") == [1, 2, 0, 3]
    assert tok.decode(tok.encode("abzc")) == "ab<unk>c"


def test_char_strict_mode_names_the_unknown_character_and_its_position():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"character 'é' \(U\+00E9\) at position 3"):
        tok.encode("abcé", errors="strict")
    with pytest.raises(ValueError, match="errors must be"):
        tok.encode("abc", errors="ignore")


def test_char_decode_rejects_ids_outside_the_vocabulary():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="token id 4 is out of range for a vocabulary of 4 ids"):
        tok.decode([1, 4])


def test_char_rejects_empty_corpus_and_bad_vocabularies():
    with pytest.raises(ValueError, match="empty text"):
        CharTokenizer.from_text("")
    with pytest.raises(ValueError, match="repeated characters: \\['a'\\]"):
        CharTokenizer(["a", "b", "a"])
    with pytest.raises(ValueError, match="one character"):
        CharTokenizer(["ab"])


def test_char_save_and_load_keep_every_id(tmp_path):
    tok = CharTokenizer.from_text("Grüße, 世界! 🦊")
    path = tmp_path / "vocab.json"
    tok.save(path)
    again = CharTokenizer.load(path)
    assert again.itos == tok.itos
    assert again.encode("世界🦊 Grüße") == tok.encode("世界🦊 Grüße")
    assert json.loads(path.read_text(encoding="utf-8"))["chars"] == tok.chars
    assert CharTokenizer.from_dict(tok.to_dict()).itos == tok.itos
    assert os.listdir(tmp_path) == ["vocab.json"]  # no temp file left behind


def test_char_failed_save_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "vocab.json"
    CharTokenizer.from_text("abc").save(path)
    before = path.read_text(encoding="utf-8")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        CharTokenizer.from_text("xyz").save(path)
    assert path.read_text(encoding="utf-8") == before
    assert os.listdir(tmp_path) == ["vocab.json"]


def test_char_from_dict_rejects_other_formats():
    with pytest.raises(ValueError, match="not a char tokenizer"):
        CharTokenizer.from_dict({"format": "tinygpt-bpe", "version": 1, "chars": []})


# ---------------------------------------------------------------- BPE training


def test_bpe_first_merges_on_a_hand_checked_example():
    # "aaabdaaabac": pairs aa x4, ab x2, others x1, so the first merge is (a, a) -> 256.
    # Then (aa, a) and (a, b) both occur twice; the tie goes to the smaller pair (97, 98) -> 257.
    tok = train_bpe("aaabdaaabac", 258, special_tokens=())
    assert tok.merges == [(97, 97), (97, 98)]
    assert tok.tokens[256:] == [b"aa", b"ab"]
    assert tok.n_vocab == 258
    # tiktoken replays the merges: a a a b -> aa a b -> aa ab
    assert tok.encode("aaabdaaabac") == [256, 257, 100, 256, 257, 97, 99]


def test_bpe_vocab_below_bytes_plus_specials_is_rejected():
    with pytest.raises(ValueError, match="vocab_size 256 is below the minimum 257"):
        train_bpe("abc", 256)
    assert train_bpe("abc", 256, special_tokens=()).n_vocab == 256


def test_bpe_training_is_deterministic():
    a, b = train_bpe(CORPUS, 400), train_bpe(CORPUS, 400)
    assert a.merges == b.merges and a.tokens == b.tokens
    assert a.encode(CORPUS) == b.encode(CORPUS)


def test_bpe_reaches_the_requested_vocabulary_with_specials_last(corpus_bpe):
    assert corpus_bpe.n_vocab == 400
    assert corpus_bpe.encode("<|endoftext|>", allowed_special="all") == [399]
    assert len(corpus_bpe.merges) == 400 - 256 - 1


def test_bpe_learned_merges_compress_the_corpus(corpus_bpe):
    n_bytes = len(CORPUS.encode("utf-8"))
    n_ids = len(corpus_bpe.encode(CORPUS))
    assert n_ids < 0.5 * n_bytes, (n_ids, n_bytes)


def test_bpe_tiktoken_encoding_replays_the_learned_merges(corpus_bpe):
    """Applying the merges in training order by hand gives tiktoken's ids, chunk by chunk."""
    import regex

    rank = {t: i for i, t in enumerate(corpus_bpe.tokens)}
    for chunk in regex.findall(corpus_bpe.pattern, CORPUS):
        ids = list(chunk.encode("utf-8"))
        for a, b in corpus_bpe.merges:
            merged, out, i = rank[corpus_bpe.tokens[a] + corpus_bpe.tokens[b]], [], 0
            while i < len(ids):
                if ids[i : i + 2] == [a, b]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        assert corpus_bpe.encode(chunk) == ids, chunk


def test_bpe_never_merges_across_special_tokens():
    tok = train_bpe("hello<|endoftext|>" * 50, 300)
    assert not any(b"<|" in t or b"endoftext" in t for t in tok.tokens)
    # Only "hello" is left to learn (4 merges), so training stops early at 256 + 4 + 1 ids.
    assert tok.tokens[-1] == b"hello" and tok.n_vocab == 261
    assert tok.encode("hello<|endoftext|>", allowed_special="all") == [259, 260]


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_bpe_round_trips_arbitrary_unicode(corpus_bpe, text):
    assert corpus_bpe.decode(corpus_bpe.encode(text, disallowed_special=())) == text


@settings(max_examples=30, deadline=None)
@given(st.text(alphabet="ab 🦊é", min_size=1, max_size=40), st.integers(256, 300))
def test_bpe_trained_on_any_text_round_trips_it(text, vocab_size):
    tok = train_bpe(text, vocab_size, special_tokens=())
    assert tok.n_vocab <= vocab_size
    assert tok.decode(tok.encode(text)) == text


def naive_bpe_merges(text: str, n_merges: int) -> list[tuple[int, int]]:
    """Reference trainer: recount every pair of every chunk before each merge (slow but obvious)."""
    import regex

    from tinygpt.data.gpt2 import GPT2_PATTERN

    words = [list(chunk.encode("utf-8")) for chunk in regex.findall(GPT2_PATTERN, text)]
    tokens, merges = [bytes([b]) for b in range(256)], []
    for _ in range(n_merges):
        counts: dict[tuple[int, int], int] = {}
        for ids in words:
            for pair in pairwise(ids):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merged = tokens[pair[0]] + tokens[pair[1]]
        if merged not in tokens:
            tokens.append(merged)
        new_id = tokens.index(merged)
        merges.append(pair)
        for k, ids in enumerate(words):
            out, i = [], 0
            while i < len(ids):
                if ids[i : i + 2] == list(pair):
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            words[k] = out
    return merges


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="abc é🦊.\n", max_size=80), st.integers(0, 30))
def test_bpe_incremental_counts_agree_with_a_full_recount(text, n_merges):
    tok = train_bpe(text, 256 + n_merges, special_tokens=())
    assert tok.merges == naive_bpe_merges(text, n_merges)


def test_bpe_incremental_counts_agree_with_a_full_recount_on_the_corpus():
    assert train_bpe(CORPUS, 256 + 60, special_tokens=()).merges == naive_bpe_merges(CORPUS, 60)


def test_bpe_save_and_load_give_identical_ids(corpus_bpe, tmp_path):
    path = tmp_path / "bpe.json"
    corpus_bpe.save(path)
    again = BPETokenizer.load(path)
    assert again.tokens == corpus_bpe.tokens and again.merges == corpus_bpe.merges
    assert again.encode(CORPUS) == corpus_bpe.encode(CORPUS)
    stored = json.loads(path.read_text(encoding="utf-8"))
    assert stored["tokens"][97] == "YQ=="  # base64 of b"a"
    assert os.listdir(tmp_path) == ["bpe.json"]


@needs_verdict
def test_bpe_trains_to_1000_on_the_verdict_in_seconds():
    text = VERDICT.read_text(encoding="utf-8")
    start = time.perf_counter()
    tok = train_bpe(text, 1000)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"training took {elapsed:.1f} s"
    assert tok.n_vocab == 1000
    assert len(tok.encode(text)) < 0.4 * len(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
