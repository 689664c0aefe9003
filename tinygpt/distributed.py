"""Data parallel training: the same model on N processes, each on its own rows of every batch.

Why one all-reduce is the whole trick. Every rank holds the same weights w. A global batch
has C scored targets (positions whose target is not -100); rank r takes some rows of it,
holding c_r of them, and computes L_r, the mean loss over its own c_r targets. The loss of
the global batch is the mean over all C targets, which regroups by rank:

    L = (1/C) sum_i l_i = sum_r (c_r / C) L_r

w is shared, so its gradient is the sum of the ranks' gradients (the chain rule through a
sum; the same rule that adds the gradients of a tensor used twice in one graph):

    dL/dw = sum_r (c_r / C) dL_r/dw

So each rank backpropagates its own mean loss scaled by c_r / C, and one all-reduce (a sum
over ranks, every rank getting the result) hands every rank the gradient of the global
mean. Clipping and AdamW then run on identical gradients and keep the weights identical.
With the -100 masking of instruction finetuning the c_r differ: a mean of per-rank means
would count a target on a rank with few of them more than one on a rank with many.

Transport: MPI (mpi4py) for NumPy arrays; NCCL (cupy.cuda.nccl, its id handed out over MPI)
for CuPy arrays. `mpiexec -n N python ...` starts the ranks; `init()` joins them. Gradients
travel in flat buckets of `BUCKET_BYTES`, not one message per parameter. Waits poll a
non-blocking request, so a heartbeat thread (see `_Watchdog`) can end a rank whose peer died.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

from tinygpt import backend

BUCKET_BYTES = 25 * 2**20  # arrays smaller than this are packed together into one message
HEARTBEAT_S = 1.0          # how often each rank tells the others it is alive
# MPI launchers set one of these in every rank they start (MPICH/Intel MPI, Open MPI, MVAPICH)
LAUNCHER_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
IGNORE_INDEX = -100

_group: "ProcessGroup | None" = None


class DistributedError(RuntimeError):
    pass


# ------------------------------------------------------------------ the process group

def launched_by_mpi() -> bool:
    """Whether this process was started by mpiexec/mpirun with more than one rank."""
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in LAUNCHER_VARIABLES)


def init(force: bool = False, device: str = "cpu", nccl=None, transport: str = "auto") -> int:
    """Join the ranks started by an MPI launcher (or, with force, whatever MPI sees) and
    return the world size; in a process started alone, do nothing and return 1.
    device "cuda" puts each rank on its own GPU of its machine. `nccl` replaces
    cupy.cuda.nccl (tests use a stand-in); transport "nccl" sends NumPy arrays through it too."""
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
    _group = ProcessGroup(MPI.COMM_WORLD, device, nccl, transport)
    atexit.register(_group.close)  # runs before mpi4py's own MPI_Finalize (registered earlier)
    return _group.size


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
    if _group is not None:
        _group.wait(_group.comm.Ibarrier(), "barrier")


def broadcast_object(obj, root: int = 0):
    """Rank `root`'s copy of a picklable object, on every rank."""
    return _group.comm.bcast(obj, root=root) if _group else obj


def abort(message: str, code: int = 1) -> None:
    """Print `message` naming this rank and stop every rank (a rank that merely exited with
    an error would leave the others waiting for it forever)."""
    print(f"tinygpt: error: rank {rank()} of {world_size()}: {message}", file=sys.stderr, flush=True)
    if _group is not None and _group.size > 1:
        sys.stdout.flush()
        time.sleep(0.5)  # MPI_Abort kills every rank at once: give mpiexec time to forward what they printed
        _group.comm.Abort(code)


def end_every_rank_on_failure(main):
    """Wrap a command's main(): when it fails on one rank (non-zero status), stop the whole
    job rather than leave the other ranks waiting for this one in their next collective."""
    def run(*args, **kwargs) -> int:
        code = main(*args, **kwargs)
        if code and world_size() > 1:
            abort(f"the command failed (exit status {code}); stopping every rank", code)
        return code
    return run


