"""Pretraining (book chapter 5 and appendix D): losses, evaluation, the training loop,
checkpoints and exact resumption.

The loop is the book's `train_model_simple` with what a real run needs around it: a learning
rate schedule, gradient clipping, a progress bar, a loss history on disk, periodic
checkpoints, a clean stop on Ctrl-C and on a non-finite loss, and `resume` that continues
bit for bit where a checkpoint left off.
"""
from __future__ import annotations

import csv
import io
import json
import math
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tinygpt import backend, distributed, ranks
from tinygpt import functional as F
from tinygpt.checkpoint import NonFiniteError, checkpoints, save_checkpoint
from tinygpt.errors import RunError
from tinygpt.files import atomic_write_bytes, atomic_write_text
from tinygpt.generate import generate, text_to_token_ids, token_ids_to_text
from tinygpt.optim import AdamW, clip_grad_norm, warmup_cosine_lr
from tinygpt.tensor import Tensor, no_grad
from tinygpt.throughput import Speedometer


# ------------------------------------------------------------------ losses (book names)

def calc_loss_batch(input_batch, target_batch, model) -> Tensor:
    """Mean cross-entropy of the model's next-token predictions on one batch."""
    device = model.tok_emb.weight.device
    logits = model(backend.to_device(input_batch, device))  # [B, T, V]
    return F.cross_entropy(logits, backend.to_device(target_batch, device))


@no_grad()
def calc_loss_loader(data_loader, model, num_batches: int | None = None) -> float:
    """Mean loss over the first `num_batches` batches of the loader's first epoch (all when
    None). Reads batches without moving the loader's position, so evaluating mid-epoch does
    not disturb training."""
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    if num_batches <= 0:
        return float("nan")
    batches = data_loader.iter_epoch(0) if hasattr(data_loader, "iter_epoch") else iter(data_loader)
    mine = distributed.take_turns(zip(range(num_batches), batches))  # data parallel: each rank a share of the batches
    total = sum(calc_loss_batch(x, y, model).item() for _, (x, y) in mine)
    return distributed.sum_over_ranks(total)[0] / num_batches


def perplexity(loss: float) -> float:
    """exp(loss): the number of tokens the model is, in effect, choosing between."""
    return math.inf if loss > 700 else math.exp(loss)  # exp overflows a float past ~709; nan stays nan


def evaluate_model(model, train_loader, val_loader, eval_iter: int) -> tuple[float, float]:
    """(train loss, val loss) over `eval_iter` batches each, in eval mode (no dropout)."""
    model.eval()
    try:
        return calc_loss_loader(train_loader, model, eval_iter), calc_loss_loader(val_loader, model, eval_iter)
    finally:
        model.train()


def generate_and_print_sample(model, tokenizer, start_context: str, max_new_tokens: int = 50, show: Callable = print,
                              temperature: float = 0.0, top_k: int | None = None) -> str:
    """A continuation of `start_context` (greedy, as in the book, unless temperature > 0),
    shown on one line; returns the text. Sampling uses a fixed seed and leaves the library's
    random streams as they were, so samples at successive evaluations are comparable and
    training is not disturbed."""
    rng_state = backend.get_rng_state()
    backend.manual_seed(0)
    try:
        idx = text_to_token_ids(start_context, tokenizer, device=model.tok_emb.weight.device)
        out = generate(model, idx, max_new_tokens, model.cfg["context_length"], temperature=temperature, top_k=top_k)
        text = token_ids_to_text(out, tokenizer)
    finally:
        backend.set_rng_state(rng_state)
    show(text.replace("\n", " "))
    return text


# ------------------------------------------------------------------ the loop

@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int | None = None     # stop after this many optimizer steps in total
    lr: float = 4e-4                 # peak learning rate
    weight_decay: float = 0.1
    warmup_steps: int = 0            # linear warmup from initial_lr (appendix D)
    initial_lr: float = 3e-5
    cosine: bool = False             # cosine decay from lr to min_lr after warmup
    min_lr: float = 1e-6
    grad_clip: float | None = None   # global gradient norm limit
    eval_freq: int = 5               # evaluate every eval_freq steps
    eval_iter: int = 5               # batches per evaluation
    start_context: str = "Every effort moves you"
    sample_tokens: int = 50
    sample_temperature: float = 0.0  # 0: greedy, as the book's samples
    checkpoint_every: int | None = None


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    history: dict[str, list] = field(default_factory=lambda: {"step": [], "tokens_seen": [], "train_loss": [], "val_loss": [], "lr": []})


class TrainingError(RunError):
    pass


INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (128 + SIGINT, as a shell reports it)


