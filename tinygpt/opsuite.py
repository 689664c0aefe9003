"""The one list of gradient checks: every op, with the shapes and options worth checking.

`tinygpt gradcheck` builds each case once, from its first example: awkward shapes (size-1
axes, broadcasting, odd sizes) with data from `--seed`. tests/test_ops_gradcheck.py runs
every example and then `max_examples` hypothesis-drawn variants of each case, on every
backend. How a case chooses its shapes: tinygpt/opcase.py.

A new op adds one case here: a function of a picker that returns (fn, inputs), e.g.

    @case("layer_norm", max_examples=125, examples=[{"shape": (2, 3, 6)}])
    def layer_norm(pick):
        shape = pick.shape(1, 3, name="shape")
        return F.layer_norm, pick.leaves(shape, shape[-1:], shape[-1:])
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import numpy as np

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.opcase import Build, Case, FixedPicker, Picker

CASES: list[Case] = []


def case(name: str, max_examples: int, examples: Sequence[dict[str, Any]] = (),
         each: tuple[str, Sequence] | None = None):
    """Add the decorated build function to the list: `max_examples` hypothesis runs per test,
    `examples` (dicts of named picks) run first, one test per value of `each` (pick name, values)."""
    def register(build: Build) -> Build:
        CASES.append(Case(name, build, max_examples, tuple(examples), each and (each[0], tuple(each[1]))))
        return build
    return register


def cases(device: str = "cpu", seed: int = 0) -> dict[str, tuple[str, Callable[..., tg.Tensor], list[tg.Tensor]]]:
    """op name -> (shape description, fn, inputs): each case built from its first example,
    the rest of its choices and its data drawn from `seed`."""
    return {c.name: c.run(FixedPicker(np.random.default_rng(seed), c.first_example(), device)) for c in CASES}


# ============================================================================ arithmetic

BROADCAST_EXAMPLES = [{"pair": ((3, 1, 4), (5, 1))}, {"pair": ((3, 1, 4), (4,))}, {"pair": ((1,), (2, 3))}]


def _binary(name: str, op: Callable[[tg.Tensor, tg.Tensor], tg.Tensor], divides: bool = False) -> None:
    @case(name, max_examples=75, examples=BROADCAST_EXAMPLES)
    def binary(pick):
        a_shape, b_shape = pick.broadcast_pair(name="pair")
        return op, [pick.leaf(a_shape), pick.leaf(b_shape, away_from_zero=divides)]


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
    return SCALAR_FORMS[form], [pick.leaf(pick.shape(name="shape"), away_from_zero=True)]


@case("neg", max_examples=25, examples=[{"shape": (2, 3)}])
def neg(pick):
    return operator.neg, [pick.leaf(pick.shape(name="shape"))]


EXPONENTS = (1.5, 2, 3, 1.0, 0.5, -1.5, 2.5)


@case("pow", max_examples=25, examples=[{"shape": (2, 3)}], each=("exponent", EXPONENTS))
def power(pick):
    exponent = pick.sampled_from(EXPONENTS, name="exponent")
    # integer exponents are defined for any base; fractional ones only for positive bases
    x = pick.leaf(pick.shape(name="shape"), positive=not float(exponent).is_integer())
    return (lambda x: x**exponent), [x]


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
        return operator.matmul, pick.leaves(batch_a + (m, k), batch_b + (k, n))
    b = pick.dim("b")
    shapes = {"2d": ((m, k), (k, n)), "3d@2d": ((b, m, k), (k, n)), "2d@3d": ((m, k), (b, k, n)),
              "vec@mat": ((k,), (k, n)), "mat@vec": ((m, k), (k,)),
              "vec@batch": ((k,), (b, k, n)), "batch@vec": ((b, m, k), (k,))}[kind]
    return operator.matmul, pick.leaves(*shapes)


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
    return (lambda x: x.reshape(*target)), [pick.leaf(shape)]


@case("transpose", max_examples=75, examples=[{"shape": (2, 3, 4), "axis1": 0, "axis2": 2}])
def transpose(pick):
    shape = pick.shape(1, 4, name="shape")
    axis1, axis2 = (pick.integers(-len(shape), len(shape) - 1, name=f"axis{i}") for i in (1, 2))
    return (lambda x: x.transpose(axis1, axis2)), [pick.leaf(shape)]


@case("cat", max_examples=100, examples=[{"shape": (2, 3), "axis": 1, "sizes": (3, 1)}])
def cat(pick):
    shape = pick.shape(1, 3, name="shape")
    axis = pick.integers(-len(shape), len(shape) - 1, name="axis")
    sizes = pick.shape(1, 3, name="sizes")  # each piece's length along axis, 1 to 3 pieces
    at = axis % len(shape)
    return (lambda *xs: tg.cat(xs, axis=axis)), [pick.leaf(shape[:at] + (n,) + shape[at + 1:]) for n in sizes]


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
        return (lambda x: getattr(x, name)(axis=axis, keepdims=keepdims)), [pick.leaf(shape)]


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
        return (lambda x: getattr(x, name)()), [pick.leaf(pick.shape(name="shape"), positive=positive)]


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


# ============================================================================ fused ops (functional.py)


@case("linear", max_examples=125, examples=[
    {"lead": (2, 3), "in_features": 5, "out_features": 4, "bias": True},  # (B, T, in) input
    {"lead": (2, 3), "in_features": 4, "out_features": 3, "bias": True},
    {"lead": (3,), "in_features": 2, "out_features": 4, "bias": False}])
def linear(pick):
    lead, in_features, out_features = pick.shape(1, 2, name="lead"), pick.dim("in_features"), pick.dim("out_features")
    bias = pick.booleans(name="bias")
    shapes = [lead + (in_features,), (out_features, in_features)] + [(out_features,)] * bias
    return F.linear, pick.leaves(*shapes)


@case("embedding", max_examples=100, examples=[{"vocab": 10, "dim": 4, "ids_shape": (3,), "as_tensor": True}])
def embedding(pick):
    vocab, dim = pick.dim("vocab"), pick.dim("dim")
    ids = pick.ids(vocab, pick.shape(1, 2, name="ids_shape") + (2,))
    ids[..., 1] = ids[..., 0]  # every id appears at least twice: its gradient rows must add up
    ids = pick.constant(ids) if pick.booleans(name="as_tensor") else ids
    return (lambda weight: F.embedding(ids, weight)), [pick.leaf((vocab, dim))]


@case("layer_norm", max_examples=125, examples=[{"shape": (2, 3, 6)}])
def layer_norm(pick):
    shape = pick.shape(1, 3, name="shape")
    return F.layer_norm, pick.leaves(shape, shape[-1:], shape[-1:])


@case("gelu", max_examples=100, examples=[{"shape": (3, 7)}])
def gelu(pick):
    x = pick.leaf(pick.shape(name="shape"))
    x.data *= 3  # reach the tails, where the tanh saturates
    return F.gelu, [x]


def _softmax_family(name: str, example: dict[str, Any]) -> None:
    @case(name, max_examples=100, examples=[example])
    def softmax_family(pick):
        shape = pick.shape(1, 3, name="shape")
        axis, fn = pick.integers(-len(shape), len(shape) - 1, name="axis"), getattr(F, name)
        return (lambda x: fn(x, axis=axis)), [pick.leaf(shape)]


_softmax_family("softmax", {"shape": (3, 5), "axis": 0})
_softmax_family("log_softmax", {"shape": (3, 5), "axis": -1})


def _attention(pick: Picker, dropout_p: float):
    """q (..., tq, d), k (..., tk, d), v (..., tk, dv); causal needs tq <= tk (each query sees
    its own position, aligned to the last keys)."""
    lead, causal, tk = pick.shape(1, 2, name="lead"), pick.booleans(name="causal"), pick.dim("tk", high=3)
    tq, d, dv = pick.dim("tq", high=tk if causal else 3), pick.dim("d", high=3), pick.dim("dv", high=3)
    # gradcheck reseeds the library's generators before every evaluation, so dropout
    # draws the same mask in every forward and in backward
    return ((lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal, dropout_p=dropout_p)),
            pick.leaves(lead + (tq, d), lead + (tk, d), lead + (tk, dv)))


@case("attention", max_examples=75, examples=[
    {"lead": (2, 2), "causal": True, "tk": 5, "tq": 5, "d": 3, "dv": 3},
    {"lead": (1, 2), "causal": True, "tk": 3, "tq": 2, "d": 2, "dv": 3}])  # fewer queries than keys
def attention(pick):
    return _attention(pick, dropout_p=0.0)


@case("attention_dropout", max_examples=75, examples=[
    {"lead": (1, 2), "causal": True, "tk": 4, "tq": 4, "d": 3, "dv": 3, "p": 0.3},
    {"lead": (2, 1), "causal": True, "tk": 3, "tq": 3, "d": 2, "dv": 2, "p": 0.5}])
def attention_dropout(pick):
    return _attention(pick, dropout_p=pick.sampled_from((0.3, 0.5, 0.6), name="p"))


@case("cross_entropy", max_examples=150, examples=[
    {"lead": (6,), "classes": 7, "ignore_index": -100, "as_tensor": True},
    {"lead": (2, 3), "classes": 4, "ignore_index": -100}])  # (B, T, C) logits, (B, T) targets
def cross_entropy(pick):
    lead, classes = pick.shape(1, 2, name="lead"), pick.dim("classes")
    ignore_index = pick.sampled_from((-100, -1, 2), name="ignore_index")
    targets = pick.ids(classes, lead)
    targets[pick.rng.random(lead) < 0.4] = ignore_index
    targets.flat[0] = (ignore_index + 1) % classes  # at least one counted target
    targets = pick.constant(targets) if pick.booleans(name="as_tensor") else targets
    return (lambda logits: F.cross_entropy(logits, targets, ignore_index=ignore_index)), [pick.leaf(lead + (classes,))]


DROPOUT_P = (0.5, 0.0, 0.3, 0.9, 1.0)


@case("dropout", max_examples=40, examples=[{"shape": (4, 5)}], each=("p", DROPOUT_P))
def dropout(pick):
    p = pick.sampled_from(DROPOUT_P, name="p")
    return (lambda x: F.dropout(x, p, training=True)), [pick.leaf(pick.shape(name="shape"))]


# ============================================================================ compositions


@case("mlp_chain", max_examples=60, examples=[{"batch": 2, "steps": 3, "channels": 3, "hidden": 4, "vocab": 3}])
def mlp_chain(pick):
    """layer_norm -> linear -> gelu -> linear -> cross_entropy, a GPT block's feed-forward and
    head, with one ignored target position."""
    batch, steps, channels = pick.dim("batch", high=2), pick.dim("steps", high=3), pick.dim("channels", low=2, high=3)
    hidden, vocab = pick.dim("hidden"), pick.dim("vocab", low=2, high=3)
    params = pick.leaves((batch, steps, channels), (channels,), (channels,), (hidden, channels), (hidden,),
                         (vocab, hidden), (vocab,))
    targets = pick.ids(vocab, (batch, steps))
    if targets.size > 1:
        targets[-1, -1] = -100  # an ignored position must contribute nothing

    def loss(x, scale, shift, w1, b1, w2, b2):
        h = F.gelu(F.linear(F.layer_norm(x, scale, shift), w1, b1))  # [B, T, C] -> [B, T, hidden]
        return F.cross_entropy(F.linear(h, w2, b2), targets)  # [B, T, hidden] -> [B, T, V] -> scalar
    return loss, params


@case("used_twice", max_examples=60, examples=[{"shape": (2, 3)}])
def used_twice(pick):
    """x feeds two consumers: its gradient is the sum of both (2x + 1)."""
    return (lambda x: x * x + x), [pick.leaf(pick.shape(name="shape"))]