class ProcessGroup:
    """The ranks of one run: an MPI communicator, and an NCCL one made on first use."""

    def __init__(self, comm, device: str = "cpu", nccl=None, transport: str = "auto"):
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        self.where = comm.allgather(f"pid {os.getpid()} on {socket.gethostname()}")  # for messages
        self._nccl_module, self._transport, self._nccl = nccl, transport, None
        self._buckets: dict = {}
        if device == "cuda":
            _use_local_gpu(comm)
        self.watchdog = _Watchdog(comm.Dup(), self.where)
        self.watchdog.start()

    def close(self) -> None:
        self.watchdog.stop()

    def wait(self, request, what: str) -> None:
        """Wait for a non-blocking MPI call; polling (not a blocking call) keeps this thread
        in Python, where signals and the watchdog can reach it."""
        spins = 0
        while not request.Test():
            spins += 1
            if spins > 1000:  # past a short spin, stop burning a core that the peers may need
                time.sleep(1e-4)

    def all_reduce(self, arrays: list, op: str) -> None:
        if op not in ("sum", "mean"):
            raise ValueError(f"all_reduce: op must be 'sum' or 'mean', got {op!r}")
        packed, size = [], 0
        for flat in map(_flat, arrays):
            if flat.nbytes >= BUCKET_BYTES:  # big enough to be its own message, reduced in place
                self._reduce(flat)
                continue
            if packed and (size + flat.nbytes > BUCKET_BYTES or flat.dtype != packed[0].dtype
                           or type(flat) is not type(packed[0])):
                self._reduce_packed(packed)
                packed, size = [], 0
            packed.append(flat)
            size += flat.nbytes
        if packed:
            self._reduce_packed(packed)
        if op == "mean":
            for a in arrays:
                a /= self.size

    def _reduce_packed(self, flats: list) -> None:
        """Copy small arrays into one flat bucket, reduce it, copy the sums back."""
        xp, dtype = backend.backend_of(flats[0]), flats[0].dtype
        key = (xp.__name__, dtype.str)
        if key not in self._buckets:
            self._buckets[key] = xp.empty(BUCKET_BYTES // dtype.itemsize, dtype=dtype)
        bucket = self._buckets[key][:sum(f.size for f in flats)]
        xp.concatenate(flats, out=bucket)
        self._reduce(bucket)
        start = 0
        for f in flats:
            f[...] = bucket[start:start + f.size]
            start += f.size

    def _reduce(self, flat) -> None:
        if self._uses_nccl(flat):
            self.nccl().all_reduce_sum(flat)
        else:
            from mpi4py import MPI

            self.wait(self.comm.Iallreduce(MPI.IN_PLACE, flat, op=MPI.SUM), "all_reduce")

    def broadcast(self, arrays: list, root: int) -> None:
        for flat in map(_flat, arrays):
            if self._uses_nccl(flat):
                self.nccl().broadcast(flat, root)
            else:
                self.wait(self.comm.Ibcast(flat, root=root), "broadcast")

    def _uses_nccl(self, array) -> bool:
        return self._transport == "nccl" or backend.device_of(array) == "cuda"

    def nccl(self) -> "NcclCommunicator":
        if self._nccl is None:
            self._nccl = NcclCommunicator(self.comm, self._nccl_module)
        return self._nccl


def _flat(array):
    """A 1-D view of `array` (writing to it writes the array)."""
    if not array.flags.c_contiguous:
        raise ValueError(f"all_reduce/broadcast need contiguous arrays, got one of shape {array.shape} that is not")
    return array.reshape(-1)


def _use_local_gpu(comm) -> None:
    """Rank k of a machine takes GPU k (mod the GPUs it has), before any array is made."""
    from mpi4py import MPI
    import cupy

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    cupy.cuda.Device(local.Get_rank() % cupy.cuda.runtime.getDeviceCount()).use()
    local.Free()


class NcclCommunicator:
    """NCCL collectives on device buffers, the communicator bootstrapped over MPI: rank 0
    makes the unique id, MPI broadcasts it, every rank joins with it. NCCL queues the call on
    the current CUDA stream, so later kernels on that stream see the reduced values."""

    def __init__(self, comm, nccl=None):
        if nccl is None:
            from cupy.cuda import nccl
        self.nccl = nccl
        uid = comm.bcast(nccl.get_unique_id() if comm.Get_rank() == 0 else None, root=0)
        self.comm = nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())

    def _dtype(self, array) -> int:
        name = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
                "int32": "NCCL_INT32", "int64": "NCCL_INT64"}.get(array.dtype.name)
        if name is None:
            raise TypeError(f"NCCL cannot reduce arrays of dtype {array.dtype}")
        return getattr(self.nccl, name)

    def all_reduce_sum(self, flat) -> None:
        ptr = _address(flat)
        self.comm.allReduce(ptr, ptr, flat.size, self._dtype(flat), self.nccl.NCCL_SUM, _stream(flat))

    def broadcast(self, flat, root: int) -> None:
        self.comm.bcast(_address(flat), flat.size, self._dtype(flat), root, _stream(flat))


