"""Writing files without losing anything: atomic writes (temp file + rename), the outputs a user
names on the command line, temporary folders, and the sha256 of a file.

Every file and folder made here gets the mode a plain `open()` or `mkdir()` would give under the
user's umask (0644 / 0755 for the usual umask 022): the temporary name is created with mode 0666
(0777 for a folder) and the kernel takes the umask off, as it does for any new file. (Python's
mkstemp and mkdtemp give 0600 and 0700, so another user of a shared run directory could read
nothing.) A file replaced in place keeps its own mode, as `open(path, "w")` keeps it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
import sys
from pathlib import Path

TEMP_SUFFIX = ".tmp"
# the names that stand for an already open stream: written directly, like a device
_STREAM_ALIASES = ("/dev/stdout", "/dev/stderr", "/dev/fd/", "/proc/self/fd/")


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as hex (read in 1 MB pieces, so any size fits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------ atomic writes

def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` so readers see either the old file or the whole new one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes, replace: bool = True) -> None:
    """Write `data` to `path` so readers see either the old file or the whole new one.

    The bytes go to a temporary file in the same folder (so the final rename never crosses a
    file system), are flushed to disk, and then take the name with one rename, which is atomic:
    a crash half-way leaves the old file intact instead of a truncated one. A target that is not
    a regular file (a device such as /dev/null, a FIFO) is written directly: renaming onto it
    would replace the device itself. A symbolic link is followed, so the link stays. With
    replace=False an existing file is never replaced (FileExistsError), even one that appears
    while the data is written. A failure names `path`, never the temporary file."""
    target = Path(os.path.realpath(path))
    if writes_directly(path):
        _write_directly(path, data)
        return
    fd = tmp = None
    try:
        fd, tmp = _new_temp_file(target)
        if target.exists():  # as open(path, "w") would, keep the mode of the file replaced
            os.fchmod(fd, stat.S_IMODE(target.stat().st_mode))
        with os.fdopen(fd, "wb") as f:
            fd = None
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _rename(tmp, target, replace)
        tmp = None
    except OSError as e:
        raise _naming(e, path) from None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def writes_directly(path: str | os.PathLike) -> bool:
    """Whether `path` is written in place rather than by rename: a device, a FIFO, a socket, or
    a name for an open stream (/dev/stdout)."""
    if str(path).startswith(_STREAM_ALIASES):
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def _write_directly(path: str | os.PathLike, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise _naming(e, path) from None


def _new_temp_file(target: Path) -> tuple[int, Path]:
    """(open file descriptor, path) of a new file `.NAME.XXXXXXXX.tmp` beside target, mode 0666
    less the umask. A long name is shortened in the temporary one, so every name that fits the
    file system can be written."""
    for _ in range(100):
        tmp = target.with_name(_temp_name(target.name))
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {target}")


def _temp_name(name: str) -> str:
    return f".{name[:100]}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def _rename(tmp: Path, target: Path, replace: bool) -> None:
    if replace:
        os.replace(tmp, target)
        return
    try:  # a hard link fails if the name exists: no moment where another file could be replaced
        os.link(tmp, target)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"{target} already exists") from None
    except OSError:  # a file system without hard links: check, then rename
        if target.exists():
            raise FileExistsError(errno.EEXIST, f"{target} already exists") from None
        os.replace(tmp, target)
    else:
        tmp.unlink()


def _naming(e: OSError, path) -> OSError:
    """e, reworded to name the user's path (a temporary file's name would mean nothing to them)."""
    if isinstance(e, FileExistsError):
        named = FileExistsError(f"{path} already exists; nothing was written")
    else:
        named = type(e)(f"could not write {path}: {e.strerror or e}")  # the same class: PermissionError stays one
    named.errno = e.errno
    return named


def give_umask_mode(path: str | os.PathLike) -> None:
    """Set a new file's mode to what open() gives under the umask (for writers, such as
    safetensors, that create files 0600)."""
    os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
    """The process's umask, read from /proc where Linux offers it: setting the umask to learn it
    would race with other threads creating files meanwhile."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new folder parent/PREFIXxxxxxxxx with the mode mkdir() gives (0777 less the umask)."""
    for _ in range(100):
        folder = Path(parent) / f"{prefix}{secrets.token_hex(4)}"
        try:
            folder.mkdir(0o777)
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name in {parent}")


def check_replaceable(folder: str | os.PathLike, own_files: set[str]) -> None:
    """Refuse (FileExistsError) to replace `folder` unless it is missing, empty, or holds only
    own_files (an earlier save of the same kind): a user's other files are never deleted."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FileExistsError(f"{folder} is a file, not a folder; save into a new or empty folder")
    others = sorted(p.name for p in folder.iterdir() if p.name not in own_files)
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise FileExistsError(f"{folder} already holds other files ({shown}); replacing it would delete them: "
                              f"save into a new or empty folder")


def replace_folder(done: Path, folder: str | os.PathLike, own_files: set[str]) -> None:
    """Rename the finished temporary folder `done` to `folder`, replacing an earlier save there
    (see check_replaceable)."""
    folder = Path(folder)
    check_replaceable(folder, own_files)
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(done, folder)


# ------------------------------------------------------------------ outputs the user names

def check_output(path: str, option: str, force: bool = False) -> None:
    """Refuse (UsageError, naming `option` and `path`) an output that cannot or must not be
    written, before any work: checked again when it is written, this catches the mistakes
    that would otherwise throw a run's result away at its end.

    "-" means standard output. A device or FIFO is written directly. A regular file that exists
    is kept unless force. Otherwise the folder must exist and be writable, and the name must
    fit the file system."""
    from tinygpt.validation import UsageError

    if path == "-" or writes_directly(path):
        if path != "-" and not os.access(path, os.W_OK):
            raise UsageError(f"{option} {path}: not writable (permission denied)")
        return
    if not path or path.endswith(os.sep):
        raise UsageError(f"{option} {path!r}: expected a file name")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a folder; give a file name (for example {os.path.join(path, 'out')})")
    if os.path.lexists(path) and not os.path.exists(path):
        raise UsageError(f"{option} {path} is a broken symbolic link (to {os.readlink(path)})")
    if os.path.exists(path) and not force:
        raise UsageError(f"{option} {path} already exists; give --force to replace it, or choose another name")
    folder = os.path.dirname(os.path.realpath(path))
    shown = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise UsageError(f"{option} {path}: the folder {shown} {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: cannot create files in the folder {shown} (permission denied)")
    name_max = _name_max(folder)
    if len(os.fsencode(os.path.basename(path))) > name_max:
        raise UsageError(f"{option} {path}: the file name has {len(os.fsencode(os.path.basename(path)))} bytes, "
                         f"more than this file system allows ({name_max})")


def write_output(path: str, text: str, force: bool = False) -> None:
    """Write a user-named output checked by check_output: "-" to standard output, a device or
    FIFO directly, a file atomically (an existing one only with force)."""
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    atomic_write_bytes(path, text.encode("utf-8"), replace=force)


def _name_max(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


# ------------------------------------------------------------------ JSON files

def read_json(path: str | os.PathLike):
    """The JSON value in a UTF-8 file; a file that is not JSON is a ValueError naming the file
    and the position (json's own message names only the position)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                         f"expected a JSON file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def check_format(d: dict, fmt: str, version: int, what: str) -> None:
    """Raise ValueError unless the JSON description `d` says it is `fmt` at `version`."""
    if d.get("format") != fmt or d.get("version") != version:
        raise ValueError(f"not a {what} description: format {d.get('format')!r} version "
                         f"{d.get('version')!r}, expected {fmt!r} version {version}")
