"""Files tinygpt writes: a user-named output never replaces what is there without --force,
a device, FIFO or "-" is written directly (never renamed onto), the path is checked before
the run and errors name it; every file and folder gets the mode a plain open() or mkdir()
gives under the umask; a full disk is one line naming the file (issue 19, items 2, 3, 10)."""
import contextlib
import io
import json
import os
import pickle
import resource
import select
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import tinygpt as tg
from tinygpt import nn
from tinygpt.checkpoint import save_checkpoint
from tinygpt.cli import main
from tinygpt.data import CharTokenizer
from tinygpt.files import atomic_write_text, check_output, make_temp_dir, write_output
from tinygpt.optim import AdamW
from tinygpt.validation import UsageError

SMALL = ["trace", "--batch-size", "1", "--tokens", "8"]
NOBODY = 65534


def run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def no_run(monkeypatch):
    """Building the model fails the test: a refusal must come before any work."""
    def ran(args):
        raise AssertionError("the run started before the output path was checked")
    monkeypatch.setattr("tinygpt.trace_cli._model_and_tokenizer", ran)


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ------------------------------------------------------------------ item 2: refusals before the run

def test_trace_refuses_to_replace_an_existing_file_and_keeps_it(tmp_path, no_run):
    data = tmp_path / "data.txt"
    data.write_text("my data")
    code, out, err = run(SMALL + ["--json", str(data)])
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and f"--json {data} already exists" in err and "--force" in err
    assert data.read_text() == "my data"


def test_trace_refuses_a_checkpoint_config_it_would_make_unusable(tmp_path, no_run):
    config = tmp_path / "config.json"
    config.write_text('{"emb_dim": 8}')
    code, _, err = run(SMALL + ["--dot", str(config)])
    assert code == 2 and str(config) in err and config.read_text() == '{"emb_dim": 8}'


@pytest.mark.parametrize("case, words", [
    ("missing folder", ["the folder", "does not exist"]),
    ("folder", ["is a folder"]),
    ("long name", ["bytes", "255"]),
    ("file as folder", ["is not a folder"]),
    ("same file twice", ["--dot and --json both name"]),
    ("empty name", ["expected a file name"]),
])
def test_trace_checks_output_paths_before_the_run(tmp_path, no_run, case, words):
    (tmp_path / "plain").write_text("x")
    path = {"missing folder": tmp_path / "nope" / "t.json", "folder": tmp_path, "long name": tmp_path / ("n" * 256),
            "file as folder": tmp_path / "plain" / "t.json", "same file twice": tmp_path / "t.json", "empty name": ""}[case]
    extra = ["--dot", str(path)] if case == "same file twice" else []
    code, out, err = run(SMALL + ["--json", str(path)] + extra)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert str(path) in err


def test_a_name_that_fits_the_file_system_is_written_though_the_temporary_name_would_not(tmp_path):
    path = tmp_path / ("n" * 255)  # the longest name ext4 allows; ".NAME.XXXXXXXX.tmp" would be 269 bytes
    check_output(str(path), "--json")
    write_output(str(path), "{}")
    assert path.read_text() == "{}" and os.listdir(tmp_path) == [path.name]


def test_force_replaces_an_existing_output_and_keeps_its_mode(tmp_path, capsys):
    target = tmp_path / "t.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    assert main(SMALL + ["--json", str(target), "--force"]) == 0
    assert json.loads(target.read_text())["nodes"] and mode(target) == 0o640


# ------------------------------------------------------------------ item 2: targets that are not regular files

def test_dev_null_stays_a_device(capsys):
    assert main(SMALL + ["--json", "/dev/null", "--html", "/dev/null"]) == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert not any(name.startswith(".null") for name in os.listdir("/dev"))


