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

Joining the ranks and ending them together is tinygpt/ranks.py; how arrays travel between
them (MPI, NCCL, buckets, the heartbeat watchdog) is tinygpt/transport.py. Their public names
are re-exported here: `distributed.init()`, `distributed.all_reduce(...)` and the rest.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from tinygpt import backend
from tinygpt.functional.loss import IGNORE_INDEX
from tinygpt.ranks import (DistributedError, StopEveryRank, abort, all_gather_object, all_reduce,  # noqa: F401
                           barrier, broadcast, broadcast_object, describe, end_every_rank_on_failure, ending_together,
                           init, is_main, launched_by_mpi, meet_to_start_training, rank, stop_if_any,
                           world_size)
from tinygpt.transport import BUCKET_BYTES  # noqa: F401


# ------------------------------------------------------------------ data parallel training

def check_batch_size(batch_size: int, option: str = "--batch-size", resumed: bool = False) -> None:
    """The global batch must split into equal parts over the ranks. A resumed run cannot
    change its batch, so then the message names the rank counts that do divide it."""
    n = world_size()
    if not batch_size % n:
        return
    if resumed:
        counts = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        shown = ", ".join(map(str, counts[:12])) + (f", ... ({len(counts)} in all)" if len(counts) > 12 else "")
        raise DistributedError(f"the run's global batch of {batch_size} rows ({option}, fixed when resuming) does not "
                               f"split over {n} ranks: resume it on a number of ranks that divides {batch_size}: {shown}")
    lower, higher = batch_size - batch_size % n, batch_size + n - batch_size % n
    raise DistributedError(f"{option} {batch_size} (the global batch) is not divisible by the {n} ranks: "
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


def start_training(params: list, run: dict, batch_size: int, resumed: bool = False) -> None:
    """Before the first step: refuse ranks started differently and a batch that does not
    split over them (every rank stops, rank 0 says why: StopEveryRank), then give every rank
    rank 0's weights and random streams (they then stay in step: every rank draws the same)."""
    if world_size() == 1:
        return
    ending_together(None)
    meet_to_start_training()  # every rank got here (or one ended before: all stop)
    stop_if_any(different_start(params, run))
    try:
        check_batch_size(batch_size, resumed=resumed)
        problem = None
    except DistributedError as e:
        problem = str(e)
    stop_if_any(problem)
    broadcast([p.data for p in params])
    backend.set_rng_state(broadcast_object(backend.get_rng_state()))


def different_start(params: list, run: dict) -> str | None:
    """What differs between a rank and rank 0 (the `run` description, the device and dtype of
    the parameters, the tinygpt code), or None. The same answer on every rank."""
    arrays = [p.data for p in params]
    mine = {"tinygpt code": code_version(), "device": ", ".join(sorted({backend.device_of(a) for a in arrays})),
            "dtype": ", ".join(sorted({str(a.dtype) for a in arrays})), **run}
    everyone = all_gather_object(mine)
    for r, theirs in enumerate(everyone[1:], start=1):
        differ = _differences(everyone[0], theirs)
        if differ:
            details = "; ".join(f"{key}: {_short(b)} on rank {r}, {_short(a)} on rank 0" for key, a, b in differ[:4])
            more = f"; and {len(differ) - 4} more" if len(differ) > 4 else ""
            return (f"rank {r} was started differently from rank 0 ({details}{more}); "
                    f"start every rank with the same command and the same tinygpt")
    return None


def _differences(ours: dict, theirs: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, our value, their value) for each leaf where two nested dicts differ."""
    found = []
    for key in sorted(set(ours) | set(theirs), key=str):
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append((f"{prefix}{key}", a, b))
    return found


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def code_version() -> str:
    """A digest of tinygpt's source files: ranks running different code are refused."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
