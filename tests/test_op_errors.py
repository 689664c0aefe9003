"""Misuse of an op fails loudly, with an error type a caller can catch and a message that
names the offending values, the same way on every backend."""
from __future__ import annotations

import re

import numpy as np
import pytest

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.backend import backend_of


def numbers_in(message: str) -> list[int]:
    return [int(n) for n in re.findall(r"-?\d+", message)]


# ============================================================================ embedding


@pytest.mark.parametrize("bad_id", [-1, -3, 7, 12])
def test_embedding_with_out_of_range_id_raises_index_error_naming_id_and_vocab_size(device, bad_id):
    weight = tg.randn(7, 3, requires_grad=True)
    ids = np.array([[0, 6, bad_id], [2, 2, 1]])
    # the engine's own check, not NumPy's "index out of bounds": CuPy would wrap the id silently
    with pytest.raises(IndexError, match="vocabulary") as raised:
        F.embedding(ids, weight)
    found = numbers_in(str(raised.value))
    assert bad_id in found, str(raised.value)
    assert found.count(7) >= (2 if bad_id == 7 else 1), str(raised.value)  # and the vocabulary size


def test_embedding_with_id_equal_to_vocab_size_is_rejected_as_a_tensor_too(device):
    weight = tg.randn(5, 2)
    with pytest.raises(IndexError, match=r"\b5\b.*vocabulary.*\b5\b"):
        F.embedding(tg.tensor([[1, 5]]), weight)


# ============================================================================ cross-entropy


@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_cross_entropy_with_every_target_ignored_raises_value_error_not_nan(device, ignore_index):
    logits = tg.randn(4, 5, requires_grad=True)
    with pytest.raises(ValueError, match=re.escape(f"ignore_index ({ignore_index})")):
        F.cross_entropy(logits, np.full(4, ignore_index), ignore_index=ignore_index)


def test_cross_entropy_counts_the_rows_that_are_not_ignored(device):
    logits = tg.tensor(np.zeros((3, 4)))
    loss = F.cross_entropy(logits, np.array([-100, 2, -100]))  # one counted row: loss = log 4
    assert loss.item() == pytest.approx(np.log(4), rel=1e-6)


@pytest.mark.parametrize("bad_target", [5, 9, -1, -101])
def test_cross_entropy_with_target_out_of_range_raises_index_error_naming_it(device, bad_target):
    logits = tg.randn(2, 3, 5)
    targets = np.array([[0, 4, bad_target], [1, -100, 2]])
    with pytest.raises(IndexError) as raised:
        F.cross_entropy(logits, targets)
    found = numbers_in(str(raised.value))
    assert bad_target in found and 5 in found, str(raised.value)


# ============================================================================ attention


@pytest.mark.parametrize("q_shape, k_shape, v_shape", [
    ((1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 3, 4)),  # q and k head sizes differ
    ((1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 2, 4)),  # k and v lengths differ
    ((1, 2, 3, 4), (2, 2, 3, 4), (2, 2, 3, 4)),  # batch differs
    ((1, 2, 3, 4), (1, 3, 3, 4), (1, 3, 3, 4)),  # heads differ
    ((2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4)),  # number of axes differs
])
def test_attention_with_disagreeing_shapes_raises_value_error_naming_them(device, q_shape, k_shape, v_shape):
    q, k, v = tg.randn(*q_shape), tg.randn(*k_shape), tg.randn(*v_shape)
    with pytest.raises(ValueError) as raised:
        F.scaled_dot_product_attention(q, k, v, causal=False)
    message = str(raised.value)
    for shape in (q_shape, k_shape, v_shape):
        assert str(shape) in message, message


def test_causal_attention_with_more_queries_than_keys_raises_value_error(device):
    q, k = tg.randn(1, 1, 4, 2), tg.randn(1, 1, 3, 2)
    with pytest.raises(ValueError, match=r"3.*4"):
        F.scaled_dot_product_attention(q, k, k, causal=True)


