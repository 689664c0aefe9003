"""Odd arrays, hooks that return the wrong thing, empty and zero-size inputs, malformed files:
each works or is refused with one line naming what was wrong (issue 19, items 7, 10, 11)."""
import re

import numpy as np
import pytest

import tinygpt as tg
import tinygpt.functional as F
from tinygpt import backend, nn
from tinygpt.finetune.instruct import load_instruction_data
from tinygpt.generate import generate
from tinygpt.model import GPTModel
from tinygpt.optim import AdamW, clip_grad_norm

pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")

SMALL = {"vocab_size": 11, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0,
         "qkv_bias": False}


# ------------------------------------------------------------------ item 7: odd arrays

def test_a_matrix_is_refused_because_its_star_is_a_matrix_product():
    m = np.matrix([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match=r"np\.matrix.*matrix product.*np\.asarray"):
        tg.tensor(m)
    t = tg.tensor(np.asarray(m))
    np.testing.assert_array_equal((t * t).numpy(), [[1, 4], [9, 16]])  # elementwise, not [[7, 10], [15, 22]]


@pytest.mark.parametrize("data, words", [
    (np.ma.masked_array([1.0, 2.0], mask=[0, 1]), "masked array"),
    (np.array([1 + 2j]), "complex"),
    (np.array(["a"]), "text"),
])
def test_odd_arrays_are_refused_with_one_line(data, words):
    with pytest.raises(TypeError, match=words):
        tg.tensor(data)


@pytest.mark.parametrize("make, error, words", [
    (lambda: tg.tensor([[1, 2], [3]]), ValueError, "ragged"),
    (lambda: tg.tensor([1.0], dtype=np.complex64), TypeError, "dtype must be a number or boolean type, got complex64"),
    (lambda: tg.tensor([1.0], dtype=str), TypeError, "dtype must be a number or boolean type"),
    (lambda: GPTModel(None), TypeError, "GPTModel needs a config dict"),
    (lambda: nn.Linear("a", 2), ValueError, "Linear: in_features must be an integer >= 1, got 'a'"),
    (lambda: nn.Embedding(-1, 2), ValueError, "Embedding: num_embeddings must be an integer >= 1, got -1"),
    (lambda: nn.Dropout(2), ValueError, "dropout probability must be in [0, 1], got 2"),
])
def test_a_careless_constructor_call_is_one_line(make, error, words):
    with pytest.raises(error) as info:
        make()
    assert words in str(info.value)


def test_other_ndarray_subclasses_become_plain_arrays(tmp_path):
    mapped = np.memmap(tmp_path / "m.bin", dtype=np.float32, mode="w+", shape=(3,))
    mapped[:] = [1, 2, 3]
    t = tg.tensor(mapped)
    assert type(t.data) is np.ndarray and t.numpy().tolist() == [1, 2, 3]


def grad_through_hook(hook, device="cpu"):
    x = tg.tensor(np.ones((2, 2)), requires_grad=True, device=device)
    y = x * 2
    y.register_hook(hook)
    y.sum().backward()
    return x.grad.numpy()


def returns_matrix(g):
    return np.matrix(np.ones((2, 2)))


def returns_complex(g):
    return g.numpy() * 1j


def returns_other_device(g):
    return g.to("strict")


@pytest.mark.parametrize("hook, error, words", [
    (returns_matrix, TypeError, "np.matrix"),
    (returns_complex, TypeError, "complex numbers"),
    (returns_other_device, RuntimeError, "on device 'strict' for a tensor on 'cpu'"),
])
def test_a_hook_returning_an_odd_array_is_refused_naming_the_hook(hook, error, words):
    with pytest.raises(error) as info:
        grad_through_hook(hook)
    message = str(info.value)
    assert f"hook {hook.__qualname__} returned" in message and words in message, message


def test_a_hook_returning_a_host_array_for_a_device_gradient_is_refused():
    with pytest.raises(RuntimeError, match="on device 'cpu' for a tensor on 'strict'"):
        grad_through_hook(lambda g: np.ones((2, 2), np.float32), device="strict")


def test_a_hook_may_still_return_real_numbers_of_another_dtype():
    np.testing.assert_array_equal(grad_through_hook(lambda g: np.full((2, 2), 3.0)), np.full((2, 2), 6.0))


# ------------------------------------------------------------------ item 11: module hooks

def test_a_module_backward_hook_with_the_wrong_shape_is_named_by_the_users_function():
    def my_backward_hook(module, grad_inputs, grad_outputs):
        return (tg.tensor(np.ones((5, 5))),)

    layer = nn.Linear(2, 2)
    layer.register_full_backward_hook(my_backward_hook)
    with pytest.raises(RuntimeError) as info:
        layer(tg.tensor(np.ones((1, 2)), requires_grad=True)).sum().backward()
    message = str(info.value)
    assert "my_backward_hook" in message and "Linear" in message and "(5, 5)" in message and "(1, 2)" in message
    assert "partial" not in message and "_FullBackwardHook" not in message


@pytest.mark.parametrize("result, words", [((np.ones((1, 2)) * 1j,), "complex"), (tg.ones(1, 2), "returned a Tensor")])
def test_a_module_backward_hook_returning_the_wrong_kind_is_refused(result, words):
    def my_backward_hook(module, grad_inputs, grad_outputs):
        return result

    layer = nn.Linear(2, 2)
    layer.register_full_backward_hook(my_backward_hook)
    with pytest.raises((RuntimeError, TypeError), match=words) as info:
        layer(tg.tensor(np.ones((1, 2)), requires_grad=True)).sum().backward()
    assert "my_backward_hook" in str(info.value)


def test_a_forward_hook_returning_a_string_is_one_clear_line():
    def my_forward_hook(module, inputs, output):
        return "hello"

    layer = nn.Linear(2, 2)
    layer.register_forward_hook(my_forward_hook)
    with pytest.raises(TypeError) as info:
        layer(tg.tensor(np.ones((1, 2))))
    assert str(info.value).startswith("forward hook test_a_forward_hook_returning_a_string_is_one_clear_line.<locals>."
                                      "my_forward_hook of Linear returned a str; return None, or a replacement")


# ------------------------------------------------------------------ item 10: the leftovers of the earlier suite

def test_malformed_instruction_data_names_the_file_and_the_position(tmp_path):
    data = tmp_path / "instructions.json"
    data.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]')
    with pytest.raises(ValueError) as info:
        load_instruction_data(data)
    assert str(info.value) == f"{data} is not valid JSON: Expecting ',' delimiter at line 2 column 22"


