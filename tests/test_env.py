"""Environment variables: each checked at start with one line naming the variable, the value
and the limit, by the same parser the run reads it with (issue 19, item 8; issue 18: one
parse of the thread count)."""
import pytest

from tinygpt import env
from tinygpt.cli import main
from tinygpt.kernels import threads
from tinygpt.validation import UsageError, check_environment

# (variable, value, words the one error line must hold)
BAD = [
    ("TINYGPT_DIST_TIMEOUT", "0", ["'0'", ">= 2"]),
    ("TINYGPT_DIST_TIMEOUT", "-5", ["'-5'", ">= 2"]),
    ("TINYGPT_DIST_TIMEOUT", "abc", ["'abc'", "number of seconds"]),
    ("TINYGPT_DIST_TIMEOUT", "nan", ["'nan'", "finite"]),
    ("TINYGPT_DIST_TIMEOUT", "inf", ["'inf'", "finite"]),
    ("TINYGPT_DIST_TIMEOUT", "1.5", ["'1.5'", ">= 2"]),
    ("TINYGPT_NUM_THREADS", "+2", ["'+2'", "positive integer"]),
    ("TINYGPT_NUM_THREADS", "1_0", ["'1_0'", "positive integer"]),
    ("TINYGPT_NUM_THREADS", "0", ["'0'", "positive integer"]),
    ("TINYGPT_NUM_THREADS", "-1", ["'-1'", "positive integer"]),
    ("TINYGPT_NUM_THREADS", "2.0", ["'2.0'", "positive integer"]),
    ("TINYGPT_NUM_THREADS", "\u00b2", ["positive integer"]),  # "²".isdigit() is True, int("²") fails
    ("TINYGPT_DEVICE", "gpu", ["'gpu'", "cpu, cuda, strict"]),
    ("TINYGPT_KERNELS", "turbo", ["'turbo'"]),
    ("TINYGPT_BPE_FILE", "/no/such/file", ["/no/such/file"]),
    ("TINYGPT_CACHE", "/dev/null", ["/dev/null", "folder"]),
]


@pytest.mark.parametrize("name, value, words", BAD, ids=[f"{n}={v}" for n, v, _ in BAD])
def test_a_bad_variable_is_one_line_at_start_naming_it_the_value_and_the_limit(monkeypatch, capsys, name, value, words):
    monkeypatch.setenv(name, value)
    assert main(["info", "--model", "gpt2-small"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before the command ran
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert name in captured.err and all(w in captured.err for w in words), captured.err


@pytest.mark.parametrize("value", ["+2", "1_0", " 3 ", "3", "0", "", "\u00b2", "2.0", "007"])
def test_the_start_check_and_the_kernels_read_the_thread_count_alike(monkeypatch, value):
    """What passes the start never fails in the middle of the run, and the reverse."""
    monkeypatch.setenv("TINYGPT_NUM_THREADS", value)
    try:
        check_environment()
        at_start = None
    except UsageError as e:
        at_start = str(e)
    try:
        count = threads.num_threads()
        in_run = None
    except ValueError as e:
        in_run = str(e)
    assert at_start == in_run
    if in_run is None and value.strip():
        assert count == int(value)


def test_the_data_parallel_timeout_is_read_by_the_parser_the_start_checks(monkeypatch):
    monkeypatch.setenv("TINYGPT_DIST_TIMEOUT", "2.5")
    check_environment()
    assert env.dist_timeout() == 2.5
    monkeypatch.delenv("TINYGPT_DIST_TIMEOUT")
    assert env.dist_timeout() == 30.0


def test_an_empty_variable_counts_as_unset(monkeypatch, capsys):
    for name in ("TINYGPT_NUM_THREADS", "TINYGPT_DIST_TIMEOUT", "TINYGPT_DEVICE"):
        monkeypatch.setenv(name, "")
    assert main(["info", "--model", "gpt2-small"]) == 0


def test_a_misspelt_variable_gets_a_warning_naming_the_one_meant(monkeypatch, capsys):
    monkeypatch.setenv("TINYGPT_NUM_THREAD", "2")
    assert main(["info", "--model", "gpt2-small"]) == 0
    err = capsys.readouterr().err
    assert "warning: TINYGPT_NUM_THREAD is set, but tinygpt reads no such variable; did you mean TINYGPT_NUM_THREADS?" in err


def test_every_variable_the_code_reads_is_known():
    """A new TINYGPT_* variable read somewhere must join env.KNOWN (and so the start check's list)."""
    import re
    from pathlib import Path

    import tinygpt

    read = set()
    for path in Path(tinygpt.__file__).parent.rglob("*.py"):
        read |= set(re.findall(r"\"(TINYGPT_[A-Z_]+)\"", path.read_text()))
    assert read <= set(env.KNOWN), read - set(env.KNOWN)
