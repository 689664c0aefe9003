"""The ranks of a data-parallel run: joining them, who is who, and ending them together.

`mpiexec -n N python ...` starts the ranks; `init()` joins them into one process group
(tinygpt/transport.py) and the functions here reach it. In a process started alone they
describe a world of one, and the collectives change nothing.

Ending a run. A rank that fails alone in the middle of training must stop the others, or
they wait for it forever in their next collective: `end_every_rank_on_failure` calls
MPI_Abort. A stop that every rank reaches at the same point needs no abort: each rank leaves
with its status and rank 0 alone says why, once. Such points are
  - the two meeting points, when the ranks join and when training starts (MEETINGS): a rank
    that ended before one (a bad option, a missing file, a model that does not fit together)
    attends it anyway, saying so, and the others stop there instead of waiting for it;
  - the checks every rank agrees on (`stop_if_any`: devices, a run started differently, a
    batch that does not split over the ranks);
  - a Ctrl-C agreed at a step boundary (`ending_together`).
Until training starts, ranks other than 0 hold back what they print (_EarlyOutput), and say
it only if rank 0 did not say the same.
"""
from __future__ import annotations

import atexit
import io
import os
import sys
import time

from tinygpt import backend
from tinygpt.transport import ProcessGroup
from tinygpt.validation import UsageError

# MPI launchers set one of these in every rank they start (MPICH/Intel MPI, Open MPI, MVAPICH)
LAUNCHER_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
LAUNCHER_RANKS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")

_group: ProcessGroup | None = None
_agreed_status: int | None = None  # the exit status every rank agreed to end with (no MPI_Abort then)
_early: "_EarlyOutput | None" = None  # this rank's stderr until training starts (see _EarlyOutput)


class DistributedError(UsageError):
    """The ranks were started in a way that cannot work (exit status 2)."""


class StopEveryRank(BaseException):
    """Raised on every rank at once, for a reason all the ranks agreed on (see stop_if_any).
    Not an Exception: like SystemExit it ends the run, and `except Exception` lets it pass
    up to end_every_rank_on_failure, where rank 0 alone prints it."""

    def __init__(self, message: str, status: int = 2, speaks: bool = True):
        super().__init__(message)
        self.message, self.status, self.speaks = message, status, speaks  # speaks: rank 0 (prints it)


# ------------------------------------------------------------------ joining the ranks

def launched_by_mpi() -> bool:
    """Whether this process was started by mpiexec/mpirun with more than one rank."""
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in LAUNCHER_VARIABLES)


def init(force: bool = False, device: str = "cpu", nccl=None, transport: str = "auto") -> int:
    """Join the ranks started by an MPI launcher (or, with force, whatever MPI sees) and
    return the world size; in a process started alone, do nothing and return 1.
    device "cuda" puts each rank on its own GPU of its machine. `nccl` replaces
    cupy.cuda.nccl (tests use a stand-in); transport "nccl" sends NumPy arrays through it too.
    A device or setting that does not work on some rank stops every rank (StopEveryRank)."""
    global _group
    if _group is not None:
        return _group.size
    if not (force or launched_by_mpi()):
        return 1
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistributedError("running under an MPI launcher needs mpi4py: pip install -e \".[mpi]\" "
                               "(or pip install mpi4py mpich)") from None
    comm = MPI.COMM_WORLD
    if _next_meeting == 0:
        _meet(comm, None)
    devices = comm.allgather(device)
    differ = next((r for r, d in enumerate(devices) if d != devices[0]), None)
    _stop_if_any(comm, None if differ is None else
                f"rank {differ} was started differently from rank 0 (device: {devices[differ]!r} on rank {differ}, "
                f"{devices[0]!r} on rank 0; from --device or TINYGPT_DEVICE); start every rank on the same device", 2)
    _stop_if_any(comm, _device_problem(device), 2)
    _group = ProcessGroup(comm, device, nccl, transport)
    atexit.register(_group.close)  # runs before mpi4py's own MPI_Finalize (registered earlier)
    return _group.size