def test_instruction_data_that_is_not_text_names_the_file(tmp_path):
    data = tmp_path / "instructions.json"
    data.write_bytes(b'[{"instruction": "\xff"}]')
    with pytest.raises(ValueError, match=f"{data} is not UTF-8 text"):
        load_instruction_data(data)


@pytest.mark.parametrize("ids", [np.zeros((1, 0), np.int64), np.zeros((0,), np.int64), [[]], []])
def test_the_model_refuses_ids_with_no_tokens(ids):
    with pytest.raises(ValueError, match=r"expected token ids of shape \(batch, tokens\) with at least one token, got shape"):
        GPTModel(SMALL)(ids)


def test_the_model_takes_nested_lists_of_ids():
    model = GPTModel(SMALL)
    np.testing.assert_allclose(model([[1, 2, 3]]).numpy(), model(np.array([[1, 2, 3]])).numpy())


@pytest.mark.parametrize("key, value, words", [("emb_dim", 0, "emb_dim must be an integer >= 1, got 0"),
                                                ("vocab_size", 0, "vocab_size must be an integer >= 1"),
                                                ("n_heads", 3, "emb_dim 8 must be a multiple of n_heads 3"),
                                                ("drop_rate", 1.0, "drop_rate must be in [0, 1)"),
                                                ("n_layers", 2.5, "n_layers must be an integer >= 0")])
def test_a_model_config_with_impossible_sizes_names_the_key(key, value, words):
    with pytest.raises(ValueError) as info:
        GPTModel({**SMALL, key: value})
    assert words in str(info.value)


