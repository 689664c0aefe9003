"""The one list of gradcheck cases (tinygpt/opsuite.py) and its pickers (tinygpt/opcase.py):
what `tinygpt gradcheck` builds from it, and the mistakes in the list that must not pass silently."""
import subprocess
import sys

import numpy as np
import pytest

import tinygpt as tg
from tinygpt.opcase import Case, FixedPicker, describe
from tinygpt.opsuite import CASES, cases

# the ops `tinygpt gradcheck` listed before the list was shared with the tests
GRADCHECK_OPS = ["add", "sub", "mul", "div", "pow", "neg", "matmul", "getitem", "reshape", "transpose", "cat",
                 "split", "sum", "mean", "max", "var", "exp", "log", "tanh", "sqrt", "where", "masked_fill",
                 "linear", "embedding", "layer_norm", "gelu", "softmax", "log_softmax", "attention",
                 "attention_dropout", "cross_entropy", "dropout"]


def test_the_list_does_not_need_hypothesis():
    code = "import sys, tinygpt.opsuite; sys.exit('hypothesis' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_gradcheck_command_still_offers_every_op_it_offered():
    assert set(GRADCHECK_OPS) <= set(cases())


def test_cases_are_built_from_their_first_example():
    suite = cases()
    assert suite["add"][0] == "(3,1,4) (5,1)"  # broadcasting, a size-1 axis
    assert suite["attention"][0] == "(2,2,5,3)x3 causal"
    assert suite["getitem"][0] == "(4,3) kind=array_then_slice"  # the example picks the `each` value
    assert suite["pow"][0] == "(2,3) exponent=1.5"  # no example names it: the first value
    assert [tuple(x.shape) for x in suite["layer_norm"][2]] == [(2, 3, 6), (6,), (6,)]


def test_same_seed_gives_the_same_data_and_another_seed_only_other_data():
    first, again, other = cases(seed=0), cases(seed=0), cases(seed=1)
    for name in first:
        a, b, c = (suite[name][2] for suite in (first, again, other))
        assert [tuple(x.shape) for x in a] == [tuple(x.shape) for x in c], name
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=name)
    assert not np.array_equal(first["gelu"][2][0].numpy(), other["gelu"][2][0].numpy())


def test_cases_are_made_on_the_device_asked_for():
    _, fn, inputs = cases("strict")["layer_norm"]
    assert all(x.device == "strict" and x.requires_grad for x in inputs)
    assert fn(*inputs).device == "strict"


def test_every_example_runs_in_some_test_and_test_ids_are_unique():
    ids = [variant.test_id for case in CASES for variant in case.variants()]
    assert len(ids) == len(set(ids))
    for case in CASES:
        assert sum(len(variant.examples) for variant in case.variants()) >= len(case.examples), case.name


def test_an_example_naming_a_pick_the_case_never_makes_is_an_error():
    layer_norm = next(c for c in CASES if c.name == "layer_norm")
    with pytest.raises(ValueError, match=r"'layer_norm' was given \['shpe'\] but picks only \['shape'\]"):
        layer_norm.run(FixedPicker(np.random.default_rng(0), {"shpe": (2, 3)}))


def test_a_case_tested_per_value_gets_one_test_per_value_with_the_examples_for_it():
    def scale(pick):
        p = pick.sampled_from((1, 2), name="p")
        return (lambda x: x * p), [pick.leaf(pick.shape(name="shape"))]

    c = Case("scale", scale, 5, examples=({"shape": (2,)}, {"shape": (3,), "p": 2}), each=("p", (1, 2)))
    assert c.variants() == [("scale-1", {"p": 1}, [{"shape": (2,), "p": 1}]),
                            ("scale-2", {"p": 2}, [{"shape": (2,), "p": 2}, {"shape": (3,), "p": 2}])]
    assert c.first_example() == {"shape": (2,), "p": 1}


def test_fixed_picker_pins_named_picks_and_records_them():
    pick = FixedPicker(np.random.default_rng(0), {"shape": (5, 1), "flag": True})
    assert pick.shape(name="shape") == (5, 1) and pick.booleans(name="flag") is True
    assert pick.integers(3, 3, name="n") == 3
    assert pick.chosen == {"shape": (5, 1), "flag": True, "n": 3} and pick.sizes == {"shape"}


def test_picker_choices_stay_in_their_bounds():
    pick = FixedPicker(np.random.default_rng(0))
    for _ in range(200):
        shape = pick.shape(2, 3)
        assert 2 <= len(shape) <= 3 and all(1 <= n <= 4 for n in shape)
        a, b = pick.broadcast_pair()
        np.broadcast_shapes(a, b)  # raises if they do not broadcast
        axis = pick.axis(len(shape))
        np.empty(shape).sum(axis=axis)  # raises on an out-of-range or repeated axis
    x = pick.leaf((200,), positive=True)
    y = pick.leaf((200,), away_from_zero=True)
    assert x.numpy().min() >= 0.5 and np.abs(y.numpy()).min() >= 0.5 and (y.numpy() < 0).any()


def test_description_writes_equal_shapes_once_and_true_flags_by_name():
    inputs = [tg.zeros(2, 2, 5, 3)] * 3 + [tg.zeros(4)]
    assert describe(inputs, {"causal": True, "bias": False, "p": 0.3, "axis": (0, -1)}) == \
        "(2,2,5,3)x3 (4,) causal p=0.3 axis=(0,-1)"