def _device_problem(device: str) -> str | None:
    """What keeps this rank from running on `device`, or None."""
    if device not in backend.DEVICES:
        return f"unknown device {device!r}; expected one of {', '.join(backend.DEVICES)}"
    if device == "cuda":
        usable, why = backend.cuda_available()
        if not usable:
            return f"rank {rank_from_launcher()} cannot use device 'cuda': {why}"
    return None


def rank_from_launcher() -> int:
    """This rank's number as the launcher set it (usable before init)."""
    for name in LAUNCHER_RANKS:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return rank()


def rank() -> int:
    return _group.rank if _group else 0


def world_size() -> int:
    return _group.size if _group else 1


def is_main() -> bool:
    """Rank 0: the one that prints, shows progress and writes checkpoints and history."""
    return rank() == 0


def describe() -> str:
    """One line naming every rank's process and machine (mpiexec names a dead one by its PID)."""
    ranks = "; ".join(f"rank {r}: {where}" for r, where in enumerate(_group.where)) if _group else "one process"
    return f"data parallel over {world_size()} ranks ({ranks})"


# ------------------------------------------------------------------ collectives

def all_reduce(arrays, op: str = "mean"):
    """Sum (op "sum") or average (op "mean") each array over the ranks, in place; returns them."""
    if _group is not None:
        _group.all_reduce(list(arrays), op)
    return arrays


def broadcast(arrays, root: int = 0):
    """Overwrite each array, in place, with rank `root`'s; returns them."""
    if _group is not None:
        _group.broadcast(list(arrays), root)
    return arrays


def barrier() -> None:
    """Wait until every rank is here."""
    if _group is not None:
        _group.wait(_group.comm.Ibarrier())


def broadcast_object(obj, root: int = 0):
    """Rank `root`'s copy of a picklable object, on every rank."""
    return _group.comm.bcast(obj, root=root) if _group else obj