class Trainer:
    """Runs `TrainConfig` on a model, optimizer and loaders; writes checkpoints and the loss
    history to `out_dir` when one is given. `meta` is stored in each checkpoint as it is."""

    def __init__(self, model, optimizer: AdamW, train_loader, val_loader, tokenizer, config: TrainConfig,
                 out_dir: str | Path | None = None, state: TrainState | None = None, show: Callable = print,
                 progress: bool = True, meta: dict | None = None):
        self.model, self.optimizer, self.tokenizer, self.config = model, optimizer, tokenizer, config
        self.train_loader, self.val_loader = train_loader, val_loader
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.state = state or TrainState()
        # data parallel: only rank 0 prints and shows progress (and writes, see save)
        self.show, self.progress = (show, progress) if distributed.is_main() else ((lambda text: None), False)
        self.meta = meta or {}  # saved with every checkpoint (e.g. where the data came from)
        self._stop_requested = False
        self.interrupted = False  # the last fit() ended on Ctrl-C (after saving)
        self._saved_step: int | None = None  # the step of the checkpoint on disk, if this trainer wrote or loaded it
        self._lr = config.lr
        self.speed = Speedometer(model, ranks.world_size())  # tokens/s and MFU of the steps

    @property
    def total_steps(self) -> int:
        steps = self.config.epochs * len(self.train_loader)
        return steps if self.config.max_steps is None else min(steps, self.config.max_steps)

    def learning_rate(self, step: int) -> float:
        c = self.config
        # without cosine decay the schedule "decays" to the peak itself: warmup, then constant
        return warmup_cosine_lr(step, self.total_steps, c.lr, c.warmup_steps, c.initial_lr, c.min_lr if c.cosine else c.lr)

    def fit(self) -> dict[str, list]:
        """Train until `epochs` or `max_steps`; returns the loss history. Ctrl-C stops after
        the current step and saves a checkpoint (press it twice to abort at once)."""
        from tqdm import tqdm

        distributed.start_training(self.optimizer.parameters(), self._run_description(), self.train_loader.batch_size,
                                   resumed=self.state.step > 0)
        previous_handler = _install_sigint(self._request_stop)
        bar = tqdm(total=self.total_steps, initial=self.state.step, unit="step", dynamic_ncols=True,
                   disable=None if self.progress else True)  # None: only on a terminal
        show = self.show
        self.show = lambda text: bar.write(str(text)) if self.progress else show(text)
        self.interrupted = False
        try:
            self.model.train()
            while not self.finished():
                for batch in self.train_loader:
                    with self.speed.timing(batch):
                        loss = self._step(batch)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self._lr:.2e}", **self.speed.postfix())
                    if (self.state.step - 1) % self.config.eval_freq == 0:  # after the first step, as in the book
                        self.evaluate()
                    if self.config.checkpoint_every and self.state.step % self.config.checkpoint_every == 0:
                        self.save()
                    self._stop_requested = distributed.any_rank(self._stop_requested)  # every rank stops at the same step
                    if self.finished() or self._stop_requested:
                        break
                if self._stop_requested:
                    self.show(f"interrupted at step {self.state.step}: saving a checkpoint to resume from")
                    self.interrupted = True
                    break
            self.save()
            if self.interrupted:  # data parallel: no rank leaves (and ends the job) before rank 0's save is on disk
                distributed.barrier()
                distributed.ending_together(INTERRUPTED)
        finally:
            self._stop_requested = False  # a stop ends this fit() only; calling fit() again continues
            _install_sigint(previous_handler)
            bar.close()
            self.show = show
        return self.state.history

    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now; the checkpoint being written is discarded
        self._stop_requested = True

    def finished(self) -> bool:
        """Whether `epochs` or `max_steps` is reached (fit() would train no further)."""
        c, loader = self.config, self.train_loader
        epochs_done = loader.epoch + (loader.position >= len(loader))  # a finished epoch not yet rolled over
        return epochs_done >= c.epochs or (c.max_steps is not None and self.state.step >= c.max_steps)

    def loss_batch(self, batch) -> Tensor:
        """The training loss of one batch from the loader (next-token cross-entropy here;
        the finetuning trainers override it)."""
        inputs, targets = batch
        return calc_loss_batch(inputs, targets, self.model)

    def _step(self, batch) -> float:
        self._lr = self.learning_rate(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr
        self.optimizer.zero_grad()
        # this rank's rows of the batch, gradients summed over the ranks (one process: all rows)
        value = distributed.forward_backward(self.loss_batch, batch, self.optimizer.parameters())
        if not math.isfinite(value):
            raise TrainingError(f"loss is {value} at step {self.state.step + 1} (epoch {self.train_loader.epoch + 1}); "
                                f"training stopped and this step was not applied; {self._last_good()}")
        if self.config.grad_clip:
            clip_grad_norm(self.optimizer.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.state.step += 1
        self.state.tokens_seen += int(batch[0].size)  # input tokens (padding included)
        return value

    def evaluate(self) -> tuple[float, float]:
        """Record train and val loss in the history, show them and a sample."""
        train_loss, val_loss = evaluate_model(self.model, self.train_loader, self.val_loader, self.config.eval_iter)
        self.record(train_loss=train_loss, val_loss=val_loss)
        self.show(f"step {self.state.step:>6}  tokens {self.state.tokens_seen:>9,}  train loss {train_loss:.3f}  "
                  f"val loss {val_loss:.3f}  (perplexity {perplexity(val_loss):.1f})")
        if distributed.is_main():
            self.sample()
        self.write_history()
        return train_loss, val_loss

    def record(self, **values: float) -> None:
        """Append one evaluation (step, tokens seen, lr, `values`, and the steps' tokens/s and MFU
        since the last one) to the history."""
        h = self.state.history
        rows = len(h["step"])  # a column new to this history (one resumed from an older run) starts blank
        for key, value in {"step": self.state.step, "tokens_seen": self.state.tokens_seen, **values, "lr": self._lr,
                           **self.speed.window()}.items():
            h.setdefault(key, [None] * rows).append(value)

    def sample(self) -> str:
        return generate_and_print_sample(self.model, self.tokenizer, self.config.start_context, self.config.sample_tokens,
                                         show=lambda text: self.show(f"  sample: {text}"),
                                         temperature=self.config.sample_temperature)

    def _run_description(self) -> dict:
        """What every rank of a data parallel run must agree on (checked at the start of fit)."""
        return {"config": asdict(self.config), "model": self.model.cfg, "meta": self.meta, "step": self.state.step,
                "loader": self.train_loader.state_dict(), "parameters": [p.shape for p in self.optimizer.parameters()]}

    # ------------------------------------------------------------------ persistence
    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.state.step, "tokens_seen": self.state.tokens_seen, "history": self.state.history,
                "loader": self.train_loader.state_dict(), "rng": backend.get_rng_state(), "config": asdict(self.config), "meta": self.meta}

    def _last_good(self) -> str:
        """Where to go back to after a divergence: checkpoints are checked finite when written."""
        saved = checkpoints(self.out_dir) if self.out_dir is not None else []
        if not saved:
            return "no checkpoint had been written yet. Start again with a lower --lr, or --grad-clip"
        return (f"the last good checkpoint is {saved[-1]}: continue from it with a lower learning rate, "
                f"e.g. `--resume {self.out_dir} --lr {self.config.lr / 10:g}`, or with --grad-clip")

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (once per step; weights checked finite first)."""
        if self.out_dir is None or self._saved_step == self.state.step or not distributed.is_main():
            return None
        try:
            path = save_checkpoint(self.out_dir, self.state.step, self.model, self.tokenizer, self.optimizer,
                                   self.trainer_state())
        except NonFiniteError as e:
            raise TrainingError(f"{e}; {self._last_good()}") from None
        self._saved_step = self.state.step
        self.write_history()
        return path

    def write_history(self) -> None:
        if self.out_dir is None or not distributed.is_main():
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        h = self.state.history
        atomic_write_text(self.out_dir / "history.json", json.dumps(h, indent=1))
        rows = io.StringIO()
        writer = csv.writer(rows)
        writer.writerow(list(h))
        writer.writerows(zip(*h.values()))
        atomic_write_text(self.out_dir / "history.csv", rows.getvalue())
        plot_losses(h, self.out_dir / "loss.png")

    def restore(self, trainer_state: dict, optimizer_state: dict | None, in_out_dir: bool = True) -> None:
        """Put the loop back where a checkpoint left it: counters, history, loader position,
        RNG streams and the optimizer's running averages (None: AdamW starts afresh).
        in_out_dir: the checkpoint is one of out_dir's, so its step need not be written again."""
        self.state = TrainState(trainer_state["step"], trainer_state["tokens_seen"], trainer_state["history"])
        self._saved_step = self.state.step if in_out_dir else None
        self.train_loader.load_state_dict(trainer_state["loader"])
        backend.set_rng_state(trainer_state["rng"])
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)


