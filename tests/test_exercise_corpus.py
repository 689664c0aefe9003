"""A corpus of realistic wrong backward passes (tests/exercise_corpus/), each tagged with the
mistake it makes: every one fails, the catalogue names its mistake in at least 95 % of them,
and no report says anything false (another mistake named, or words the entry must not get).
Right answers written differently from the answer key (loops, einsum, another order) pass.

The corpus is checked in-process (check_function: the same rules and diagnosis as a file's
check in a child process, without a process per answer)."""
import functools
import importlib
import inspect
import sys
from pathlib import Path

import pytest

from tinygpt.exercises import EXERCISES, check_function
from tinygpt.exercises.hints import GENERIC

CORPUS = Path(__file__).resolve().parent / "exercise_corpus"
sys.path.insert(0, str(CORPUS))
corpus_tools = importlib.import_module("corpus_tools")
for _file in sorted(CORPUS.glob("*.py")):
    if _file.stem != "corpus_tools":
        importlib.import_module(_file.stem)
sys.path.remove(str(CORPUS))

WRONG = [e for e in corpus_tools.ENTRIES if e.mistake]
RIGHT = [e for e in corpus_tools.ENTRIES if not e.mistake]
UNTILED = "untiled"
NOT_CATALOGUED = ("recogniser", "generic", UNTILED)


def label(entry) -> str:
    return f"{entry.exercise}-{entry.mistake or 'right'}-{inspect.getsourcelines(entry.backward)[1]}"


@functools.lru_cache(maxsize=None)
def check(index: int):
    entry = corpus_tools.ENTRIES[index]
    return check_function(entry.exercise, entry.backward, entry.forward)


def named(entry, result) -> bool:
    keys = [key for g in result.wrong if g.mistake for key in g.mistake.split("+")]
    return entry.mistake in keys


def false_claims(entry, result) -> list:
    claims = []
    for g in result.wrong:
        keys = g.mistake.split("+") if g.mistake else []
        if keys and entry.mistake not in keys:
            claims.append(f"{g.name}: named {g.mistake}, the corpus says {entry.mistake}")
    report = result.report(2)
    claims += [f"says {words!r}" for words in entry.must_not if words in report]
    if entry.exercise not in ("attention", "block", "gqa", "online_softmax", "flash_backward") and "mask" in report.lower():
        claims.append("speaks of masking in an exercise without a mask")
    return claims


def test_the_corpus_is_large_and_covers_every_exercise():
    assert len(WRONG) >= 150
    assert {e.exercise for e in WRONG} == set(EXERCISES)
    assert all(sum(e.exercise == name for e in WRONG) >= 10 for name, ex in EXERCISES.items() if ex.difficulty != "warm-up")


@pytest.mark.parametrize("index", [corpus_tools.ENTRIES.index(e) for e in WRONG], ids=[label(e) for e in WRONG])
def test_every_wrong_answer_fails_and_no_report_says_anything_false(index):
    entry, result = corpus_tools.ENTRIES[index], check(index)
    assert result.error is None, result.error
    assert not result.passed, result.report()
    assert not false_claims(entry, result), (false_claims(entry, result), result.report())
    if entry.mistake == "generic":
        assert any(g.hint and g.hint.startswith(GENERIC) for g in result.wrong)
    if entry.mistake == "recogniser":
        assert all(g.hint and not g.hint.startswith(GENERIC) for g in result.wrong), result.report()
    if entry.mistake == UNTILED:  # right gradients, computed with a whole [B, H, Tq, Tk] array
        assert not result.wrong and "tile" in (result.memory or ""), result.report()


def test_the_catalogue_names_the_mistake_in_at_least_95_percent():
    catalogued = [e for e in WRONG if e.mistake not in NOT_CATALOGUED]
    missed = [label(e) for e in catalogued if not named(e, check(corpus_tools.ENTRIES.index(e)))]
    assert len(missed) <= 0.05 * len(catalogued), missed


@pytest.mark.parametrize("index", [corpus_tools.ENTRIES.index(e) for e in RIGHT], ids=[label(e) for e in RIGHT])
def test_right_answers_written_differently_pass(index):
    result = check(index)
    assert result.passed, result.report()