def _address(array) -> int:
    """Device pointer of a CuPy array; host address of a NumPy one (for a CPU stand-in)."""
    return array.data.ptr if backend.device_of(array) == "cuda" else array.ctypes.data


def _stream(array) -> int:
    if backend.device_of(array) != "cuda":
        return 0
    import cupy

    return cupy.cuda.get_current_stream().ptr


class _Watchdog(threading.Thread):
    """Heartbeats between ranks on their own communicator. A rank that dies (kill -9, out of
    memory) goes silent; after `TINYGPT_DIST_TIMEOUT` seconds (default 30) every rank still
    alive says which one it lost and exits, instead of waiting in a collective forever.
    (mpiexec usually ends the job sooner: it kills every rank when one dies.)"""

    BEAT, BYE = 1, 2  # message tags: "alive", and "leaving on purpose: stop watching me"

    def __init__(self, comm, where: list[str]):
        super().__init__(name="tinygpt-watchdog", daemon=True)
        self.comm, self.where = comm, where
        self.timeout = float(os.environ.get("TINYGPT_DIST_TIMEOUT", "30"))
        self.peers = [r for r in range(comm.Get_size()) if r != comm.Get_rank()]
        self.heard = {r: time.monotonic() for r in self.peers}
        self._stopping = threading.Event()
        self._sent: list = []
        self._beat = np.zeros(1, dtype=np.uint8)

    def run(self) -> None:
        from mpi4py import MPI

        status, inbox = MPI.Status(), np.zeros(1, dtype=np.uint8)
        while not self._stopping.wait(HEARTBEAT_S):
            self._send(self.BEAT)
            while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
                self.comm.Recv(inbox, source=status.Get_source(), tag=status.Get_tag())
                if status.Get_tag() == self.BYE:
                    self.heard.pop(status.Get_source(), None)
                elif status.Get_source() in self.heard:
                    self.heard[status.Get_source()] = time.monotonic()
            silent = [r for r, t in self.heard.items() if time.monotonic() - t > self.timeout]
            if silent:
                lost = ", ".join(f"rank {r} ({self.where[r]})" for r in silent)
                print(f"tinygpt: error: rank {self.comm.Get_rank()}: lost {lost}: no heartbeat for {self.timeout:g} s "
                      f"(it died or is stuck); stopping this rank too", file=sys.stderr, flush=True)
                os._exit(1)

    def _send(self, tag: int) -> None:
        self._sent = [r for r in self._sent if not r.Test()]  # a dead peer's never complete; few pile up
        self._sent += [self.comm.Isend(self._beat, dest=r, tag=tag) for r in self.peers]

    def stop(self) -> None:
        """On a clean exit: tell the peers not to miss this rank, then end the thread."""
        if self.is_alive():
            self._stopping.set()
            self.join()
            self._send(self.BYE)


# ------------------------------------------------------------------ data parallel training

def check_batch_size(batch_size: int, option: str = "--batch-size") -> None:
    n = world_size()
    if batch_size % n:
        lower, higher = batch_size - batch_size % n, batch_size + n - batch_size % n
        raise ValueError(f"{option} {batch_size} (the global batch) is not divisible by the {n} ranks: "
                         f"use a multiple of {n}, e.g. {lower or higher} or {higher}")


