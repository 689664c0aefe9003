"""One gradient-check case and the pickers that choose its shapes (the list is in opsuite.py).

A case is a small function of a `Picker`: it asks the picker for its shapes and options
(`pick.shape()`, `pick.broadcast_pair()`, `pick.sampled_from(...)`, ...) and for its leaves,
and returns the function to check and its inputs, and optionally a third item: the same
computation in PyTorch, `reference(torch, *torch_tensors)`, for the parity tests (`same(fn)`
when fn itself runs on torch tensors, as `x * y` does). The picker decides how the choices are made:
`FixedPicker` from a seeded NumPy generator (`tinygpt gradcheck`), the tests' picker from
hypothesis (so a failing case shrinks to a small one). Subclasses supply the two primitive
choices, `_integers` and `_sampled_from`; everything else is built on them, so hypothesis
stays a test-only dependency.

A pick given a `name` can be pinned by an example (`{"shape": (2, 3)}`), and a case with
`each=(name, values)` is tested once per value; `Case.variants()` gives the test ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

import tinygpt as tg

Build = Callable[["Picker"], tuple]  # -> (fn, inputs) or (fn, inputs, torch reference)
MAX_DIM = 4  # gradcheck runs two forwards per input element: keep every array small


class Picker:
    """Chooses shapes and options for one run of a case and makes its leaves. `overrides`
    pins named picks; `chosen` records every named pick, `sizes` those that only set sizes."""

    def __init__(self, rng: np.random.Generator, overrides: dict[str, Any] | None = None, device: str | None = None):
        self.rng, self.device = rng, device
        self.overrides, self.chosen, self.sizes = dict(overrides or {}), {}, set()

    def _integers(self, lo: int, hi: int, label: str | None) -> int:
        raise NotImplementedError

    def _sampled_from(self, values: Sequence, label: str | None):
        raise NotImplementedError

    def custom(self, name: str | None, draw: Callable[[], Any]):
        """A pick composed from other picks; an example may set it whole."""
        value = self.overrides[name] if name in self.overrides else draw()
        if name is not None:
            self.chosen[name] = value
        return value

    def integers(self, lo: int, hi: int, name: str | None = None) -> int:
        """An int in [lo, hi], both included."""
        return self.custom(name, lambda: self._integers(lo, hi, name))

    def sampled_from(self, values: Sequence, name: str | None = None):
        return self.custom(name, lambda: self._sampled_from(values, name))

    def booleans(self, name: str | None = None) -> bool:
        return self.sampled_from((False, True), name)

    def _size(self, name: str | None, draw: Callable[[], Any]):
        """A pick that only sets sizes: the description shows it through the input shapes."""
        if name is not None:
            self.sizes.add(name)
        return self.custom(name, draw)

    def dim(self, name: str | None = None, low: int = 1, high: int = MAX_DIM) -> int:
        return self._size(name, lambda: self._integers(low, high, name))

    def shape(self, min_dims: int = 1, max_dims: int = 3, name: str | None = None) -> tuple[int, ...]:
        return self._size(name, lambda: tuple(self.dim() for _ in range(self.integers(min_dims, max_dims))))

    def broadcast_pair(self, max_dims: int = 3, name: str | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Two shapes that broadcast together: each is the full shape (or a suffix of it) with
        some dims squashed to 1, e.g. (3, 1, 4) with (4,) or (2, 1)."""
        def draw():
            full = self.shape(1, max_dims)
            a, b = (tuple(1 if self.booleans() else n for n in s) for s in (full, full[self.integers(0, len(full)):]))
            return (b, a) if self.booleans() else (a, b)
        return self._size(name, draw)

    def axis(self, ndim: int, name: str | None = None):
        """axis=None, a non-negative int, a negative int, or a tuple mixing both signs."""
        def draw():
            kind = self.sampled_from(["none", "int", "negative", "tuple"])
            if kind == "none":
                return None
            if kind != "tuple":
                return self.integers(0, ndim - 1) if kind == "int" else self.integers(-ndim, -1)
            chosen = list(dict.fromkeys(self.integers(0, ndim - 1) for _ in range(self.integers(1, ndim))))
            return tuple(a - ndim if self.booleans() else a for a in chosen)
        return self.custom(name, draw)

    def leaf(self, shape, positive: bool = False, away_from_zero: bool = False) -> tg.Tensor:
        """A leaf of standard-normal data in the default dtype; `positive` puts values in
        [0.5, ...) (log, sqrt), `away_from_zero` keeps the sign but makes |value| >= 0.5 (divisors)."""
        data = self.rng.standard_normal(shape)
        if positive:
            data = 0.5 + np.abs(data)
        elif away_from_zero:
            data = np.sign(data + 1e-12) * (0.5 + np.abs(data))
        return tg.tensor(data, requires_grad=True, device=self.device)

    def leaves(self, *shapes, **kwargs) -> list[tg.Tensor]:
        return [self.leaf(shape, **kwargs) for shape in shapes]

    def ids(self, high: int, shape) -> np.ndarray:
        """Integer ids in [0, high), as a host array (cases wrap them with `constant`)."""
        return self.rng.integers(0, high, size=shape)

    def constant(self, array) -> tg.Tensor:
        """A tensor that takes no gradient, on the picker's device."""
        return tg.tensor(array, device=self.device)


