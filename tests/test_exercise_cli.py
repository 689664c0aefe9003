"""`tinygpt exercise list | start | check`: what a learner sees, the exit codes, and one
clear message (never a traceback of ours) for every way a file can be wrong."""
import pytest

from tinygpt.cli import main
from tinygpt.exercises import EXERCISES, sheet_text


def run(capsys, *argv):
    code = main(["exercise", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def sheet_with(tmp_path, capsys, name, old, new, filename=None):
    """The sheet `start` writes, with one piece of text replaced (the learner's edit)."""
    path = tmp_path / f"{name}.py"
    if not path.exists():
        assert run(capsys, "start", name, "--dir", tmp_path)[0] == 0
    text = path.read_text()
    assert old in text
    target = tmp_path / (filename or f"{name}.py")
    target.write_text(text.replace(old, new))
    return target


STUB = '    raise NotImplementedError("write dx, dscale and dshift, then return them")'
RIGHT = """    dxhat = dy * scale
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, (dy * xhat).sum(axis=(0, 1)), dy.sum(axis=(0, 1))"""


def assert_no_traceback_of_ours(text):
    assert "Traceback" not in text and "tinygpt/exercises" not in text, text


def test_list_shows_the_path_first_to_last_and_what_was_passed(tmp_path, capsys):
    path = sheet_with(tmp_path, capsys, "layer_norm", STUB, RIGHT)
    assert run(capsys, "check", "layer_norm", path)[0] == 0
    code, out, _ = run(capsys, "list", "--dir", tmp_path)
    assert code == 0
    lines = [line for line in out.splitlines() if line[:3].strip().rstrip(".").isdigit()]
    assert [line.split()[1] for line in lines] == list(EXERCISES)
    assert lines[0].split()[1] == "add" and lines[-1].split()[1] == "block"
    for line, (name, exercise) in zip(lines, EXERCISES.items()):
        assert exercise.difficulty in line and exercise.summary in line
        assert ("passed" in line.split(exercise.summary)[0]) == (name == "layer_norm")
    assert f"passed 1 of {len(EXERCISES)}" in out and "next: tinygpt exercise start add" in out


def test_start_writes_the_sheet_and_refuses_to_overwrite_without_force(tmp_path, capsys):
    code, out, _ = run(capsys, "start", "gelu", "--dir", tmp_path / "work")
    path = tmp_path / "work" / "gelu.py"
    assert code == 0 and path.exists() and f"tinygpt exercise check gelu {path}" in out
    path.write_text("my work")
    code, _, err = run(capsys, "start", "gelu", "--dir", tmp_path / "work")
    assert code == 1 and path.read_text() == "my work"
    assert err.strip().count("\n") == 0 and str(path) in err and "--force" in err
    assert run(capsys, "start", "gelu", "--dir", tmp_path / "work", "--force")[0] == 0
    assert "def backward(dy, cache)" in path.read_text()


@pytest.mark.parametrize("command", [["start", "conv2d"], ["check", "conv2d", "x.py"]])
def test_unknown_exercise_exits_2_listing_the_valid_ones(capsys, command):
    code, _, err = run(capsys, *command)
    assert code == 2 and "unknown exercise 'conv2d'" in err and ", ".join(EXERCISES) in err


def test_right_solution_passes_with_exit_0(tmp_path, capsys):
    path = sheet_with(tmp_path, capsys, "layer_norm", STUB, RIGHT)
    code, out, _ = run(capsys, "check", "layer_norm", path)
    assert code == 0 and "PASS: all 3 gradients right" in out
    assert sum(" exact " in line for line in out.splitlines()) == 3


def test_wrong_solution_fails_with_exit_1_and_a_hint(tmp_path, capsys):
    path = sheet_with(tmp_path, capsys, "layer_norm", STUB, RIGHT.replace("dy.sum(axis=(0, 1))", "dy.sum(axis=0)"))
    code, out, _ = run(capsys, "check", "layer_norm", path)
    assert code == 1 and "FAIL: 1 of 3 gradients wrong (dshift)" in out
    assert "shape (3, 5)    wrong, expected (5,)" in out and "hint:" not in out and "--hint" in out
    code, out, _ = run(capsys, "check", "layer_norm", path, "--hint")
    assert code == 1 and "where: wrong shape: yours has shape (3, 5), dshift must have shape (5,)" in out and "hint:" not in out
    code, out, _ = run(capsys, "check", "layer_norm", path, "--hint", "2")
    assert code == 1 and "hint: dscale or dshift summed over only some of the broadcast axes" in out


def test_stub_left_unfilled_is_one_clear_message(tmp_path, capsys):
    run(capsys, "start", "layer_norm", "--dir", tmp_path)
    code, out, err = run(capsys, "check", "layer_norm", tmp_path / "layer_norm.py")
    assert code == 1 and "backward still raises NotImplementedError" in out
    assert_no_traceback_of_ours(out + err)


def test_missing_file_says_how_to_create_it(tmp_path, capsys):
    code, out, _ = run(capsys, "check", "softmax", tmp_path / "nowhere.py")
    assert code == 1 and "no such file" in out and "tinygpt exercise start softmax" in out


def test_file_that_does_not_import_names_the_line(tmp_path, capsys):
    path = sheet_with(tmp_path, capsys, "layer_norm", "def backward(dy, cache):", "def backward(dy, cache)", "broken.py")
    line = path.read_text().splitlines().index("def backward(dy, cache)") + 1
    code, out, err = run(capsys, "check", "layer_norm", path)
    assert code == 1 and f"broken.py:{line}: cannot import your file: SyntaxError" in out
    assert_no_traceback_of_ours(out + err)


def test_error_at_import_shows_only_the_learners_lines(tmp_path, capsys):
    path = tmp_path / "raises.py"
    path.write_text("import numpy as np\n\nTABLE = np.zeros(3)[7]\n")
    code, out, err = run(capsys, "check", "gelu", path)
    assert code == 1 and f'File "{path}", line 3' in out and "TABLE = np.zeros(3)[7]" in out
    assert out.splitlines()[-2] == f"importing {path} failed: IndexError: index 7 is out of bounds for axis 0 with size 3"
    assert_no_traceback_of_ours(out + err)


def test_exception_inside_backward_shows_their_traceback_then_one_line(tmp_path, capsys):
    path = sheet_with(tmp_path, capsys, "layer_norm", STUB, "    return helper(dy)\n\n\ndef helper(dy):\n    return dy @ dy")
    code, out, err = run(capsys, "check", "layer_norm", path)
    assert code == 1
    assert "in backward\n    return helper(dy)" in out and "in helper\n    return dy @ dy" in out
    assert "your backward failed: ValueError: matmul" in out
    assert_no_traceback_of_ours(out + err)


def test_backward_returning_the_wrong_shape_is_reported_per_gradient(tmp_path, capsys):
    path = sheet_with(tmp_path, capsys, "linear", '    raise NotImplementedError("write dx, dW and db, then return them")',
                      "    return dy @ W, x.reshape(-1, 4).T @ dy.reshape(-1, 5), dy.sum(axis=(0, 1))")
    code, out, _ = run(capsys, "check", "linear", path, "--hint", "2")
    assert code == 1 and "dW  shape (4, 5)    wrong, expected (5, 4)" in out and "hint: dW = x^T dy, the transpose" in out
    assert "FAIL: 1 of 3 gradients wrong (dW)" in out


@pytest.mark.parametrize("body,message", [
    ("    return dy", "backward returned a ndarray; expected 3: (dx, dscale, dshift)"),
    ("    return dy, dy", "backward returned a tuple of 2 values; expected 3: (dx, dscale, dshift)"),
    ("    return [dy, dy]", "backward returned a list of 2 values; expected 3: (dx, dscale, dshift)"),
    ("    return (g for g in (dy, dy, dy))", "backward returned a generator"),
])
def test_backward_returning_the_wrong_number_of_values(tmp_path, capsys, body, message):
    code, out, _ = run(capsys, "check", "layer_norm", sheet_with(tmp_path, capsys, "layer_norm", STUB, body))
    assert code == 1 and message in out


def test_file_without_backward_or_with_a_changed_forward(tmp_path, capsys):
    path = tmp_path / "empty.py"
    path.write_text("import numpy as np\n")
    code, out, _ = run(capsys, "check", "gelu", path)
    assert code == 1 and "defines no function forward()" in out
    path = sheet_with(tmp_path, capsys, "gelu", "y = 0.5 * x", "y = 0.6 * x", "changed.py")
    code, out, _ = run(capsys, "check", "gelu", path)
    assert code == 1 and "your forward computes something else" in out


def test_show_solution_prints_the_plain_math_in_the_sheets_interface(tmp_path, capsys):
    path = sheet_with(tmp_path, capsys, "layer_norm", STUB, RIGHT)
    code, out, _ = run(capsys, "check", "layer_norm", path, "--show-solution")
    assert code == 0
    solution = out[out.index("the solution for layer_norm"):]
    assert "def layer_norm(dy, cache):" in solution and "x, scale, xhat, rstd = cache" in solution
    assert "ctx.saved" not in solution and "def backward(ctx" not in solution


def test_show_solution_for_the_block_prints_the_answer_key(tmp_path, capsys):
    path = tmp_path / "block.py"
    path.write_text("from tinygpt.exercises.sheets.block import forward\n\n\ndef backward(dout, cache):\n    raise NotImplementedError\n")
    code, out, _ = run(capsys, "check", "block", path, "--show-solution")
    assert code == 1 and "def block(dout, cache):" in out


def test_running_the_sheet_with_python_checks_it(tmp_path, capsys):
    import subprocess
    import sys

    path = sheet_with(tmp_path, capsys, "layer_norm", STUB, RIGHT)
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "PASS: all 3 gradients right" in done.stdout, done.stderr


def test_hint_level_must_be_1_or_2(tmp_path, capsys):
    code, _, err = run(capsys, "check", "gelu", "--hint", "gelu.py")
    assert code == 2 and "--hint takes 1 or 2, got 'gelu.py' (put the file before --hint)" in err


NEW = ["rms_norm", "rope", "swiglu", "gqa", "online_softmax", "flash_backward"]


def with_answer_key(tmp_path, name, body=None):
    """The sheet `start` writes, with the answer key's source (or `body`) bound to the names it asks for."""
    import inspect

    exercise = EXERCISES[name]
    head, tail = sheet_text(name).split('\nif __name__ == "__main__":')
    source = body or inspect.getsource(exercise.answer)
    bind = "\n".join(f"{f} = {name}.{f}" for f in exercise.fill) if exercise.driver else f"backward = {name}"
    path = tmp_path / f"{name}.py"
    path.write_text(f'{head}\n{source}\n\n{bind}\n\n\nif __name__ == "__main__":{tail}')
    return path


@pytest.mark.parametrize("name", NEW)
def test_new_answer_keys_pass_through_the_child_process(tmp_path, capsys, name):
    code, out, _ = run(capsys, "check", name, with_answer_key(tmp_path, name))
    assert code == 0 and ("PASS: all" in out or "PASS: the" in out), out
    assert_no_traceback_of_ours(out)


def test_flash_backward_holding_the_whole_score_matrix_fails_through_the_child_process(tmp_path, capsys):
    untiled = '''def flash_backward(dout, cache):
    q, k, v, out, L = cache
    Tq, Tk = q.shape[-2], k.shape[-2]
    S = np.where(future(slice(0, Tq), slice(0, Tk), Tq, Tk), -np.inf, q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1]))
    P = np.exp(S - L[..., None])
    dP = dout @ v.swapaxes(-1, -2)
    dS = P * (dP - (dout * out).sum(-1)[..., None]) / np.sqrt(q.shape[-1])
    return dS @ k, dS.swapaxes(-1, -2) @ q, P.swapaxes(-1, -2) @ dout
'''
    code, out, _ = run(capsys, "check", "flash_backward", with_answer_key(tmp_path, "flash_backward", untiled))
    assert code == 1 and out.count(" exact ") == 3 and "more than the" in out and "tile at a time" in out
    assert "FAIL: every gradient is right, but not computed tile by tile" in out


def test_online_softmax_checks_the_learners_step_and_finish_in_the_sheets_own_loop(tmp_path, capsys):
    path = with_answer_key(tmp_path, "online_softmax")
    # a file that replaces the given loop with the plain softmax is still checked block by block
    path.write_text(path.read_text() + "\n\ndef run(functions, s, v):\n    raise AssertionError('not used by the check')\n")
    code, out, _ = run(capsys, "check", "online_softmax", path, "--show-solution")
    assert code == 0 and "PASS: all 2 outputs right" in out and "each output is compared" in out
    solution = out.split("the solution for online_softmax")[1]
    assert "def step(m, l, a, s, v):" in solution and "def finish(m, l, a):" in solution and "staticmethod" not in solution
    stub = tmp_path / "stub"
    assert run(capsys, "start", "online_softmax", "--dir", stub)[0] == 0
    code, out, _ = run(capsys, "check", "online_softmax", stub / "online_softmax.py")
    assert code == 1 and "your step or finish still raises NotImplementedError" in out
