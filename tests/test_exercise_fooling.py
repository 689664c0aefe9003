"""The grader cannot be fooled: every trick a learner's file can play on `tinygpt exercise check`
ends without exit 0 and without a PASS, with one clear line (never a traceback of ours), and
the next check in the same process is not affected. These run the real child-process path."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tinygpt.cli import main
from tinygpt.exercises import run_check

GELU_RIGHT = """\
import numpy as np
from tinygpt.exercises.sheets.gelu import forward


def backward(dy, cache):
    (x,) = cache
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t**2) * c * (1 + 3 * 0.044715 * x**2))
"""
GELU_WRONG = GELU_RIGHT.replace("3 * 0.044715", "0.044715")


def check(capsys, tmp_path, source, name="gelu", *flags, filename="answer.py"):
    path = tmp_path / filename
    path.write_text(textwrap.dedent(source))
    code = main(["exercise", "check", name, str(path), *flags])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_not_fooled(code, out):
    assert code != 0, out
    assert "PASS" not in out and "Traceback" not in out and "tinygpt/exercises/" not in out, out
    assert "bug in tinygpt" not in out


TRICKS = {
    "sys.exit in forward": ("import sys\nfrom tinygpt.exercises.sheets.gelu import forward as f\n\n\n"
                            "def forward(x):\n    sys.exit(0)\n\n\ndef backward(dy, cache):\n    return dy\n", "called sys.exit(0)"),
    "sys.exit in backward": (GELU_WRONG + "\n\ndef backward(dy, cache):\n    import sys\n    sys.exit(0)\n", "your backward called sys.exit(0)"),
    "os._exit at import": ("import os\nos._exit(0)\n", "ended the check's process while importing your file"),
    "os._exit in backward": (GELU_WRONG + "\n\ndef backward(dy, cache):\n    import os\n    os._exit(0)\n",
                             "ended the check's process while running forward and backward"),
    "os._exit from atexit after the verdict": (GELU_WRONG + "\nimport atexit, os\natexit.register(lambda: os._exit(0))\n",
                                               "FAIL: the gradient is wrong (dx)"),
    "replacing checker.compare": ("import tinygpt.exercises.checker as checker\nchecker.compare = lambda *a, **k: None\n" + GELU_WRONG,
                                  "imports tinygpt.exercises.checker (the checker itself)"),
    "replacing CheckResult.passed": ("from tinygpt.exercises.checker import CheckResult\nCheckResult.passed = True\n" + GELU_WRONG,
                                     "(the checker itself)"),
    "replacing numpy.abs": ("import numpy\nnumpy.abs = lambda a, *k, **kw: a * 0\n" + GELU_WRONG, "FAIL: the gradient is wrong (dx)"),
    "a fake report, then exit": (GELU_WRONG + "\nprint('PASS: the gradient is right')\nimport os\nos._exit(0)\n", "ended the check's process"),
    "a complex gradient with a garbage imaginary part": (GELU_RIGHT + "\n_right = backward\n\n\ndef backward(dy, cache):\n"
                                                        "    return _right(dy, cache) + 1e-3j\n", "dx is complex (complex128)"),
    "the answer key": ("from tinygpt.exercises.sheets.gelu import forward\nfrom tinygpt.exercises.answers import gelu as backward\n",
                       "imports tinygpt.exercises.answers (the answer key)"),
    "tinygpt's own backward": ("import tinygpt.functional as F\n" + GELU_RIGHT, "tinygpt's own backward passes"),
    "tinygpt's Tensor.backward": ("import tinygpt as tg\nfrom tinygpt.exercises.sheets.gelu import forward\n\n\n"
                                  "def backward(dy, cache):\n    x = tg.tensor(cache[0], requires_grad=True)\n    return x\n",
                                  "imports tinygpt.tensor"),
    "the answer key, imported around the guard": (
        "import sys\nsys.meta_path.pop(0)\nfor name in [n for n in sys.modules if n.startswith('tinygpt')]:\n"
        "    del sys.modules[name]\nfrom tinygpt.exercises.answers import gelu as backward\n"
        "from tinygpt.exercises.sheets.gelu import forward\n", "runs the code of tinygpt.exercises.answers (the answer key)"),
    "the answer key, run by its path": (
        "import importlib.util, pathlib\nimport tinygpt.exercises.sheets.gelu as sheet\nforward = sheet.forward\n"
        "spec = importlib.util.spec_from_file_location('key', pathlib.Path(sheet.__file__).parents[1] / 'answers.py')\n"
        "key = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(key)\nbackward = key.gelu\n",
        "runs the code of tinygpt.exercises.answers (the answer key)"),
    "a BaseException": (GELU_WRONG + "\n\nclass Stop(BaseException):\n    pass\n\n\ndef backward(dy, cache):\n    raise Stop('no')\n",
                        "your backward failed: Stop (a BaseException, not an Exception): no"),
    "an exception inside __array__": (GELU_RIGHT + "\n\nclass Lazy:\n    def __array__(self, dtype=None, copy=None):\n"
                                      "        raise RuntimeError('later')\n\n\ndef backward(dy, cache):\n    return Lazy()\n",
                                      "dx is converting it to an array raised RuntimeError inside its __array__: later"),
}


@pytest.mark.parametrize("trick", list(TRICKS))
def test_trick_does_not_pass(tmp_path, capsys, trick):
    source, words = TRICKS[trick]
    code, out = check(capsys, tmp_path, source)
    assert_not_fooled(code, out)
    assert words in out, out


@pytest.mark.parametrize("body", ["while True:\n        pass", "import time\n    time.sleep(60)"])
def test_endless_loop_or_sleep_stops_at_the_time_limit_with_one_line(tmp_path, capsys, body):
    code, out = check(capsys, tmp_path, GELU_WRONG + f"\n\ndef backward(dy, cache):\n    {body}\n", "gelu", "--timeout", "1.5")
    assert_not_fooled(code, out)
    assert "your file did not finish within 1.5 s (it was running forward and backward)" in out and "--timeout" in out


def test_a_thread_or_a_child_process_left_running_does_not_hold_the_check(tmp_path, capsys):
    source = ("import subprocess, sys, threading, time\n"
              "threading.Thread(target=lambda: time.sleep(60)).start()\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n" + GELU_RIGHT)
    code, out = check(capsys, tmp_path, source, "gelu", "--timeout", "10")
    assert code == 0 and "PASS: the gradient is right" in out


def test_a_trick_in_one_check_does_not_change_the_next(tmp_path):
    (tmp_path / "sneaky.py").write_text("import numpy\nnumpy.abs = lambda a, *k, **kw: a * 0\n" + GELU_WRONG)
    (tmp_path / "wrong.py").write_text(GELU_WRONG)
    assert not run_check("gelu", tmp_path / "sneaky.py").passed
    assert not run_check("gelu", tmp_path / "wrong.py").passed
    assert np.abs(-1.0) == 1.0


def bad_paths(tmp_path):
    fifo = tmp_path / "pipe.py"
    os.mkfifo(fifo)
    (tmp_path / "notes.txt").write_text(GELU_RIGHT)
    (tmp_path / "folder.py").mkdir()
    return {"a folder": (tmp_path / "folder.py", "is a folder, not a Python file"),
            "a FIFO": (fifo, "is not a regular file"), "/dev/null": ("/dev/null", "is not a regular file"),
            "a .txt file": (tmp_path / "notes.txt", "is not a Python file (it must end in .py)"),
            "an empty file": (tmp_path / "empty.py", "is empty")}


@pytest.mark.parametrize("kind", ["a folder", "a FIFO", "/dev/null", "a .txt file", "an empty file"])
def test_a_path_that_is_not_a_readable_python_file_gets_one_line(tmp_path, capsys, kind):
    (tmp_path / "empty.py").write_text("")
    path, words = bad_paths(tmp_path)[kind]
    code = main(["exercise", "check", "gelu", str(path), "--timeout", "5"])
    out = capsys.readouterr().out
    assert_not_fooled(code, out)
    assert words in out and out.strip().splitlines()[-2].count("\n") == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_gets_one_line(tmp_path, capsys):
    path = tmp_path / "locked.py"
    path.write_text(GELU_RIGHT)
    path.chmod(0)
    code = main(["exercise", "check", "gelu", str(path)])
    out = capsys.readouterr().out
    assert_not_fooled(code, out)
    assert "cannot be read" in out


@pytest.mark.parametrize("line,what", [
    ("dy *= 0.5 * (1 + t)", "`dy *= 0.5 * (1 + t)` writes into an array backward was handed"),
    ("x -= 1e-3", "`x -= 1e-3` writes into an array backward was handed"),
])
def test_writing_into_dy_or_a_saved_value_fails_naming_the_line(tmp_path, capsys, line, what):
    source = GELU_RIGHT.replace("    return dy *", f"    {line}\n    return dy *")
    code, out = check(capsys, tmp_path, source)
    assert_not_fooled(code, out)
    number = source.splitlines().index(f"    {line}") + 1
    assert f"answer.py:{number}: {what}" in out and "read-only" in out and "another consumer" in out


def test_changing_a_saved_value_through_a_writeable_view_is_caught_after_backward(tmp_path, capsys):
    source = """\
        import numpy as np
        from tinygpt.exercises.sheets.embedding import forward as sheet_forward

        views = []


        def forward(W, ids):
            views.append(W[:])  # a view made before the check marks W read-only stays writeable
            return sheet_forward(W, ids)


        def backward(dy, cache):
            W, ids = cache
            views[0] += 1.0
            dW = np.zeros_like(W)
            np.add.at(dW, ids, dy)
            return dW
        """
    code, out = check(capsys, tmp_path, source, "embedding")
    assert_not_fooled(code, out)
    assert "your backward changed the cache[0] in place" in out


@pytest.mark.parametrize("cast,words,passes", [("np.float16", "dx is float16", False), ("np.float32", "dx is float32: accepted", True)])
def test_dtype_is_named(tmp_path, capsys, cast, words, passes):
    code, out = check(capsys, tmp_path, GELU_RIGHT.replace("return dy * (", f"return ({cast})(dy * (") + ")\n")
    assert (code == 0) == passes and words in out


def test_block_accepts_backprop_ninja_names(tmp_path, capsys):
    source = """\
        from tinygpt.exercises.sheets.block import forward
        from block_key import block


        def backward(dout, cache):
            return {"d" + name: grad for name, grad in block(dout, cache).items()}
        """
    answers = (__import__("tinygpt.exercises.answers", fromlist=["x"]))
    import inspect
    key = inspect.getsource(answers).replace("from tinygpt.exercises.sheets import layer_norm as layer_norm_sheet",
                                             "from tinygpt.exercises.sheets import layer_norm as layer_norm_sheet  # noqa")
    (tmp_path / "block_key.py").write_text(key)
    code, out = check(capsys, tmp_path, source, "block")
    assert code == 0 and "PASS: all 27 gradients right" in out, out


def test_timeout_must_be_a_positive_number_of_seconds(capsys):
    code = main(["exercise", "check", "gelu", "x.py", "--timeout", "0"])
    assert code == 2 and "--timeout must lie in (0, 3600] seconds, got 0" in capsys.readouterr().err


def test_start_into_a_path_that_is_a_file_is_one_line_naming_it(tmp_path, capsys):
    blocker = tmp_path / "work"
    blocker.write_text("not a folder")
    code = main(["exercise", "start", "gelu", "--dir", str(blocker)])
    err = capsys.readouterr().err
    assert code == 1 and err.strip().count("\n") == 0 and str(blocker) in err and "is a file, not a folder" in err
    assert "Errno" not in err
    code = main(["exercise", "start", "gelu", "--dir", str(blocker), "--force"])
    assert code == 1 and "is a file, not a folder" in capsys.readouterr().err


def test_python_running_the_sheet_uses_the_same_child_process_check(tmp_path):
    path = tmp_path / "gelu.py"
    path.write_text(GELU_WRONG + "\nif __name__ == '__main__':\n    from tinygpt.exercises import check_main\n\n"
                    "    raise SystemExit(check_main('gelu', __file__))\n")
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "FAIL: the gradient is wrong (dx)" in done.stdout, done.stderr


def test_printing_in_a_loop_is_stopped_before_it_fills_the_disk(tmp_path, capsys):
    code, out = check(capsys, tmp_path, GELU_WRONG + "\n\ndef backward(dy, cache):\n    while True:\n        print('x' * 4096)\n")
    assert_not_fooled(code, out)
    assert "printed or wrote more than the check allows" in out and len(out) < 200_000


def test_a_forged_result_in_the_checks_folder_is_one_line_and_fails(tmp_path, capsys):
    source = GELU_WRONG + """