# ============================================================================ shapes that do not fit


@pytest.mark.parametrize("a_shape, b_shape", [((2, 3), (4, 5)), ((2, 3, 4), (3, 2)), ((2, 3), (4, 2, 2)),
                                                ((3,), (4,))])
def test_matmul_with_misaligned_inner_dims_raises_value_error_naming_both_shapes(device, a_shape, b_shape):
    with pytest.raises(ValueError) as raised:
        tg.randn(*a_shape) @ tg.randn(*b_shape)
    assert str(a_shape) in str(raised.value) and str(b_shape) in str(raised.value), str(raised.value)


@pytest.mark.parametrize("a_shape, b_shape", [((4,), (3, 2)), ((2, 3), (4,))])
def test_vector_matmul_with_misaligned_dims_names_the_shapes_the_caller_passed(device, a_shape, b_shape):
    with pytest.raises(ValueError) as raised:
        tg.randn(*a_shape) @ tg.randn(*b_shape)
    assert str(a_shape) in str(raised.value) and str(b_shape) in str(raised.value), str(raised.value)


def test_matmul_with_unbroadcastable_batch_dims_raises_value_error_naming_both_shapes(device):
    with pytest.raises(ValueError) as raised:
        tg.randn(2, 3, 4) @ tg.randn(3, 4, 2)
    assert "(2, 3, 4)" in str(raised.value) and "(3, 4, 2)" in str(raised.value), str(raised.value)


@pytest.mark.parametrize("x_shape, w_shape", [((2, 3), (4, 5)), ((2, 3, 4), (4, 3))])
def test_linear_with_wrong_in_features_raises_value_error_naming_both_shapes(device, x_shape, w_shape):
    with pytest.raises(ValueError) as raised:
        F.linear(tg.randn(*x_shape), tg.randn(*w_shape))
    assert str(x_shape) in str(raised.value) and str(w_shape) in str(raised.value), str(raised.value)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
@pytest.mark.parametrize("a_shape, b_shape", [((2, 3), (4,)), ((3, 1, 4), (5, 3))])
def test_elementwise_op_with_unbroadcastable_shapes_raises_value_error_naming_both(device, op, a_shape, b_shape):
    a, b = tg.randn(*a_shape), tg.randn(*b_shape)
    with pytest.raises(ValueError) as raised:
        {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b, "div": lambda: a / b}[op]()
    assert str(a_shape) in str(raised.value) and str(b_shape) in str(raised.value), str(raised.value)


# ============================================================================ devices


def test_mixing_tensors_from_two_devices_raises_runtime_error_naming_both(device):
    other = "strict" if device != "strict" else "cpu"
    here, there = tg.randn(2, 3), tg.randn(2, 3, device=other)
    attempts = {"add": lambda: here + there, "matmul": lambda: here @ there.transpose(0, 1),
                "linear": lambda: F.linear(here, there), "cat": lambda: tg.cat([here, there])}
    for name, attempt in attempts.items():
        with pytest.raises(RuntimeError) as raised:
            attempt()
        assert device in str(raised.value) and other in str(raised.value), (name, str(raised.value))


# ============================================================================ dropout


@pytest.mark.parametrize("p", [-0.1, 1.5, 2.0])
def test_dropout_probability_outside_unit_interval_raises_value_error_naming_it(device, p):
    x = tg.randn(3, 4)
    with pytest.raises(ValueError, match=re.escape(str(p))):
        F.dropout(x, p)
    with pytest.raises(ValueError, match=re.escape(str(p))):
        F.dropout(x, p, training=False)  # a wrong p is wrong in eval mode too
    q = tg.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match=re.escape(str(p))):
        F.scaled_dot_product_attention(q, q, q, dropout_p=p)


# ============================================================================ backward


