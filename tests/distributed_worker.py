"""What each rank runs in tests/test_distributed.py, under `mpiexec -n N python this.py ...`.
The same functions run in one process (world of one) to give the reference results.

    steps TASK DTYPE OUT     5 AdamW steps on a tiny model (pretrain | classify | instruct);
                             every rank checks its weights equal rank 0's, rank 0 saves them to OUT
    collectives OUT          all_reduce / broadcast of arrays around the bucket size, to OUT
    die SIGNAL               training steps until rank 1 sends itself SIGNAL (KILL: dies, STOP: hangs)
    check KEY=VALUE          start_training with a run description (per rank, to test refusals)
    train SECONDS ARGS...    `tinygpt train ARGS...` with every checkpoint save SECONDS slower (to
                             test that Ctrl-C under mpiexec waits for the save); prints the exit status
"""
import ctypes
import os
import signal
import sys
import time

import numpy as np

import tinygpt as tg
from tinygpt import distributed
from tinygpt.finetune.classify import calc_loss_batch as classification_loss, make_classifier
from tinygpt.model import GPTModel
from tinygpt.optim import AdamW, clip_grad_norm
from tinygpt.train import calc_loss_batch

CFG = {"vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0, "qkv_bias": False}
# No key bias: its gradient is zero in exact math (softmax ignores a constant added to every
# score), so rounding noise of 1e-17 is all AdamW sees there and g / (|g| + eps) amplifies it.
BATCH, T = 6, 8  # 6 rows: divisible by 2 and by 3 ranks


def global_batch(task: str, step: int):
    """The same global batch on every rank and in the reference process."""
    rng = np.random.default_rng([11, step])
    ids = rng.integers(0, CFG["vocab_size"], (BATCH, T))
    if task in ("pretrain", "pretrain_dropout"):
        return ids, rng.integers(0, CFG["vocab_size"], (BATCH, T))
    if task == "classify":
        return ids, rng.integers(1, T + 1, BATCH), rng.integers(0, 2, BATCH)
    targets = ids.copy()  # instruct: prompt masking leaves different counts of scored targets per row
    for row, n in enumerate(rng.integers(1, T, BATCH)):
        targets[row, :n] = distributed.IGNORE_INDEX
    targets[4:] = distributed.IGNORE_INDEX  # nothing to score in rows 4-5: the third of 3 ranks sits out
    return ids, targets


def make_model(task: str):
    tg.manual_seed(0)
    model = GPTModel({**CFG, "drop_rate": 0.3} if task == "pretrain_dropout" else CFG)
    if task == "classify":
        make_classifier(model, 2, trainable_blocks=1)
    return model


def loss_fn(task: str, model):
    if task == "classify":
        return lambda batch: classification_loss(*batch, model)
    return lambda batch: calc_loss_batch(*batch, model)


def train_steps(task: str, dtype: str, steps: int = 5) -> dict:
    tg.set_default_dtype(np.dtype(dtype))
    model = make_model(task)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=1e-2)
    distributed.start_training(params, {"task": task}, BATCH)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        losses.append(distributed.forward_backward(loss_fn(task, model), global_batch(task, step), params))
        clip_grad_norm(params, 0.5)  # on the summed gradients: the same norm on every rank
        optimizer.step()
    result = {name: t.numpy() for name, t in model.state_dict().items()}
    result["losses"] = np.array(losses)
    return result


def check_all_ranks_equal(result: dict) -> None:
    """Every rank must hold bit-identical weights (the all-reduce gives all the same sums)."""
    for name, array in result.items():
        theirs = distributed.broadcast([array.copy()])[0]
        if not np.array_equal(theirs, array):
            raise SystemExit(f"rank {distributed.rank()}: {name} differs from rank 0's")


def collectives() -> dict:
    r, n = distributed.rank(), distributed.world_size()
    big = distributed.BUCKET_BYTES // 8 + 3  # float64: one element past a bucket
    arrays = [np.full((3, 4), r + 1.0), np.arange(big, dtype=np.float64) * (r + 1),
              np.full(5, r + 1, dtype=np.int64), np.full((2, 2), 2.0 * r, dtype=np.float32)]
    sums = [a.copy() for a in arrays]
    distributed.all_reduce(sums, op="sum")
    means = distributed.all_reduce([a.astype(np.float64) for a in arrays[:2]], op="mean")
    sent = distributed.broadcast([np.full(7, float(r))], root=n - 1)[0]
    return {"world": np.array(n), **{f"sum{i}": a for i, a in enumerate(sums)},
            **{f"mean{i}": a for i, a in enumerate(means)}, "broadcast": sent}


