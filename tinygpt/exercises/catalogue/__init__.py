"""Catalogues of the mistakes people make, one module per exercise.

Each mistake is a small function that computes the wrong gradient(s) that mistake gives,
from the same inputs as the check, and a paragraph that teaches: what the term is, why it
is there, and which line of the derivation it comes from. When a learner's gradient is
wrong, the checker computes every mistake of the exercise and names the one (or the pair)
that reproduces the learner's numbers.

A module holds `context(inputs, dout) -> Context` (the forward's values by their names, as
the mistakes use them) and `MISTAKES`, filled with the @catalogue.mistake decorator."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable


@dataclass(frozen=True)
class Mistake:
    key: str            # short and stable, e.g. "no-diagonal"
    title: str          # names the mistake in a line
    lesson: str         # the paragraph that teaches
    wrong: Callable     # (context) -> {gradient name: the wrong gradient, or a list of the variants}

    def text(self) -> str:
        return f"{self.title}. {self.lesson}"


class Context(SimpleNamespace):
    """The forward's values by name (x, y, rstd, P, ...), dout as `dy`, and for exercises of
    several steps `d`: the gradients flowing into each step (the learner's, where usable)."""


def recorder(mistakes: list) -> Callable:
    """@mistake(key, title, lesson) on a function (context) -> {grad: wrong}: add it to `mistakes`."""
    def mistake(key: str, title: str, lesson: str):
        def add(wrong):
            mistakes.append(Mistake(key, title, " ".join(lesson.split()), wrong))
            return wrong
        return add
    return mistake


def load(name: str):
    """The catalogue module of exercise `name`, or None."""
    from tinygpt.exercises.catalogue.warmups import CATALOGUES

    if name in CATALOGUES:
        return CATALOGUES[name]
    try:
        return importlib.import_module(f"tinygpt.exercises.catalogue.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"tinygpt.exercises.catalogue.{name}":
            raise
        return None