@pytest.mark.parametrize("shape", [(2, 3), (4,), (1, 2)])
def test_backward_on_non_scalar_without_gradient_raises_runtime_error_naming_shape(device, shape):
    y = tg.randn(*shape, requires_grad=True) * 2.0
    with pytest.raises(RuntimeError, match=re.escape(str(shape))):
        y.backward()


# ============================================================================ shapes of every functional op

SHAPE_ERRORS = {  # name: (call, words the message must hold)
    "linear bias": (lambda: F.linear(tg.randn(2, 3), tg.randn(4, 3), tg.randn(3)), ["linear", "bias", "(3,)", "(4, 3)"]),
    "linear weight 1-D": (lambda: F.linear(tg.randn(2, 3), tg.randn(3)), ["linear", "weight", "(3,)"]),
    "layer_norm scale": (lambda: F.layer_norm(tg.randn(2, 5), tg.randn(4), tg.randn(5)),
                         ["layer_norm", "scale", "(4,)", "(2, 5)"]),
    "layer_norm shift": (lambda: F.layer_norm(tg.randn(2, 5), tg.randn(5), tg.randn(1, 5)),
                         ["layer_norm", "shift", "(1, 5)", "(2, 5)"]),
    "layer_norm eps": (lambda: F.layer_norm(tg.randn(2, 5), tg.randn(5), tg.randn(5), eps=0.0), ["layer_norm", "eps", "0.0"]),
    "embedding weight 1-D": (lambda: F.embedding(np.array([0, 1]), tg.randn(4)), ["embedding", "weight", "(4,)"]),
    "cross_entropy targets": (lambda: F.cross_entropy(tg.randn(2, 3, 4), np.zeros((3, 2), dtype=int)),
                              ["cross_entropy", "(2, 3, 4)", "(3, 2)"]),
    "softmax axis": (lambda: F.softmax(tg.randn(2, 3), axis=2), ["softmax", "axis 2", "(2, 3)"]),
    "log_softmax axis": (lambda: F.log_softmax(tg.randn(2, 3), axis=-3), ["log_softmax", "axis -3", "(2, 3)"]),
}


@pytest.mark.parametrize("case", SHAPE_ERRORS)
def test_functional_op_with_a_wrong_shape_names_the_op_the_argument_and_the_shapes(device, case):
    call, words = SHAPE_ERRORS[case]
    with pytest.raises(ValueError) as raised:
        call()
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


def test_cross_entropy_with_float_targets_is_a_type_error(device):
    with pytest.raises(TypeError, match="cross_entropy: targets must be integers, got dtype float"):
        F.cross_entropy(tg.randn(2, 3), np.array([0.0, 1.0]))


@pytest.mark.parametrize("data", [["a", "b"], "text", [{"x": 1}], [None, 1.0]])
def test_tensor_refuses_data_that_is_not_numbers(data):
    with pytest.raises(TypeError, match="tensor data must be numbers or booleans"):
        tg.tensor(data)


class WrongShapeGradient(tg.Function):
    """y = 2x with a backward that returns a gradient of the wrong shape."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(-1)[:1]


class TooManyGradients(tg.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad, grad


def test_function_returning_a_wrongly_shaped_gradient_is_named_with_both_shapes(device):
    x = tg.randn(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"WrongShapeGradient.backward returned a gradient of shape \(1,\) for input 0 of shape \(2, 3\)"):
        WrongShapeGradient.apply(x).sum().backward()
    with pytest.raises(RuntimeError, match="TooManyGradients.backward returned 2 gradients for 1 inputs"):
        TooManyGradients.apply(x).sum().backward()


def test_a_gradient_that_broadcasts_to_the_input_is_summed_not_refused(device):
    class Broadcasting(tg.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1.0

        @staticmethod
        def backward(ctx, grad):
            return backend_of(grad).ones((4, 1, 3), dtype=grad.dtype)  # one extra leading axis

    x = tg.tensor(np.ones((1, 3)), requires_grad=True)
    Broadcasting.apply(x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[4.0, 4.0, 4.0]])
