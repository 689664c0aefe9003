"""tg.trace(): every backward node exactly once, after all its consumers, with the gradient
statistics retain_grad() gives, module paths from forward time, forward statistics, and
DOT / JSON / HTML views that parse."""
import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.model import GPTModel
from tinygpt.graph_state import state

CFG = {"vocab_size": 30, "context_length": 10, "emb_dim": 8, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}


def _model_and_batch(seed=0):
    tg.manual_seed(seed)
    ids = np.random.default_rng(seed).integers(0, CFG["vocab_size"], (3, 8))
    return GPTModel(CFG), ids[:, :-1], ids[:, 1:]


def _graph(root):
    """Every non-leaf tensor reachable from root, and for each the tensors that consume it and
    its op's inputs, found by walking ._ctx.inputs (independently of the trace)."""
    tensors, consumers, inputs, stack = {id(root): root}, {id(root): []}, {}, [root]
    while stack:
        t = stack.pop()
        inputs[id(t)] = [(i, i is not None and i.requires_grad and not i.is_leaf) for i in t._ctx.inputs]
        for i in t._ctx.inputs:
            if i is None or not i.requires_grad or i.is_leaf:
                continue
            consumers.setdefault(id(i), []).append(t)
            if id(i) not in tensors:
                tensors[id(i)] = i
                stack.append(i)
    return list(tensors.values()), consumers, inputs


@pytest.fixture
def traced():
    model, x, y = _model_and_batch()
    with tg.trace() as t:
        loss = F.cross_entropy(model(x), y)
        tensors, consumers, inputs = _graph(loss)
        for n in tensors:
            n.retain_grad()
        loss.backward()
    t.graph_inputs = inputs
    return t, tensors, consumers, model


def test_every_node_is_recorded_exactly_once_and_after_every_node_consuming_its_output(traced):
    t, tensors, consumers, _ = traced
    records = [t.record(n) for n in tensors]
    assert all(r is not None for r in records)
    assert len(t.nodes) == len(tensors) == len({r.index for r in records})
    assert [n.index for n in t.nodes] == list(range(len(t.nodes)))
    for n, r in zip(tensors, records):
        for consumer in consumers[id(n)]:
            assert t.record(consumer).index < r.index, (r.op, t.record(consumer).op)
        # the record links each input to the record of the node that made it
        expected = [t.record(i).index if is_node else None for i, is_node in t.graph_inputs[id(n)]]
        assert [i if isinstance(i, int) else None for i in r.inputs] == expected


def test_gradient_statistics_equal_those_of_retain_grad(traced):
    t, tensors, _, _ = traced
    for n in tensors:
        g = n.grad.numpy().astype(np.float64)
        r = t.record(n)
        assert r.grad_norm == pytest.approx(np.linalg.norm(g), rel=1e-9, abs=1e-12)
        assert (r.grad_min, r.grad_max) == (g.min(), g.max())
        assert r.grad_zeros == np.mean(g == 0)
        assert r.shape == n.shape and r.dtype == "float32"
    assert t.nodes[0].op == "CrossEntropy" and t.nodes[0].grad_norm == 1.0


def test_module_paths_are_taken_at_forward_time(traced):
    t, _, _, model = traced
    by_module = {}
    for n in t.nodes:
        by_module.setdefault(n.module, []).append(n.op)
    assert by_module[None] == ["CrossEntropy"]  # the loss is outside the model
    assert by_module["trf_blocks.1.att.W_query"] == ["Linear"]
    assert "ScaledDotProductAttention" in by_module["trf_blocks.0.att"]
    assert by_module["trf_blocks.0.ff.layers.1"] == ["GELU"]
    assert by_module["tok_emb"] == ["Embedding"] and by_module[""] == ["Add"]  # tok_emb + pos_emb in GPTModel.forward
    linear = next(n for n in t.nodes if n.module == "trf_blocks.1.ff.layers.0")
    assert linear.input_shapes == [(3, 7, 8), (32, 8), (32,)]
    assert linear.saved_bytes == (3 * 7 * 8 + 32 * 8) * 4  # its input rows and its weight, float32
    assert linear.op_line.startswith("tinygpt/nn.py:") and linear.user_line.startswith("tests/test_trace.py:")
    leaf = t.leaves[int(linear.inputs[1].split(":")[1])]
    assert leaf.name == "trf_blocks.1.ff.layers.0.weight" and leaf.shape == (32, 8)


def test_ops_made_before_the_trace_are_recorded_without_a_module():
    model, x, y = _model_and_batch()
    loss = F.cross_entropy(model(x), y)
    tensors, _, _ = _graph(loss)
    with tg.trace() as t:
        loss.backward()
    assert len(t.nodes) == len(tensors)
    assert {n.module for n in t.nodes} == {None}
    assert state.observers == []