def test_a_fifo_is_written_into_not_replaced(tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo).read()))
    reader.start()
    assert main(SMALL + ["--dot", str(fifo)]) == 0
    reader.join(timeout=30)
    assert received and received[0].startswith("digraph backward {")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_dash_writes_to_standard_output_and_the_report_to_stderr(capsys):
    assert main(SMALL + ["--json", "-"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["nodes"]  # stdout holds the JSON alone
    assert "backward nodes in the order they ran" in captured.err


def test_a_failed_write_names_the_users_path_not_the_temporary_file(tmp_path):
    target = tmp_path / "history.json"
    code = ("import resource, signal\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
            "from tinygpt.files import atomic_write_text\n"
            f"atomic_write_text({str(target)!r}, 'x' * 100000)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.endswith(f"OSError: could not write {target}: File too large"), done.stderr
    assert ".tmp" not in last and os.listdir(tmp_path) == []  # and the temporary file is gone


def test_a_device_that_refuses_the_write_is_one_line_naming_it(capsys):
    assert main(SMALL + ["--json", "/dev/full"]) == 1
    assert capsys.readouterr().err == "tinygpt: error: could not write /dev/full: No space left on device\n"


def test_a_fifo_as_input_data_is_refused_instead_of_waiting_forever(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe")
    assert main(["train", "--data", str(tmp_path / "pipe"), "--out", str(tmp_path / "run")]) == 2
    assert "is not a regular file" in capsys.readouterr().err


# ------------------------------------------------------------------ item 2: as a user who is not root

def as_nobody(fn):
    """fn() in a forked child that has given up root for the user nobody (what setpriv
    --reuid=65534 --regid=65534 --clear-groups does); its result, or its error as text."""
    if os.geteuid() != 0:
        return fn()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            os.environ["TINYGPT_NUM_THREADS"] = "1"  # the parent's thread pool has no threads in a forked child
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            payload = pickle.dumps(("ok", fn()))
        except BaseException as e:
            payload = pickle.dumps(("error", f"{type(e).__name__}: {e}"))
        with os.fdopen(w, "wb") as f:
            f.write(payload)
        os._exit(0)
    os.close(w)
    if not select.select([r], [], [], 120)[0]:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError("the child running as nobody gave no answer in 120 s")
    with os.fdopen(r, "rb") as f:
        kind, value = pickle.loads(f.read())
    os.waitpid(pid, 0)
    if kind == "error":
        raise AssertionError(value)
    return value


@pytest.fixture
def shared_dirs(tmp_path_factory):
    """(a folder only root may write, a folder everyone may write), both readable by nobody."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="tinygpt-outputs-"))
    locked, open_ = base / "locked", base / "open"
    locked.mkdir()
    open_.mkdir()
    for folder, m in ((base, 0o755), (locked, 0o755), (open_, 0o1777)):
        os.chmod(folder, m)
    yield locked, open_
    import shutil

    shutil.rmtree(base)


def test_outputs_as_a_user_who_is_not_root(shared_dirs, tmp_path):
    locked, open_ = shared_dirs
    assert run(SMALL + ["--json", str(tmp_path / "warm.json"), "--html", str(tmp_path / "warm.html")])[0] == 0  # imports done
    results = as_nobody(lambda: [run(SMALL + ["--json", "/dev/null"]),
                                 run(SMALL + ["--json", str(locked / "t.json")]),
                                 run(SMALL + ["--html", str(open_ / "t.html")])])
    (null_code, _, null_err), (locked_code, locked_out, locked_err), (open_code, _, _) = results
    assert null_code == 0, null_err  # written into, not renamed onto: no temporary file in /dev needed
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert locked_code == 2 and "permission denied" in locked_err and str(locked / "t.json") in locked_err
    assert "parameters" not in locked_out  # refused before the run
    assert open_code == 0 and (open_ / "t.html").stat().st_uid == (NOBODY if os.geteuid() == 0 else os.geteuid())


# ------------------------------------------------------------------ item 3: modes under the umask

def tiny_model():
    tg.manual_seed(0)
    return nn.Linear(3, 2)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750), (0o002, 0o664, 0o775)])
def test_written_files_and_folders_get_the_umask_modes(tmp_path, mask, file_mode, dir_mode):
    with umask(mask):
        atomic_write_text(tmp_path / "a.txt", "x")
        folder = make_temp_dir(tmp_path, ".tmp-x-")
        expected_file = (tmp_path / "plain.txt")
        expected_file.write_text("x")
    assert mode(tmp_path / "a.txt") == file_mode == mode(expected_file)
    assert mode(folder) == dir_mode


def test_a_checkpoint_and_its_history_get_the_umask_modes(tmp_path):
    from tinygpt.model import GPTModel
    from tinygpt.train import plot_losses

    cfg = {"vocab_size": 5, "context_length": 4, "emb_dim": 4, "n_heads": 1, "n_layers": 1, "drop_rate": 0.0,
           "qkv_bias": False}
    model = GPTModel(cfg)
    optimizer = AdamW(model.parameters(), lr=1e-3)
    with umask(0o022):
        folder = save_checkpoint(tmp_path / "run", 1, model, CharTokenizer.from_text("abcde"), optimizer, {"step": 1})
        history = {"step": [1], "tokens_seen": [4], "train_loss": [1.0], "val_loss": [1.1]}
        plotted = plot_losses(history, tmp_path / "run" / "loss.png")
    assert mode(folder) == 0o755 and mode(tmp_path / "run" / "checkpoints") == 0o755
    for f in folder.iterdir():
        assert mode(f) == 0o644, f.name  # manifest.json was 0600: another user got "Permission denied"
    assert mode(tmp_path / "run" / "latest") == 0o644
    if plotted:
        assert mode(tmp_path / "run" / "loss.png") == 0o644


def test_trace_outputs_get_the_umask_mode(tmp_path, capsys):
    with umask(0o027):
        assert main(SMALL + ["--json", str(tmp_path / "t.json")]) == 0
    assert mode(tmp_path / "t.json") == 0o640


# ------------------------------------------------------------------ item 10: a full disk names the file

def limited(limit: int, code: str) -> subprocess.CompletedProcess:
    """Python code run with files limited to `limit` bytes (EFBIG, as on a full disk)."""
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, preexec_fn=preexec)


def test_a_full_disk_while_the_optimizer_state_is_written_is_one_error_naming_the_file(tmp_path):
    # weights 78 KB < limit < optimizer state 155 KB: the disk fills during optimizer.safetensors
    code = ("from tinygpt.model import GPTModel\nfrom tinygpt.optim import AdamW\n"
            "from tinygpt.checkpoint import save_checkpoint\nfrom tinygpt.data import CharTokenizer\n"
            "m = GPTModel({'vocab_size': 300, 'context_length': 4, 'emb_dim': 32, 'n_heads': 1, 'n_layers': 0,"
            " 'drop_rate': 0.0, 'qkv_bias': False})\n"
            "opt = AdamW(m.parameters())\n"
            "for p in m.parameters():\n"
            "    p.grad = p.detach()\n"
            "opt.step()  # AdamW's running means exist from the first step\n"
            "try:\n"
            f"    save_checkpoint({str(tmp_path)!r}, 1, m, CharTokenizer.from_text('ab'), opt)\n"
            "except OSError as e:\n"
            "    print('OSError:', e)\n")
    done = limited(110_000, code)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "OSError: could not write checkpoint" in done.stdout and "optimizer.safetensors" in done.stdout
    assert "File too large" in done.stdout and ".tmp" not in done.stdout
    assert not (tmp_path / "checkpoints" / "step_000001").exists()


def test_a_full_disk_while_the_loss_history_is_written_names_the_file(tmp_path):
    code = ("from tinygpt.train import Trainer\n"
            "class T:\n"
            f"    out_dir = __import__('pathlib').Path({str(tmp_path)!r})\n"
            "    class state:\n"
            "        history = {'step': list(range(5000)), 'train_loss': [1.0] * 5000}\n"
            "try:\n"
            "    Trainer.write_history(T)\n"
            "except OSError as e:\n"
            "    print('OSError:', e)\n")
    done = limited(20_000, code)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert f"could not write {tmp_path / 'history.json'}: File too large" in done.stdout


def test_the_file_hash_has_one_source(tmp_path):
    import hashlib

    import tinygpt.checkpoint
    import tinygpt.rundir
    from tinygpt.files import sha256_file

    for module in (tinygpt.checkpoint, tinygpt.rundir):
        text = Path(module.__file__).read_text()
        assert "def sha256_file" not in text and "hashlib.sha256()" not in text, module.__name__
    data = tmp_path / "data.txt"
    data.write_bytes(b"x" * (3 << 20))  # over one 1 MB piece
    assert sha256_file(data) == hashlib.sha256(data.read_bytes()).hexdigest()
    assert tinygpt.rundir.data_identity(data)["sha256"] == sha256_file(data)


# ------------------------------------------------------------------ Hugging Face folders: never a user's other files

@pytest.mark.parametrize("save", ["save_gpt2", "save_llama"])
def test_saving_a_model_folder_never_deletes_a_users_other_files(tmp_path, monkeypatch, save):
    """save_gpt2(model, ".") deleted everything in the current folder before renaming failed."""
    if save == "save_gpt2":
        from tinygpt.model import GPTModel
        from tinygpt.pretrained import save_gpt2 as saver

        model = GPTModel({"vocab_size": 11, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 1,
                          "drop_rate": 0.0, "qkv_bias": False})
    else:
        from tinygpt.hf_llama import save_llama as saver
        from tinygpt.llama import LLAMA_PRESETS, LlamaModel

        model = LlamaModel({**LLAMA_PRESETS["llama-small"], "n_layers": 1})
    (tmp_path / "precious.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for target in (".", tmp_path, tmp_path / "precious.txt"):
        with pytest.raises(FileExistsError, match="precious.txt|is a file"):
            saver(model, target)
    assert (tmp_path / "precious.txt").read_text() == "mine" and os.listdir(tmp_path) == ["precious.txt"]
    with umask(0o022):
        out = saver(model, tmp_path / "hf")
        saver(model, out)  # an earlier save of the same kind is replaced
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert mode(out) == 0o755 and mode(out / "model.safetensors") == 0o644