class ScalarBackward(tg.Function):
    """y = 2x, whose backward forgets the shape: one value for the whole input."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad.sum()


def test_a_function_whose_backward_returns_one_value_is_named():
    x = tg.tensor(np.ones((3, 2)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"ScalarBackward\.backward returned a gradient of shape \(\) for input 0 "
                                           r"of shape \(3, 2\)"):
        ScalarBackward.apply(x).sum().backward()


def test_a_function_whose_backward_returns_a_python_number_is_named():
    class NumberBackward(ScalarBackward):
        @staticmethod
        def backward(ctx, grad):
            return 1.0

    x = tg.tensor(np.ones((3, 2)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"NumberBackward\.backward returned a float, not an array, for input 0"):
        NumberBackward.apply(x).sum().backward()


# ------------------------------------------------------------------ item 10: empty and zero-size inputs

def t(*shape):
    return tg.tensor(np.random.default_rng(0).standard_normal(shape), requires_grad=True)


# (name, what to run, the output shape if it works, else the words of its one-line ValueError)
EMPTY = [
    ("add", lambda: t(0, 3) + t(0, 3), (0, 3)),
    ("matmul (2,0)@(0,3)", lambda: t(2, 0) @ t(0, 3), (2, 3)),
    ("matmul (0,2)@(2,3)", lambda: t(0, 2) @ t(2, 3), (0, 3)),
    ("index with no ids", lambda: t(4, 3)[np.zeros(0, np.int64)], (0, 3)),
    ("sum of nothing", lambda: t(0, 3).sum(), ()),
    ("mean of nothing", lambda: t(0, 3).mean(), "mean over all elements of an input of shape (0, 3)"),
    ("mean over an empty axis", lambda: t(2, 0).mean(axis=1), "mean over axis 1 of an input of shape (2, 0)"),
    ("mean over a full axis", lambda: t(0, 3).mean(axis=1), (0,)),
    ("max of nothing", lambda: t(0, 3).max(), "max over all elements"),
    ("max over an empty axis", lambda: t(0, 3).max(axis=0), "max over axis 0"),
    ("exp", lambda: t(0, 3).exp(), (0, 3)),
    ("linear, no rows", lambda: F.linear(t(0, 4), t(3, 4), t(3)), (0, 3)),
    ("linear, no features", lambda: F.linear(t(2, 0), t(3, 0), t(3)), "linear: weight shape (3, 0) has no input features"),
    ("embedding, no ids", lambda: F.embedding(np.zeros((1, 0), np.int64), t(5, 3)), (1, 0, 3)),
    ("layer_norm, no rows", lambda: F.layer_norm(t(0, 4), t(4), t(4)), (0, 4)),
    ("layer_norm, no channels", lambda: F.layer_norm(t(2, 0), t(0), t(0)), "layer_norm: input shape (2, 0) has no channels"),
    ("gelu", lambda: F.gelu(t(0, 3)), (0, 3)),
    ("softmax, no rows", lambda: F.softmax(t(0, 5)), (0, 5)),
    ("softmax over nothing", lambda: F.softmax(t(2, 0)), "softmax: axis -1 of the input (shape (2, 0)) has length 0"),
    ("log_softmax over nothing", lambda: F.log_softmax(t(2, 0)), "log_softmax: axis -1"),
    ("attention, no batch", lambda: F.scaled_dot_product_attention(t(0, 2, 3, 4), t(0, 2, 3, 4), t(0, 2, 3, 4)), (0, 2, 3, 4)),
    ("attention, no keys", lambda: F.scaled_dot_product_attention(t(1, 2, 0, 4), t(1, 2, 0, 4), t(1, 2, 0, 4)),
     "attention: k (1, 2, 0, 4) holds no positions"),
    ("attention, head size 0", lambda: F.scaled_dot_product_attention(t(1, 2, 3, 0), t(1, 2, 3, 0), t(1, 2, 3, 0)),
     "attention: q (1, 2, 3, 0) has head size 0"),
    ("cross_entropy, no rows", lambda: F.cross_entropy(t(0, 5), np.zeros(0, np.int64)), "cross_entropy: no targets"),
    ("cross_entropy, no classes", lambda: F.cross_entropy(t(2, 0), np.zeros(2, np.int64)), "has no classes"),
    ("dropout", lambda: F.dropout(t(0, 3), 0.5), (0, 3)),
    ("nn.Linear(0, 3)", lambda: nn.Linear(0, 3), "Linear: in_features must be an integer >= 1, got 0"),
    ("model, no rows", lambda: GPTModel(SMALL)(np.zeros((0, 4), np.int64)), (0, 4, 11)),
    ("generate, empty prompt", lambda: generate(GPTModel(SMALL), np.zeros((1, 0), np.int64), 3, 8), "non-empty"),
    ("generate, nothing new", lambda: generate(GPTModel(SMALL), np.zeros((1, 2), np.int64), 0, 8), (1, 2)),
]


@pytest.mark.parametrize("name, run, expected", EMPTY, ids=[e[0] for e in EMPTY])
def test_an_empty_input_works_or_is_one_clear_line(name, run, expected):
    if isinstance(expected, str):
        with pytest.raises(ValueError) as info:
            run()
        assert expected in str(info.value) and "\n" not in str(info.value)
        return
    out = run()
    shape = tuple(out.shape)
    assert shape == expected
    if isinstance(out, tg.Tensor) and out.requires_grad:  # and its backward runs too
        out.sum().backward()


def test_tokenizers_take_empty_text():
    from tinygpt.data import CharTokenizer, train_bpe

    char = CharTokenizer.from_text("hello")
    bpe = train_bpe("hello world hello", 260)
    for tok in (char, bpe):
        assert tok.encode("") == [] and tok.decode([]) == ""
    with pytest.raises(ValueError, match="empty text"):
        CharTokenizer.from_text("")


def test_a_tokenizer_file_that_is_not_json_names_the_file(tmp_path):
    from tinygpt.data import CharTokenizer, load_tokenizer

    path = tmp_path / "tokenizer.json"
    path.write_text('{"type": "char", ')
    for load in (load_tokenizer, CharTokenizer.load):
        with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
            load(path)


@pytest.mark.parametrize("run, words", [
    (lambda: tg.cat([]), "cat needs at least one tensor"),
    (lambda: t(2, 1).var(axis=1, ddof=1), "var with ddof=1 of 1 value(s)"),
    (lambda: t(4, 3).split(0), "split: a piece size must be >= 1, got 0"),
])
def test_tensor_methods_with_nothing_to_work_on_are_one_line(run, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        run()


@pytest.mark.parametrize("args, error, words", [
    ((5, [t(2)]), TypeError, "gradcheck: fn must be a function"),
    ((lambda a: a.sum(), [np.ones(2)]), TypeError, "gradcheck: inputs must be Tensors, got ndarray"),
    ((lambda a: a.sum(), [t(2)], 0.0), ValueError, "eps must be > 0"),
])
def test_gradcheck_with_careless_arguments_is_one_line(args, error, words):
    with pytest.raises(error, match=words):
        tg.gradcheck(*args)


@pytest.mark.parametrize("run, error, words", [
    (lambda x: x + None, TypeError, "cannot combine a Tensor with NoneType None"),  # was a silent NaN
    (lambda x: x * "a", TypeError, "cannot combine a Tensor with str 'a'"),
    (lambda x: x.to("gpu"), TypeError, "'gpu' is not a dtype (nor a device: cpu, cuda, strict)"),
    (lambda x: x.register_hook(5), TypeError, "register_hook needs a function of the gradient, got int"),
    (lambda x: tg.tensor([1.0], dtype="floatx"), TypeError, "'floatx' is not a dtype"),
])
def test_careless_tensor_calls_are_one_line(run, error, words):
    with pytest.raises(error, match=re.escape(words)):
        run(t(2))


@pytest.mark.parametrize("run, error, words", [
    (lambda m: AdamW(m.parameters(), lr=float("nan")), ValueError, "lr=nan"),  # was accepted: every step NaN
    (lambda m: AdamW(m), TypeError, "AdamW takes the parameters, not the Linear"),
    (lambda m: clip_grad_norm(m.parameters(), -1), ValueError, "clip_grad_norm: max_norm must be > 0, got -1"),
])
def test_careless_optimizer_calls_are_one_line(run, error, words):
    with pytest.raises(error, match=re.escape(words)):
        run(nn.Linear(2, 2))


def test_finetune_instruct_refuses_malformed_data_before_downloading_the_model(tmp_path, monkeypatch, capsys):
    from tinygpt.cli import main

    def download(*args, **kwargs):
        raise AssertionError("the model was fetched before the data was read")
    monkeypatch.setattr("tinygpt.pretrained.load_model_and_tokenizer", download)
    data = tmp_path / "data.json"
    data.write_text('[{"instruction": "a" "output": "b"}]')
    assert main(["finetune-instruct", "--data", str(data), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err == f"tinygpt: error: {data} is not valid JSON: Expecting ',' delimiter at line 1 column 22\n"


@pytest.mark.parametrize("run, words", [
    (lambda: tg.zeros(-1), "zeros: a shape is integers >= 0, got (-1,)"),
    (lambda: tg.ones(2.5), "ones: a shape is integers >= 0, got (2.5,)"),
    (lambda: tg.randn("a"), "randn: a shape is integers >= 0, got ('a',)"),
    (lambda: tg.manual_seed(-1), "manual_seed: the seed must be an integer >= 0, got -1"),
    (lambda: tg.manual_seed("a"), "manual_seed: the seed must be an integer >= 0, got 'a'"),
])
def test_careless_creation_and_seeding_are_one_line(run, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        run()


@pytest.mark.parametrize("run, op", [
    (lambda: F.gelu(np.ones(3)), "GELU"),  # was "expected a numpy, cupy or strict array, got memoryview"
    (lambda: F.layer_norm(np.ones((2, 3)), tg.ones(3), tg.ones(3)), "LayerNorm"),
    (lambda: F.linear(tg.ones(2, 3), np.ones((4, 3))), "Linear"),  # was "'numpy.ndarray' object has no attribute"
])
def test_an_op_given_a_numpy_array_says_to_wrap_it(run, op):
    with pytest.raises(TypeError, match=re.escape(f"{op}: expected Tensors, got ndarray; wrap arrays with tg.tensor(...)")):
        run()


@pytest.mark.parametrize("eos_id", ["x", 11, -1, 2.5])
def test_generate_refuses_an_eos_id_that_is_no_token(eos_id):
    with pytest.raises(ValueError, match=re.escape(f"eos_id must be a token id in 0..10, got {eos_id!r}")):
        generate(GPTModel(SMALL), np.array([[1, 2]]), 2, 8, eos_id=eos_id)