class StandInNccl:
    """cupy.cuda.nccl's interface (get_unique_id, NcclCommunicator with pointer-based
    allReduce and bcast, the dtype and op constants) on host memory, carried by MPI, so the
    NCCL path runs without a GPU. Buffers are rebuilt from (address, count, dtype)."""

    NCCL_INT32, NCCL_INT64, NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = 2, 4, 6, 7, 8
    NCCL_SUM = 0
    DTYPES = {2: np.int32, 4: np.int64, 6: np.float16, 7: np.float32, 8: np.float64}
    calls = 0

    @staticmethod
    def get_unique_id():
        return tuple(np.random.default_rng().integers(0, 256, 128))

    class NcclCommunicator:
        def __init__(self, ndev, uid, rank):
            from mpi4py import MPI

            self.comm = MPI.COMM_WORLD.Dup()
            assert (ndev, rank) == (self.comm.Get_size(), self.comm.Get_rank()) and len(uid) == 128

        def _buffer(self, ptr, count, datatype):
            dtype = np.dtype(StandInNccl.DTYPES[datatype])
            raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
            return np.frombuffer(raw, dtype=dtype)

        def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
            from mpi4py import MPI

            assert op == StandInNccl.NCCL_SUM and sendbuf == recvbuf and stream == 0
            StandInNccl.calls += 1
            self.comm.Allreduce(MPI.IN_PLACE, self._buffer(recvbuf, count, datatype), op=MPI.SUM)

        def bcast(self, buff, count, datatype, root, stream):
            StandInNccl.calls += 1
            self.comm.Bcast(self._buffer(buff, count, datatype), root=root)


def slow_train(seconds: float, args: list) -> int:
    """`tinygpt train ARGS` with every save starting `seconds` late: long enough for a rank
    that did not wait for rank 0's save to end the job in the middle of it."""
    from tinygpt import cli, train

    save = train.save_checkpoint

    def slow_save(*a, **k):
        time.sleep(seconds)
        return save(*a, **k)

    train.save_checkpoint = slow_save
    code = cli.main(["train", *args])
    print(f"rank {distributed.rank()} exit status {code}", file=sys.stderr, flush=True)
    return code


def main(argv) -> int:
    command = argv[0]
    if command == "train":
        return slow_train(float(argv[1]), argv[2:])
    if command == "nccl-steps":
        distributed.init(force=True, nccl=StandInNccl, transport="nccl")
    else:
        distributed.init(force=True)
    if command in ("steps", "nccl-steps"):
        result = train_steps(argv[1], argv[2])
        check_all_ranks_equal(result)
        if command == "nccl-steps" and StandInNccl.calls == 0:
            raise SystemExit("the NCCL stand-in was never called")
        if distributed.is_main():
            np.savez(argv[3], **result)
    elif command == "collectives":
        np.savez(argv[1].format(rank=distributed.rank()), **collectives())
    elif command == "die":
        model = make_model("pretrain")
        params = list(model.parameters())
        distributed.start_training(params, {}, BATCH)
        for step in range(1000):
            if step == 3 and distributed.rank() == 1:
                os.kill(os.getpid(), getattr(signal, f"SIG{argv[1]}"))
            distributed.forward_backward(loss_fn("pretrain", model), global_batch("pretrain", step), params)
    elif command == "check":
        if "fake-code" in argv[2:]:
            distributed.code_version = lambda: "0123456789abcdef"
        model = make_model("pretrain")
        distributed.start_training(list(model.parameters()), dict(kv.split("=") for kv in argv[1:2]), BATCH)
        print(f"rank {distributed.rank()} started", flush=True)
    return 0


@distributed.end_every_rank_on_failure  # a refusal all ranks agree on: rank 0 prints it, every rank exits 2
def run(argv) -> int:
    try:
        return main(argv)
    except Exception as e:  # the whole job must stop, not just this rank
        distributed.abort(f"{type(e).__name__}: {e}")
        raise


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
