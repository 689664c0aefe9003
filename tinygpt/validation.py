"""Checking what a user typed before anything runs: option values (argparse types), the
environment variables tinygpt reads, and combinations of options.

Every check says which option or variable was wrong, the value given and the limit:
`--grad-clip must be > 0, got -1`. Option values fail while argparse parses them (exit
status 2, with the command's usage line); the environment and combinations of options fail
with a UsageError, which the CLI also turns into exit status 2.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path


class UsageError(ValueError):
    """A mistake in the command line or the environment (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (`tinygpt train: error: argument --lr: must be
    > 0, got -1 (see tinygpt train --help)`) instead of the whole usage block first."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes "-1e-3" for an option (its pattern knows no exponent), so `--lr -1e-3`
        # would fail as "expected one argument" without naming the value
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------ option types for argparse

def integer(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def real(above: float | None = None, at_least: float | None = None, below: float | None = None,
         at_most: float | None = None):
    """An argparse type: a finite number within the given bounds (NaN and inf never pass)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        for bound, ok, sign in ((above, lambda b: value > b, ">"), (at_least, lambda b: value >= b, ">="),
                                (below, lambda b: value < b, "<"), (at_most, lambda b: value <= b, "<=")):
            if bound is not None and not ok(bound):
                raise argparse.ArgumentTypeError(f"must be {sign} {bound:g}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


positive_int = integer(1)
count = integer(0)              # 0 allowed: "none"
seed = integer(0)               # NumPy's generators take no negative seeds
positive = real(above=0)
non_negative = real(at_least=0)
fraction = real(above=0, below=1)
probability = real(above=0, at_most=1)
dropout = real(at_least=0, below=1)


def text(value: str) -> str:
    """An argparse type: a non-empty text (a prompt to start from)."""
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def existing_file(text: str) -> str:
    """An argparse type: the path of a file that exists (checked before anything loads)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not path.is_file():  # a FIFO or device: reading would wait forever, and data is read twice (hash, text)
        raise argparse.ArgumentTypeError(f"{text} is not a regular file (a FIFO, socket or device); give a file")
    return text


def existing_path(text: str) -> str:
    """An argparse type: a file or folder that exists."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {text}")
    return text


# ------------------------------------------------------------------ environment

def check_environment(environ=None) -> None:
    """Check every environment variable tinygpt reads; apply TINYGPT_KERNELS (the device
    is applied with the --device option, see choose_device)."""
    from tinygpt import env

    environ = os.environ if environ is None else environ
    for line in env.unknown(environ):
        print(f"tinygpt: warning: {line}", file=sys.stderr)
    _check_numbers(environ)
    device = env.value("TINYGPT_DEVICE", environ)
    if device is not None and device not in _devices():
        raise UsageError(f"TINYGPT_DEVICE must be one of {', '.join(_devices())}, got {device!r}")
    bpe_file = environ.get("TINYGPT_BPE_FILE")
    if bpe_file and not Path(bpe_file).is_file():
        raise UsageError(f"TINYGPT_BPE_FILE names no file: {bpe_file}")
    cache = environ.get("TINYGPT_CACHE")
    if cache and Path(cache).exists() and not Path(cache).is_dir():
        raise UsageError(f"TINYGPT_CACHE must be a folder, got the file {cache}")
    kernels = environ.get("TINYGPT_KERNELS")
    if kernels is not None:
        from tinygpt.dispatch import set_kernels

        try:
            set_kernels(kernels)
        except ValueError as e:
            raise UsageError(f"TINYGPT_KERNELS={kernels!r}: {e}") from None


def _check_numbers(environ) -> None:
    """The numeric variables, through the parsers that read them during the run."""
    from tinygpt import env

    for parse in (env.num_threads, env.dist_timeout):
        try:
            parse(environ)
        except ValueError as e:
            raise UsageError(str(e)) from None


def _devices() -> tuple[str, ...]:
    from tinygpt.backend import DEVICES

    return DEVICES


def choose_device(args) -> None:
    """Fill in args.device when the command has a --device option and it was not given
    (TINYGPT_DEVICE, else "cpu"), and make it the default device: an unknown or unusable
    device fails here, before any work, naming where the name came from."""
    if not hasattr(args, "device"):
        return
    from tinygpt import backend
    from tinygpt.errors import RunError

    source = f"--device {args.device}"
    if args.device is None:
        args.device = os.environ.get("TINYGPT_DEVICE") or "cpu"
        source = f"TINYGPT_DEVICE={args.device}"
    try:
        backend.set_default_device(args.device)
    except (ValueError, RunError) as e:  # an unknown name; no CuPy or no GPU
        raise UsageError(f"{source}: {e}") from None


# ------------------------------------------------------------------ combinations of options

def check_model_shape(cfg: dict) -> None:
    """A GPT config's sizes fit together (each head gets a whole slice of emb_dim)."""
    if cfg["emb_dim"] % cfg["n_heads"]:
        raise UsageError(f"--emb-dim {cfg['emb_dim']} must be a multiple of --n-heads {cfg['n_heads']} "
                         f"(each head gets emb_dim / n_heads features)")


def check_top_k(top_k: int | None, vocab_size: int) -> None:
    if top_k is not None and top_k > vocab_size:
        raise UsageError(f"--top-k must be <= the vocabulary size {vocab_size}, got {top_k}")


# ------------------------------------------------------------------ options given with --resume

def option_name(attr: str) -> str:
    return "--" + attr.replace("_", "-")


def check_fixed_on_resume(args, saved: dict) -> None:
    """Refuse, listing them all, the options given with --resume that would change what
    cannot change mid-run (model shape, tokenizer, batch size, ...). `saved` maps each such
    argparse attribute to the run's value; an option left out, or equal to it, is fine."""
    wrong = [f"{option_name(attr)} {getattr(args, attr)} (the run has {value})" for attr, value in saved.items()
             if getattr(args, attr, None) is not None and getattr(args, attr) != value]
    if wrong:
        raise UsageError(f"these options cannot change when resuming: {', '.join(wrong)}; leave them out to continue "
                         f"the run, or start a new run with --out DIR")


def changes_on_resume(args, saved_config: dict, fields: tuple[str, ...]) -> dict:
    """The TrainConfig fields (argparse attributes of the same names) given with --resume
    that differ from the run's, as {field: new value}."""
    return {f: getattr(args, f) for f in fields
            if getattr(args, f, None) is not None and getattr(args, f) != saved_config.get(f)}