def shard(batch: tuple) -> tuple:
    """This rank's rows of a global batch: a contiguous block of B / N rows of every array."""
    n, rows = world_size(), len(batch[0])
    if rows % n:
        raise ValueError(f"a batch of {rows} rows cannot be split evenly over {n} ranks")
    start = rank() * rows // n
    return tuple(a[start:start + rows // n] for a in batch)


def count_targets(targets) -> int:
    """Targets that the loss scores: all but those equal to IGNORE_INDEX."""
    return int((np.asarray(targets) != IGNORE_INDEX).sum())


def forward_backward(loss_fn, batch: tuple, params: list) -> float:
    """Backpropagate the mean loss of the global `batch` (targets last) into every
    parameter's .grad, each rank computing only its own rows; returns that mean loss.
    The derivation of the weight c_r / C is at the top of this file."""
    if world_size() == 1:
        loss = loss_fn(batch)
        loss.backward()
        return loss.item()
    mine = shard(batch)
    c_mine, c_all = count_targets(mine[-1]), count_targets(batch[-1])
    value = 0.0
    if c_mine or not c_all:  # a rank with no scored target adds nothing; no target anywhere raises as in one process
        with backend.batch_shard(rank() * len(batch[0]) // world_size()):  # dropout: this rank's part of one mask
            loss = loss_fn(mine)
            (loss * (c_mine / c_all)).backward()
        value = loss.item() * c_mine / c_all
    return sum_gradients(params, value)


def sum_gradients(params: list, loss: float = 0.0) -> float:
    """Sum every parameter's .grad over the ranks (and the ranks' weighted losses; returned).
    A parameter gets a gradient if any rank's graph reached it, as in one process."""
    had = np.array([loss] + [p.grad is not None for p in params], dtype=np.float64)
    all_reduce([had], op="sum")
    for p, n in zip(params, had[1:]):
        if n and p.grad is None:
            from tinygpt.tensor import Tensor

            p.grad = Tensor(backend.backend_of(p.data).zeros_like(p.data))
    all_reduce([p.grad.data for p in params if p.grad is not None], op="sum")
    return float(had[0])


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Each value summed over the ranks (float64)."""
    total = np.array(values, dtype=np.float64)
    all_reduce([total], op="sum")
    return tuple(float(v) for v in total)


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (e.g. Ctrl-C seen by one rank: all stop at the same step)."""
    return sum_over_ranks(float(flag))[0] > 0 if world_size() > 1 else flag


def take_turns(items):
    """The items this rank handles when the ranks share a sequence: item i goes to rank i mod N."""
    n, r = world_size(), rank()
    return (item for i, item in enumerate(items) if i % n == r)


def start_training(params: list, run: dict, batch_size: int) -> None:
    """Before the first step: refuse ranks started differently, then give every rank rank 0's
    weights and random streams (the streams then stay in step: every rank draws the same)."""
    if world_size() == 1:
        return
    check_batch_size(batch_size)
    check_same_run(run)
    broadcast([p.data for p in params])
    backend.set_rng_state(broadcast_object(backend.get_rng_state()))


def check_same_run(run: dict) -> None:
    """Raise, on every rank, if any rank's `run` description or tinygpt code differs from rank 0's."""
    everyone = _group.comm.allgather({"tinygpt code": code_version(), **run})
    first = everyone[0]
    for r, theirs in enumerate(everyone[1:], start=1):
        differ = sorted(k for k in set(first) | set(theirs) if first.get(k) != theirs.get(k))
        if differ:
            details = "; ".join(f"{k}: {theirs.get(k)!r} on rank {r}, {first.get(k)!r} on rank 0" for k in differ)
            raise DistributedError(f"rank {r} was started differently from rank 0 ({details}); "
                                   f"start every rank with the same command and the same tinygpt")


def code_version() -> str:
    """A digest of tinygpt's source files: ranks running different code are refused."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