def _install_sigint(handler):
    """Set the Ctrl-C handler and return the previous one (None where Python allows no
    handler: outside the main thread)."""
    try:
        return signal.signal(signal.SIGINT, handler) if handler is not None else None
    except ValueError:
        return None


def plot_losses(history: dict[str, list], path: str | Path) -> bool:
    """Train and val loss against tokens seen, as a PNG, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not history["step"]:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["tokens_seen"], history["train_loss"], label="train loss")
    ax.plot(history["tokens_seen"], history["val_loss"], linestyle="--", label="val loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())  # a full disk is then an error naming loss.png
    return True


def decay_groups(model, weight_decay: float) -> list[dict]:
    """Parameter groups where only matrices (Linear weights) decay; biases, LayerNorm scale
    and shift, and embeddings do not (common practice since GPT-2-era training code)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.ndim == 2 and not name.endswith(("tok_emb.weight", "pos_emb.weight"))
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_model_simple(model, train_loader, val_loader, optimizer, num_epochs: int, eval_freq: int, eval_iter: int,
                       start_context: str, tokenizer):
    """The book's chapter-5 function: returns (train_losses, val_losses, track_tokens_seen)."""
    config = TrainConfig(epochs=num_epochs, eval_freq=eval_freq, eval_iter=eval_iter, start_context=start_context,
                         lr=optimizer.param_groups[0]["lr"])
    h = Trainer(model, optimizer, train_loader, val_loader, tokenizer, config, progress=False).fit()
    return h["train_loss"], h["val_loss"], h["tokens_seen"]
