"""The wire between the ranks of a data-parallel run: one process group, its collectives, and
a heartbeat watchdog. Who the ranks are and how a run starts and ends is tinygpt/ranks.py;
the math that uses the collectives is tinygpt/distributed.py.

Arrays travel by MPI (mpi4py), or by NCCL for CuPy arrays (cupy.cuda.nccl, its id handed out
over MPI). MPI reads host memory only, so any other array (the strict test backend's) goes
through a host copy. Small arrays travel packed in flat buckets of `BUCKET_BYTES`, not one
message per parameter. Waits poll a non-blocking request, so signals reach the main thread
and a heartbeat thread (`_Watchdog`) can end a rank whose peer died.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time

import numpy as np

from tinygpt import backend, env

BUCKET_BYTES = 25 * 2**20  # arrays smaller than this are packed together into one message
HEARTBEAT_S = 1.0          # how often each rank tells the others it is alive


# ------------------------------------------------------------------ the process group

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

    def wait(self, request) -> None:
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
        key = (backend.device_of(flats[0]), dtype.str)
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
            return
        from mpi4py import MPI

        with _on_host(flat) as host:
            self.wait(self.comm.Iallreduce(MPI.IN_PLACE, host, op=MPI.SUM))

    def broadcast(self, arrays: list, root: int) -> None:
        for flat in map(_flat, arrays):
            if self._uses_nccl(flat):
                self.nccl().broadcast(flat, root)
                continue
            with _on_host(flat) as host:
                self.wait(self.comm.Ibcast(host, root=root))

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


@contextlib.contextmanager
def _on_host(flat):
    """The buffer MPI reads and writes for `flat`: the array itself when it is NumPy's, else a
    host copy, written back into `flat` at the end of the with-block."""
    if isinstance(flat, np.ndarray):
        yield flat
        return
    host = backend.to_host(flat)
    yield host
    flat[...] = backend.to_device(host, backend.device_of(flat))


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
        self.timeout = env.dist_timeout()  # checked at start by validation.check_environment
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
                      f"(it died or is stuck); stopping this rank too", file=sys.__stderr__, flush=True)  # never held back
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
