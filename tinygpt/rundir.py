"""A run directory's housekeeping: one writer at a time (a lock file holding its PID), the
leftovers of a killed writer cleaned away, and the identity of the training data (absolute
path, size and sha256) so a resumed run knows it reads the same text.

With several processes (data parallel), only the one that writes checkpoints takes the lock.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
from pathlib import Path

from tinygpt.errors import RunError
from tinygpt.files import sha256_file

LOCK = ".lock"


class RunLocked(RunError):
    """Another live process holds the run directory."""


class RunLock:
    """`with RunLock(run_dir):` holds run_dir/.lock ("PID HOST") for the duration.

    The file is created exclusively (O_EXCL), so of two processes starting at once exactly
    one wins. A lock whose process is gone (same host, PID not running) is stale: it is
    taken over, with a note. On entering, temporary files and folders that a killed writer
    left behind are removed; they can belong to no one else while the lock is held."""

    def __init__(self, run_dir: str | os.PathLike, show=print):
        self.run_dir, self.show = Path(run_dir), show
        self.path = self.run_dir / LOCK
        self.held = False

    def __enter__(self) -> "RunLock":
        from tinygpt import distributed

        if not distributed.is_main():  # data parallel: rank 0 alone writes, so it alone locks
            return self
        if self.run_dir.exists() and not self.run_dir.is_dir():
            from tinygpt.validation import UsageError

            raise UsageError(f"--out {self.run_dir} is a file, not a run directory")
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held = True
            removed = clean_temporary_files(self.run_dir)
            if removed:
                self.show(f"removed {removed} temporary file(s) left in {self.run_dir} by an interrupted write")
            return self
        raise RunLocked(f"could not lock {self.path}")

    def _check_stale(self) -> None:
        busy = self.in_use(self.run_dir)
        if busy:
            raise RunLocked(busy)
        try:
            pid_text = (self.path.read_text().split() or ["?"])[0]
        except OSError:
            pid_text = "?"
        self.show(f"taking over the stale lock {self.path} (process {pid_text} is gone)")
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    @staticmethod
    def in_use(run_dir: str | os.PathLike) -> str | None:
        """Why run_dir is in use by another live process (its lock names one), or None."""
        path = Path(run_dir) / LOCK
        try:
            pid_text, host = (path.read_text().split() + ["", ""])[:2]
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        if host not in ("", socket.gethostname()):
            return (f"{run_dir} is in use by process {pid} on {host} (lock file {path}); "
                    f"wait for it, or delete the lock file if that process is gone")
        if _alive(pid):
            return f"{run_dir} is in use by process {pid} (lock file {path}); wait for it to finish, or train into another --out"
        return None

    def __exit__(self, *exc) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False
            if self.created:  # a run that failed before writing anything leaves no empty folder
                try:
                    self.run_dir.rmdir()
                except OSError:
                    pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # it exists, owned by someone else
    return True


def clean_temporary_files(run_dir: str | os.PathLike) -> int:
    """Remove checkpoints/.tmp-step_* folders and .*.tmp files (atomic writes cut short)."""
    run_dir = Path(run_dir)
    leftovers = list((run_dir / "checkpoints").glob(".tmp-step_*")) + list(run_dir.glob(".*.tmp"))
    leftovers += list(run_dir.glob("*.tmp.png"))
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(leftovers)


# ------------------------------------------------------------------ what the run trained on

def data_identity(path: str | os.PathLike) -> dict:
    """{"path": absolute path, "size": bytes, "sha256": hex} of a data file."""
    path = Path(path).resolve()
    return {"path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}


def text_identity(text: str, name: str) -> dict:
    """The identity of a text that is not a file (the default corpus)."""
    data = text.encode("utf-8")
    return {"path": None, "name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def check_same_data(saved: dict, current: dict) -> str | None:
    """Why `current` is not the data the run was saved with (None: the same)."""
    if saved.get("sha256") is None:  # a run from before data was hashed: only the path can be compared
        return None
    if saved.get("sha256") != current.get("sha256"):
        return (f"{saved.get('path') or saved.get('name')} has changed since the run was saved "
                f"(sha256 {saved['sha256'][:12]}..., now {current['sha256'][:12]}...)")
    return None


# ------------------------------------------------------------------ where a resumed run goes

def resume_target(folder: Path, step: int, out: str | os.PathLike | None) -> tuple[Path, bool]:
    """(run directory to continue in, whether that is a branch) for resuming checkpoint
    `folder` (saved at `step`). Continuing in its own run from a step older than the run's
    newest would replace the later checkpoints, so that is refused; `--out NEW` branches."""
    from tinygpt.checkpoint import checkpoints, run_dir_of, step_of
    from tinygpt.validation import UsageError

    source = run_dir_of(folder) if folder.parent.name == "checkpoints" else None
    if out is not None and (source is None or Path(out).resolve() != source.resolve()):
        if checkpoints(out) or (Path(out) / "latest").exists():
            raise UsageError(f"--out {out} already holds a run; branch into an empty or new directory")
        return Path(out), True
    if source is None:
        raise UsageError(f"{folder} is not inside a run directory (RUN/checkpoints/step_N); "
                         f"say where to continue with --out DIR")
    from tinygpt import distributed

    # a live trainer there: that, not its newer checkpoints, is the reason. (Rank 0 alone asks:
    # under mpiexec it takes the lock, and the other ranks may look after it has.)
    busy = RunLock.in_use(source) if distributed.is_main() else None
    if busy:
        raise RunLocked(busy)
    later = [p.name for p in checkpoints(source) if step_of(p) > step]
    if later:
        raise UsageError(f"{source} has later checkpoints ({', '.join(later)}) than {folder.name}: training on from "
                         f"step {step} there would replace them. Continue the newest with --resume {source}, "
                         f"or branch from step {step} into a new run with --resume {folder} --out NEW_DIR")
    return source, False