def test_forward_statistics_gelu_tails_output_moments_and_uniform_attention_entropy():
    model, x, y = _model_and_batch()
    model.trf_blocks[0].ff.layers[0].weight.data *= 20  # push GELU inputs into the flat tails
    for block in model.trf_blocks:  # all-zero queries: every query attends uniformly to its i+1 keys
        block.att.W_query.weight.data[:] = 0
        block.att.W_query.bias.data[:] = 0
    seen = {}
    model.trf_blocks[0].ff.layers[1].register_forward_hook(lambda m, i, o: seen.update(gelu_in=i[0].numpy()))
    model.trf_blocks[1].register_forward_hook(lambda m, i, o: seen.update(block_out=o.numpy()))
    with tg.trace() as t:
        model(x)
    tail = np.mean(np.abs(seen["gelu_in"]) > 3)
    assert 0.05 < tail < 1 and t.modules["trf_blocks.0.ff.layers.1"].gelu_tail == pytest.approx(tail)
    assert t.modules["trf_blocks.1"].out_mean == pytest.approx(seen["block_out"].mean(), rel=1e-5, abs=1e-7)
    assert t.modules["trf_blocks.1"].out_std == pytest.approx(seen["block_out"].std(), rel=1e-5)
    uniform = np.mean([math.log(i + 1) for i in range(x.shape[1])])  # entropy of a uniform choice among i+1 keys
    assert t.modules["trf_blocks.0.att"].attention_entropy == pytest.approx([uniform] * CFG["n_heads"], rel=1e-5)


def test_table_lists_modules_with_totals_or_every_node_when_flat(traced):
    t, tensors, _, _ = traced
    grouped, flat = t.table(), t.table(flat=True)
    assert f"{len(tensors)} backward nodes" in grouped
    assert re.search(r"^trf_blocks\.0\.att +9 ", grouped, re.M)  # 4 reshapes, 4 transposes, attention
    node_lines = [line for line in flat.splitlines() if re.match(r"^ +\d+  ", line)]
    assert len(node_lines) == len(tensors)
    only = t.table(flat=True, module="trf_blocks.1.att")
    modules = {line.split()[2] for line in only.splitlines() if re.match(r"^ +\d+  ", line)}
    assert modules == {"trf_blocks.1.att", "trf_blocks.1.att.W_query", "trf_blocks.1.att.W_key",
                       "trf_blocks.1.att.W_value", "trf_blocks.1.att.out_proj"}
    assert "forward statistics" in grouped


def _dot_structure(text):
    """(declared node ids, edges) of DOT text written one statement per line."""
    assert text.startswith("digraph ") and text.rstrip().endswith("}")
    assert text.count("{") == text.count("}") == 1  # labels hold no braces
    declared = re.findall(r"^  (?!node )(\w+) \[", text, re.M)  # not the default-attributes line
    edges = re.findall(r"^  (\w+) -> (\w+);$", text, re.M)
    for label in re.findall(r'label="((?:[^"\\]|\\.)*)"', text):
        assert "\n" not in label
    return declared, edges


def test_dot_text_holds_every_node_and_edge_and_parses(traced):
    t, _, _, _ = traced
    text = t.to_dot()
    declared, edges = _dot_structure(text)
    assert len(declared) == len(set(declared)) == len(t.nodes) + len(t.leaves)
    assert {a for a, _ in edges} | {b for _, b in edges} <= set(declared)
    assert len(edges) == sum(i is not None for n in t.nodes for i in n.inputs)
    assert "|grad| 1" in text and "7x30" in text  # the loss's gradient, the logits' shape
    graphviz = pytest.importorskip("graphviz")
    try:
        svg = graphviz.Source(text).pipe(format="svg").decode()
    except graphviz.ExecutableNotFound:
        pytest.skip("graphviz is installed but Graphviz's dot is not")
    assert svg.count('class="node"') == len(declared)


def test_json_and_html_hold_every_record(traced):
    t, _, _, _ = traced
    data = json.loads(t.to_json())
    assert [n["op"] for n in data["nodes"]] == [n.op for n in t.nodes]
    assert data["nodes"][0]["grad_norm"] == 1.0 and data["nodes"][0]["module"] is None
    page = t.to_html()

    class Sections(HTMLParser):
        count, rows = 0, 0

        def handle_starttag(self, tag, attrs):
            self.count += tag == "details"
            self.rows += tag == "tr"

    parser = Sections()
    parser.feed(page)
    assert parser.count == len({n.module for n in t.nodes})
    assert parser.rows == len(t.nodes) + parser.count  # a header row per section


def test_the_trace_leaves_the_observers_even_when_the_block_raises():
    with pytest.raises(ZeroDivisionError):
        with tg.trace():
            1 / 0
    assert state.observers == []