class FixedPicker(Picker):
    """Picks from a seeded NumPy generator, so the same seed gives the same case."""

    def _integers(self, lo, hi, label):
        return int(self.rng.integers(lo, hi + 1))

    def _sampled_from(self, values, label):
        return values[int(self.rng.integers(0, len(values)))]


def same(fn: Callable) -> Callable:
    """The torch reference of a case whose fn uses only operators torch tensors have too."""
    return lambda torch, *tensors: fn(*tensors)


class Built(NamedTuple):
    """A case built once: a short description, the function and its inputs, and the same
    computation in PyTorch (None where the case has none: dropout's masks differ, say)."""
    description: str
    fn: Callable[..., tg.Tensor]
    inputs: list[tg.Tensor]
    reference: Callable | None


class Variant(NamedTuple):
    """One test of a case: its id, the picks it pins, and the examples it runs first."""
    test_id: str
    overrides: dict[str, Any]
    examples: list[dict[str, Any]]


@dataclass(frozen=True)
class Case:
    name: str
    build: Build
    max_examples: int  # hypothesis examples per test
    examples: tuple[dict[str, Any], ...] = ()  # named picks to run as given; the first one is the CLI's
    each: tuple[str, tuple] | None = None  # (pick name, values): one test per value

    def variants(self) -> list[Variant]:
        """The tests of this case: one ("layer_norm"), or one per value of `each`
        ("dropout-0.5"), each running the examples that fit its value."""
        if self.each is None:
            return [Variant(self.name, {}, list(self.examples))]
        key, values = self.each
        return [Variant(f"{self.name}-{value}", {key: value},
                        [{**e, key: value} for e in self.examples if e.get(key, value) == value]) for value in values]

    def first_example(self) -> dict[str, Any]:
        """The picks `tinygpt gradcheck` pins: the first example's, and the first value of `each`."""
        pinned = dict(self.examples[0]) if self.examples else {}
        if self.each is not None:
            pinned.setdefault(self.each[0], self.each[1][0])
        return pinned

    def run(self, pick: Picker) -> Built:
        """Build the case with `pick`. An example naming a pick the case never makes is a
        mistake in the list, so it raises."""
        fn, inputs, *reference = self.build(pick)
        unused = sorted(set(pick.overrides) - set(pick.chosen))
        if unused:
            raise ValueError(f"case {self.name!r} was given {unused} but picks only {sorted(pick.chosen)}")
        description = describe(inputs, {k: v for k, v in pick.chosen.items() if k not in pick.sizes})
        return Built(description, fn, inputs, reference[0] if reference else None)


def describe(inputs: Sequence[tg.Tensor], options: dict[str, Any]) -> str:
    """One short line for a built case, e.g. "(2,2,5,3)x3 causal p=0.3": the input shapes (a
    run of equal ones written once), then the options (a true boolean by its name alone)."""
    words = []
    for shape, run in groupby(str(tuple(x.shape)).replace(" ", "") for x in inputs):
        count = len(list(run))
        words.append(shape if count == 1 else f"{shape}x{count}")
    for key, value in options.items():
        if value is not False:
            words.append(key if value is True else f"{key}={value}".replace(" ", ""))
    return " ".join(words)


CASES: list[Case] = []


def case(name: str, max_examples: int, examples: Sequence[dict[str, Any]] = (),
         each: tuple[str, Sequence] | None = None):
    """Add the decorated build function to the list: `max_examples` hypothesis runs per test,
    `examples` (dicts of named picks) run first, one test per value of `each` (pick name, values)."""
    def register(build: Build) -> Build:
        CASES.append(Case(name, build, max_examples, tuple(examples), each and (each[0], tuple(each[1]))))
        return build
    return register