def all_gather_object(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    return _group.comm.allgather(obj) if _group else [obj]


# ------------------------------------------------------------------ ending a run

def stop_if_any(problem: str | None, status: int = 2) -> None:
    """Every rank says what is wrong on it (None: nothing). If any rank has a problem, every
    rank raises StopEveryRank with the first one, so they all stop here together."""
    _stop_if_any(_group.comm if _group else None, problem, status)


def _stop_if_any(comm, problem: str | None, status: int) -> None:
    problems = comm.allgather(problem) if comm is not None else [problem]
    first = next((p for p in problems if p), None)
    if first is not None:
        raise StopEveryRank(first, status, speaks=comm is None or comm.Get_rank() == 0)


def ending_together(status: int | None) -> None:
    """Every rank has agreed to end now with exit `status` (e.g. 130 after a Ctrl-C agreed at
    a step boundary), so that status no longer means this rank failed alone. None: not ending."""
    global _agreed_status
    _agreed_status = status


def abort(message: str, code: int = 1) -> None:
    """Print `message` naming this rank and stop every rank (a rank that merely exited with
    an error would leave the others waiting for it forever)."""
    _release_early_output()
    print(f"tinygpt: error: rank {rank()} of {world_size()}: {message}", file=sys.stderr, flush=True)
    if _group is not None and _group.size > 1:
        sys.stdout.flush()
        time.sleep(0.5)  # MPI_Abort kills every rank at once: give mpiexec time to forward what they printed
        _group.comm.Abort(code)


def end_every_rank_on_failure(main):
    """Wrap a command's main(). A StopEveryRank is printed by rank 0 and ends every rank with
    its status. Any other failure (non-zero status) on one rank stops the whole job, rather
    than leave the other ranks waiting for this one in their next collective."""
    def run(*args, **kwargs) -> int:
        _hold_early_output()
        try:
            code = main(*args, **kwargs)
        except KeyboardInterrupt:  # Ctrl-C before main() could catch it (while Python imports tinygpt)
            print("tinygpt: interrupted", file=sys.stderr, flush=True)
            code = 130
        except StopEveryRank as stop:
            _release_early_output()
            if stop.speaks:
                print(f"tinygpt: error: {stop.message}", file=sys.stderr, flush=True)
            return stop.status
        if _next_meeting < len(MEETINGS) and (_group is not None or launched_by_mpi()):
            return _attend_late(code)  # ended before a meeting point where the others may be waiting
        if code and world_size() > 1 and code != _agreed_status:
            abort(f"the command failed (exit status {code}); stopping every rank", code)
        return code
    return run


# ------------------------------------------------------------------ meeting points

# Every rank of a command passes these in order: in init(), and in start_training() (through
# meet_to_start_training). A rank that ends before one of them attends it from
# end_every_rank_on_failure instead, saying how it ended, so no rank waits there for it.
MEETINGS = ("the ranks joined", "training started")
_next_meeting = 0


class _EarlyOutput:
    """sys.stderr until training starts: recorded, and held back on ranks other than 0. A
    mistake every rank makes before then (a bad option, a missing file) is printed once."""

    def __init__(self, real, hold: bool):
        self.real, self.hold, self.text = real, hold, io.StringIO()

    def write(self, text: str) -> int:
        self.text.write(text)
        return len(text) if self.hold else self.real.write(text)

    def __getattr__(self, name):  # flush, fileno, isatty, encoding, ...: the real stream's
        return getattr(self.real, name)


def _hold_early_output() -> None:
    global _early
    if _early is None and _next_meeting == 0 and launched_by_mpi():
        _early = _EarlyOutput(sys.stderr, hold=rank_from_launcher() != 0)
        sys.stderr = _early


def _release_early_output(unless: str | None = None) -> None:
    """Back to the real stderr; a rank that held its output prints it now (unless it is
    `unless`: what rank 0 has printed already)."""
    global _early
    early, _early = _early, None
    if early is None:
        return
    sys.stderr = early.real
    if early.hold and early.text.getvalue() not in ("", unless):
        try:
            sys.stderr.write(early.text.getvalue())
            sys.stderr.flush()
        except (OSError, ValueError):  # stderr closed (a broken pipe): nowhere left to say it
            pass


def meet_to_start_training() -> None:
    """The second meeting point (see MEETINGS): every rank is about to train."""
    if _group is not None and _next_meeting == 1:
        _meet(_group.comm, None)


def _meet(comm, ended: int | None) -> None:
    """Every rank says whether it got here (None) or ended before (its exit status), and what
    it has printed. If any rank ended, the ranks that got here stop with StopEveryRank, and
    rank 0 alone says so."""
    global _next_meeting
    point, _next_meeting = MEETINGS[_next_meeting], _next_meeting + 1
    outcomes = comm.allgather((ended, _early.text.getvalue() if _early else ""))
    first = next(((r, status) for r, (status, _) in enumerate(outcomes) if status is not None), None)
    if first is not None or _next_meeting == len(MEETINGS):
        _release_early_output(unless=outcomes[0][1])
    if first is not None:
        _next_meeting = len(MEETINGS)  # the command ends on every rank: no more meetings
    if ended is None and first is not None:
        r, status = first
        raise StopEveryRank(f"rank {r} ended before {point} (exit status {status}); stopping every rank",
                            status or 1, speaks=comm.Get_rank() == 0)


def _attend_late(status: int) -> int:
    """Attend the next meeting point as a rank that has ended with `status`; returns it."""
    if _group is not None:
        comm = _group.comm
    else:
        try:
            from mpi4py import MPI
        except ImportError:  # no MPI here: nobody can be waiting for this rank
            _release_early_output()
            return status
        comm = MPI.COMM_WORLD
    _meet(comm, status)
    return status