import json, os, sys


def backward(dy, cache):
    job = sys.argv[1]
    with open(os.path.join(job, "result.npz"), "wb") as f:
        f.write(b"not an npz")
    with open(os.path.join(job, "result.json"), "w") as f:
        json.dump({"error": None, "kinds": [1, 2]}, f)
    os._exit(0)
"""
    code, out = check(capsys, tmp_path, source)
    assert_not_fooled(code, out)
    assert "the gradients your file sent back could not be read" in out


ONLINE_RIGHT = """\
import numpy as np


def step(m, l, a, s, v):
    assert s.shape[-1] <= 4, "a block of more than BLOCK keys"
    m_new = np.maximum(m, s.max(-1, keepdims=True))
    r, p = np.exp(m - m_new), np.exp(s - m_new)
    return m_new, l * r + p.sum(-1, keepdims=True), a * r + p @ v


def finish(m, l, a):
    return a / l, (m + np.log(l))[..., 0]
"""


@pytest.mark.parametrize("patch", ["sheet.BLOCK = 1000", "sheet.run = lambda f, s, v: f.finish(*f.step(\n"
                                   "    np.full(s.shape[:2] + (1,), -np.inf), np.zeros(s.shape[:2] + (1,)),\n"
                                   "    np.zeros(s.shape[:2] + v.shape[-1:]), s, v))"])
def test_a_forward_exercise_runs_the_learners_step_in_the_sheets_own_loop(tmp_path, capsys, patch):
    """Patching the importable sheet (its BLOCK, its loop) changes nothing: the check's loop is a
    private copy, so step still sees one block at a time."""
    source = "import tinygpt.exercises.sheets.online_softmax as sheet\n" + ONLINE_RIGHT + "\n" + patch + "\n"
    code, out = check(capsys, tmp_path, source, "online_softmax")
    assert code == 0 and "PASS: all 2 outputs right" in out, out
    code, out = check(capsys, tmp_path, source.replace("(m + np.log(l))", "np.log(l)"), "online_softmax")
    assert_not_fooled(code, out)
    assert "lse = log(l): the maximum m is missing" not in out  # level 0 names no mistake
    code, out = check(capsys, tmp_path, "from tinygpt.exercises.answers_modern import online_softmax\n"
                      "step, finish = online_softmax.step, online_softmax.finish\n", "online_softmax")
    assert_not_fooled(code, out)
    assert "imports tinygpt.exercises.answers_modern (the answer key)" in out


def test_a_finish_returning_one_array_is_one_line_naming_finish(tmp_path, capsys):
    code, out = check(capsys, tmp_path, ONLINE_RIGHT.replace("return a / l, (m + np.log(l))[..., 0]", "return a / l"),
                      "online_softmax")
    assert_not_fooled(code, out)
    assert "finish returned a ndarray; expected 2: (out, lse)" in out
