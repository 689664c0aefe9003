"""The one list of gradient checks: every op, with the shapes and options worth checking.

`tinygpt gradcheck` builds each case once, from its first example: awkward shapes (size-1
axes, broadcasting, odd sizes) with data from `--seed`. tests/test_ops_gradcheck.py runs
every example and then `max_examples` hypothesis-drawn variants of each case, on every
backend. How a case chooses its shapes: tinygpt/opcase.py.

The same list feeds tests/test_kernels.py (each fused op's fast version against its plain
math, on every case's examples and more seeds) and tests/test_torch_parity_ops.py (every case
with a torch reference, outputs and gradients against PyTorch's).

A new op adds one case here: a function of a picker that returns (fn, inputs, reference), e.g.

    @case("layer_norm", max_examples=125, examples=[{"shape": (2, 3, 6)}])
    def layer_norm(pick):
        shape = pick.shape(1, 3, name="shape")
        return F.layer_norm, pick.leaves(shape, shape[-1:], shape[-1:]), \
            lambda torch, x, scale, shift: torch.nn.functional.layer_norm(x, shape[-1:], scale, shift, eps=1e-5)
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import numpy as np

import tinygpt as tg
import tinygpt.functional as F
from tinygpt import opsuite_fused, opsuite_llama  # noqa: F401 (each registers its cases)
from tinygpt.opcase import CASES, FixedPicker, Picker, case, same

def cases(device: str = "cpu", seed: int = 0) -> dict[str, tuple[str, Callable[..., tg.Tensor], list[tg.Tensor]]]:
    """op name -> (shape description, fn, inputs): each case built from its first example,
    the rest of its choices and its data drawn from `seed`."""
    return {c.name: c.run(FixedPicker(np.random.default_rng(seed), c.first_example(), device))[:3] for c in CASES}


# ============================================================================ arithmetic

BROADCAST_EXAMPLES = [{"pair": ((3, 1, 4), (5, 1))}, {"pair": ((3, 1, 4), (4,))}, {"pair": ((1,), (2, 3))}]


def _binary(name: str, op: Callable[[tg.Tensor, tg.Tensor], tg.Tensor], divides: bool = False) -> None:
    @case(name, max_examples=75, examples=BROADCAST_EXAMPLES)
    def binary(pick):
        a_shape, b_shape = pick.broadcast_pair(name="pair")
        return op, [pick.leaf(a_shape), pick.leaf(b_shape, away_from_zero=divides)], same(op)


_binary("add", operator.add)
_binary("sub", operator.sub)
_binary("mul", operator.mul)
_binary("div", operator.truediv, divides=True)

SCALAR_FORMS = {"x+2": lambda x: x + 2.0, "1.5+x": lambda x: 1.5 + x, "x-3": lambda x: x - 3.0,
                "2-x": lambda x: 2.0 - x, "3*x": lambda x: 3.0 * x, "x*-0.5": lambda x: x * -0.5,
                "x/4": lambda x: x / 4.0, "1.5/x": lambda x: 1.5 / x}


@case("scalar_operand", max_examples=25, examples=[{"shape": (2, 3)}], each=("form", SCALAR_FORMS))
def scalar_operand(pick):
    form = pick.sampled_from(list(SCALAR_FORMS), name="form")
    return SCALAR_FORMS[form], [pick.leaf(pick.shape(name="shape"), away_from_zero=True)], same(SCALAR_FORMS[form])


@case("neg", max_examples=25, examples=[{"shape": (2, 3)}])
def neg(pick):
    return operator.neg, [pick.leaf(pick.shape(name="shape"))], same(operator.neg)


EXPONENTS = (1.5, 2, 3, 1.0, 0.5, -1.5, 2.5)


@case("pow", max_examples=25, examples=[{"shape": (2, 3)}], each=("exponent", EXPONENTS))
def power(pick):
    exponent = pick.sampled_from(EXPONENTS, name="exponent")
    # integer exponents are defined for any base; fractional ones only for positive bases
    x = pick.leaf(pick.shape(name="shape"), positive=not float(exponent).is_integer())
    return (lambda x: x**exponent), [x], lambda torch, x: x**exponent


MATMUL_KINDS = ("2d", "batched", "3d@2d", "2d@3d", "vec@mat", "mat@vec", "vec@batch", "batch@vec")


@case("matmul", max_examples=250, examples=[
    {"kind": "batched", "batch": ((2, 1), (5,)), "m": 3, "k": 4, "n": 2},  # batch dims (2, 1), (5,) -> (2, 5)
    {"kind": "batched", "batch": ((2, 1), (4,)), "m": 3, "k": 2, "n": 3},
    {"kind": "3d@2d", "b": 2, "m": 3, "k": 4, "n": 3}])  # activations against a shared weight
def matmul(pick):
    """Every way `@` is used: 2-D, batched with broadcast batch dims (up to 4-D), a 3-D input
    against a 2-D weight and back, and with a vector on either side (vector @ vector, whose
    output is 0-d, is a scalar_output form)."""
    m, k, n = pick.dim("m"), pick.dim("k"), pick.dim("n")
    kind = pick.sampled_from(MATMUL_KINDS, name="kind")
    if kind == "batched":
        batch_a, batch_b = pick.broadcast_pair(max_dims=2, name="batch")
        return operator.matmul, pick.leaves(batch_a + (m, k), batch_b + (k, n)), same(operator.matmul)
    b = pick.dim("b")
    shapes = {"2d": ((m, k), (k, n)), "3d@2d": ((b, m, k), (k, n)), "2d@3d": ((m, k), (b, k, n)),
              "vec@mat": ((k,), (k, n)), "mat@vec": ((m, k), (k,)),
              "vec@batch": ((k,), (b, k, n)), "batch@vec": ((b, m, k), (k,))}[kind]
    return operator.matmul, pick.leaves(*shapes), same(operator.matmul)


# ============================================================================ indexing and shapes

INDEX_KINDS = ("slice", "negative_step", "int_and_slice", "int_array_repeats", "int_list_repeats",
               "int_tensor_repeats", "bool_mask", "bool_rows", "array_then_slice", "slice_then_array", "two_arrays")


def _index(kind: str, shape, pick: Picker):
    """An index of the given kind for an array of `shape` (2 or 3 dims). Integer arrays always
    hold a repeated entry, so the backward must scatter-add rather than assign."""
    rng, (n0, n1) = pick.rng, shape[:2]
    rows = rng.integers(-n0, n0, size=3)
    rows = np.append(rows, rows[0])  # a repeat, possibly spelled negatively elsewhere
    cols = rng.integers(-n1, n1, size=4)
    cols[1] = cols[0]
    start = int(rng.integers(0, n0))
    stop, step = int(rng.integers(start + 1, n0 + 1)), int(rng.integers(1, 3))
    mask = rng.random(shape) < 0.5
    mask.flat[int(rng.integers(0, mask.size))] = True
    row_mask = rng.random(n0) < 0.5
    row_mask[start] = True
    return {"slice": slice(start, stop, step),
            "negative_step": (slice(None, None, -1), Ellipsis, slice(None, None, -2)),
            "int_and_slice": (-1, slice(None, None, -1)),
            "int_array_repeats": rows,
            "int_list_repeats": [int(r) for r in rows],
            "int_tensor_repeats": pick.constant(rows),
            "bool_mask": mask,
            "bool_rows": row_mask,
            "array_then_slice": (rows, slice(None, None, -1)),
            "slice_then_array": (slice(start, None), cols),
            "two_arrays": (rows[:, None], cols[None, :2])}[kind]  # paired (row, col) picks


@case("getitem", max_examples=40, examples=[{"kind": "array_then_slice", "shape": (4, 3)}], each=("kind", INDEX_KINDS))
def getitem(pick):
    kind = pick.sampled_from(INDEX_KINDS, name="kind")
    shape = pick.shape(2, 3, name="shape")
    index = _index(kind, shape, pick)
    return (lambda x: x[index]), [pick.leaf(shape)]


@case("reshape", max_examples=75, examples=[{"shape": (2, 3, 4), "new_shape": (6, -1)}])
def reshape(pick):
    shape = pick.shape(1, 4, name="shape")
    size = int(np.prod(shape))

    def new_shape():  # the same elements, written with a -1 the way users write it
        rows = pick.sampled_from([d for d in range(1, size + 1) if size % d == 0])
        return pick.sampled_from([(rows, -1), (-1, rows), (rows, 1, -1), (size,)])
    target = pick.custom("new_shape", new_shape)
    return (lambda x: x.reshape(*target)), [pick.leaf(shape)], lambda torch, x: x.reshape(*target)


@case("transpose", max_examples=75, examples=[{"shape": (2, 3, 4), "axis1": 0, "axis2": 2}])
def transpose(pick):
    shape = pick.shape(1, 4, name="shape")
    axis1, axis2 = (pick.integers(-len(shape), len(shape) - 1, name=f"axis{i}") for i in (1, 2))
    return (lambda x: x.transpose(axis1, axis2)), [pick.leaf(shape)], lambda torch, x: x.transpose(axis1, axis2)


@case("cat", max_examples=100, examples=[{"shape": (2, 3), "axis": 1, "sizes": (3, 1)}])
def cat(pick):
    shape = pick.shape(1, 3, name="shape")
    axis = pick.integers(-len(shape), len(shape) - 1, name="axis")
    sizes = pick.shape(1, 3, name="sizes")  # each piece's length along axis, 1 to 3 pieces
    at = axis % len(shape)
    return ((lambda *xs: tg.cat(xs, axis=axis)), [pick.leaf(shape[:at] + (n,) + shape[at + 1:]) for n in sizes],
            lambda torch, *xs: torch.cat(xs, dim=axis))


@case("split", max_examples=100, examples=[{"shape": (5, 3), "axis": 0, "sizes": [2, 3]}])
def split(pick):
    shape = pick.shape(1, 3, name="shape")
    axis = pick.integers(-len(shape), len(shape) - 1, name="axis")
    n = shape[axis]

    def sizes():  # one piece size (the last piece may be shorter), or the pieces between 1 or 2 cuts
        if pick.booleans():
            return pick.integers(1, n)
        return np.diff([0, *sorted(pick.integers(0, n) for _ in range(pick.integers(1, 2))), n]).tolist()
    pieces = pick.custom("sizes", sizes)

    def split_then_rejoin(x):  # each piece scaled differently, so a gradient routed to the wrong piece shows
        return tg.cat([piece * (i + 1.0) for i, piece in enumerate(x.split(pieces, axis=axis))], axis=axis)
    return split_then_rejoin, [pick.leaf(shape)]


# ============================================================================ reductions and elementwise


def _reduction(name: str, example: dict[str, Any]) -> None:
    @case(name, max_examples=100, examples=[example])
    def reduction(pick):
        shape = pick.shape(1, 3, name="shape")
        axis, keepdims = pick.axis(len(shape), name="axis"), pick.booleans(name="keepdims")
        # random floats have no ties, so max has a unique winner and a well-defined derivative
        def reference(torch, x):
            dims = tuple(range(x.ndim)) if axis is None else axis
            if name == "max":
                return torch.amax(x, dim=dims, keepdim=keepdims)
            if name == "var":
                return torch.var(x, dim=dims, keepdim=keepdims, correction=0)
            return getattr(torch, name)(x, dim=dims, keepdim=keepdims)
        return (lambda x: getattr(x, name)(axis=axis, keepdims=keepdims)), [pick.leaf(shape)], reference


_reduction("sum", {"shape": (3, 1, 4), "axis": (0, 2), "keepdims": False})
_reduction("mean", {"shape": (3, 4), "axis": -1, "keepdims": True})
_reduction("max", {"shape": (3, 5), "axis": 1, "keepdims": False})
_reduction("var", {"shape": (3, 5), "axis": 0, "keepdims": False})


@case("var_unbiased", max_examples=50, examples=[{"shape": (3, 5), "axis": 1}])
def var_unbiased(pick):
    shape = pick.shape(1, 3, name="shape")
    axis = pick.axis(len(shape), name="axis")
    if np.empty(shape).sum(axis=axis).size == np.prod(shape):  # fewer than 2 values per variance
        shape, axis = shape + (2,), -1
    return (lambda x: x.var(axis=axis, keepdims=True, ddof=1)), [pick.leaf(shape)]


SCALAR_OUTPUTS = {  # fns of two (rows, classes) leaves and (rows,) targets whose output is 0-d
    "x.sum()": lambda x, y, t: x.sum(),
    "x.sum(axis=(0,-1))": lambda x, y, t: x.sum(axis=(0, -1)),
    "x.mean()": lambda x, y, t: x.mean(),
    "x.var()": lambda x, y, t: x.var(),
    "vector@vector": lambda x, y, t: x.reshape(-1) @ y.reshape(-1),
    "x.max()": lambda x, y, t: x.max(),
    "x.max(axis=(1,0))": lambda x, y, t: x.max(axis=(1, 0)),
    "cross_entropy": lambda x, y, t: F.cross_entropy(x, t),
}


@case("scalar_output", max_examples=10, examples=[{"shape": (2, 3)}], each=("form", SCALAR_OUTPUTS))
def scalar_output(pick):
    """On NumPy, backward rules applied to 0-d arrays return NumPy scalars, which the next rule
    must still accept (a crash here once broke x.mean().backward())."""
    form = pick.sampled_from(list(SCALAR_OUTPUTS), name="form")
    rows, classes = pick.shape(2, 2, name="shape")
    targets = pick.ids(classes, rows)
    return (lambda x, y: SCALAR_OUTPUTS[form](x, y, targets)), pick.leaves((rows, classes), (rows, classes))


def _unary(name: str, positive: bool = False) -> None:
    @case(name, max_examples=50, examples=[{"shape": (2, 3)}])
    def unary(pick):
        return ((lambda x: getattr(x, name)()), [pick.leaf(pick.shape(name="shape"), positive=positive)],
                lambda torch, x: getattr(x, name)())


_unary("exp")
_unary("log", positive=True)
_unary("tanh")
_unary("sqrt", positive=True)

WHERE_FORMS = ("tensors", "scalar_else", "scalar_then")


@case("where", max_examples=100, examples=[{"pair": ((3, 1, 4), (3, 5, 4))}, {"pair": ((3, 1, 4), (5, 1))}],
      each=("form", WHERE_FORMS))
def where(pick):
    form = pick.sampled_from(WHERE_FORMS, name="form")
    pair = pick.broadcast_pair(name="pair")
    cond = pick.rng.random(np.broadcast_shapes(*pair)) < 0.5
    a, b = pick.leaves(*pair)
    if form == "scalar_else":
        return (lambda a: tg.where(cond, a, -2.0)), [a]
    if form == "scalar_then":
        return (lambda b: tg.where(cond, 3.0, b)), [b]
    return (lambda a, b: tg.where(cond, a, b)), [a, b]


@case("masked_fill", max_examples=100, examples=[{"pair": ((3, 5, 4), (3, 1, 4))}])
def masked_fill(pick):
    x_shape, mask_shape = pick.broadcast_pair(name="pair")
    mask = pick.constant(pick.rng.random(mask_shape) < 0.5)  # broadcasts against x
    # a moderate fill: -1e9 would add a 1e9 constant to the objective gradcheck differentiates,
    # and its rounding (1e9 * 1e-16 / eps) would swamp the finite differences
    return (lambda x: x.masked_fill(mask, -5.0)), [pick.leaf(x_shape)]
