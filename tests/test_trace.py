"""tg.trace(): every backward node exactly once, after all its consumers, with the gradient
statistics retain_grad() gives, module paths from forward time, forward statistics, and
DOT / JSON / HTML views that parse."""
import contextlib
import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.model import GPTModel
from tinygpt.graph_state import state, watching

CFG = {"vocab_size": 30, "context_length": 10, "emb_dim": 8, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}


def _model_and_batch(seed=0):
    tg.manual_seed(seed)
    ids = np.random.default_rng(seed).integers(0, CFG["vocab_size"], (3, 8))
    return GPTModel(CFG), ids[:, :-1], ids[:, 1:]


class _KeepOutputs:
    """An observer that holds every tensor the forward makes: the graph keeps only their
    nodes, and these tests read the tensors (retain_grad, trace.record)."""

    def __init__(self):
        self.outputs = []

    def on_forward(self, ctx, inputs, out):
        self.outputs.append(out)

    def on_backward(self, *args):
        pass


def _graph(root):
    """Every non-leaf tensor reachable from root, and for each the tensors that consume it and
    its op's inputs, found by walking the graph's nodes (._node.ctx.inputs), independently of
    the trace. The tensors must still exist (see _KeepOutputs)."""
    tensors, consumers, inputs, stack = {id(root): root}, {id(root): []}, {}, [root]
    while stack:
        t = stack.pop()
        nodes = t._node.ctx.inputs
        inputs[id(t)] = [(None if i is None else i.tensor(), i is not None and i.ctx is not None) for i in nodes]
        for node in nodes:
            if node is None or node.ctx is None:
                continue
            i = node.tensor()
            consumers.setdefault(id(i), []).append(t)
            if id(i) not in tensors:
                tensors[id(i)] = i
                stack.append(i)
    return list(tensors.values()), consumers, inputs


def _count_nodes(root) -> int:
    """How many op nodes the graph of root has, walked through the nodes alone."""
    seen, stack = {id(root._node)}, [root._node]
    while stack:
        for node in stack.pop().ctx.inputs:
            if node is not None and node.ctx is not None and id(node) not in seen:
                seen.add(id(node))
                stack.append(node)
    return len(seen)


@pytest.fixture
def traced():
    model, x, y = _model_and_batch()
    with tg.trace() as t, watching(_KeepOutputs()):
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


def test_a_trace_of_the_backward_alone_has_the_module_paths_but_no_source_lines_and_says_so(traced):
    inside, _, _, _ = traced
    model, x, y = _model_and_batch()
    with watching(_KeepOutputs()):
        loss = F.cross_entropy(model(x), y)
        tensors, _, _ = _graph(loss)
    with tg.trace() as t:
        loss.backward()
    assert len(t.nodes) == len(tensors)
    assert [(n.op, n.module) for n in t.nodes] == [(n.op, n.module) for n in inside.nodes]
    assert not any(n.forward_seen for n in t.nodes)
    assert {n.op_line for n in t.nodes} == {None}  # not the line that called backward
    first = t.table().splitlines()[0]
    assert first.startswith(f"{len(tensors)} of {len(tensors)} nodes were made before the trace began")
    assert "run the forward inside" in first
    assert state.observers == []


def test_module_paths_are_noted_on_ops_only_when_the_forward_records_a_graph():
    seen = []

    class Probe(tg.nn.Module):
        def forward(self, x):
            seen.append(list(state.module_paths))
            return x * 2.0

    outer = tg.nn.Sequential(Probe())
    x = tg.tensor(np.ones(2, dtype=np.float32), requires_grad=True)
    with tg.no_grad():  # evaluation and generation call forward directly: nothing to note
        outer(x)
    out = outer(x)
    assert seen == [[], ["", "0"]] and state.module_paths == []
    assert out._ctx.module_path == "0"


def test_keep_grads_gives_the_gradients_retain_grad_gives(device):
    model, x, y = _model_and_batch()
    outputs = {}
    for path in ("trf_blocks.0.att", "trf_blocks.1", "trf_blocks.1.ff.layers.1", "final_norm"):
        module = dict(model.named_modules())[path]
        module.register_forward_hook(lambda m, i, out, path=path: outputs.update({path: out.retain_grad()}))
    with tg.trace(keep_grads=True) as t:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    for path, out in outputs.items():
        np.testing.assert_array_equal(t.grad_of(path), out.grad.numpy())
    weight = model.trf_blocks[0].att.W_key.weight
    np.testing.assert_array_equal(t.grad_of("trf_blocks.0.att.W_key.weight"), weight.grad.numpy())
    with pytest.raises(ValueError, match=r"no gradient of 'trf_blocks\.9' in this trace \(known: "):
        t.grad_of("trf_blocks.9")
    with tg.trace() as plain:
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"keep_grads=True"):
        plain.grad_of("trf_blocks.0.att")


def test_grad_of_a_module_called_twice_picks_a_call():
    layer = tg.nn.Linear(3, 3)
    x = tg.tensor(np.ones((2, 3), dtype=np.float32), requires_grad=True)
    with tg.trace(keep_grads=True) as t:
        h = layer(x)
        out = layer(h * 2.0)
        (out * 3.0).sum().backward()
    with pytest.raises(ValueError, match=r"called 2 times while tracing: pick one with grad_of\('', call=0 \.\.\. 1\)"):
        t.grad_of("")
    np.testing.assert_array_equal(t.grad_of("", call=1), np.full((2, 3), 3.0, dtype=np.float32))
    np.testing.assert_allclose(t.grad_of("", call=0), 2.0 * np.full((2, 3), 3.0) @ layer.weight.numpy())


def test_a_trace_entered_twice_counts_once_or_is_refused():
    model, x, y = _model_and_batch()
    t = tg.trace()
    with t:
        with pytest.raises(RuntimeError, match="Trace is already active: enter it once"):
            with t:
                pass
        F.cross_entropy(model(x), y).backward()
    once = len(t.nodes)
    assert once == _count_nodes(F.cross_entropy(model(x), y))
    with pytest.raises(RuntimeError, match="this trace has ended"):
        with t:
            pass
    assert len(t.nodes) == once and state.observers == []


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_forward_statistics_gelu_tails_output_moments_and_uniform_attention_entropy(grad):
    """The same statistics whether or not the forward records a graph (under no_grad the ops keep
    nothing: the trace reads their inputs)."""
    model, x, y = _model_and_batch()
    model.trf_blocks[0].ff.layers[0].weight.data *= 20  # push GELU inputs into the flat tails
    for block in model.trf_blocks:  # all-zero queries: every query attends uniformly to its i+1 keys
        block.att.W_query.weight.data[:] = 0
        block.att.W_query.bias.data[:] = 0
    seen = {}
    model.trf_blocks[0].ff.layers[1].register_forward_hook(lambda m, i, o: seen.update(gelu_in=i[0].numpy()))
    model.trf_blocks[1].register_forward_hook(lambda m, i, o: seen.update(block_out=o.numpy()))
    with tg.trace() as t, (contextlib.nullcontext() if grad else tg.no_grad()):
        model(x)
    tail = np.mean(np.abs(seen["gelu_in"]) > 3)
    assert 0.05 < tail < 1 and t.modules["trf_blocks.0.ff.layers.1"].gelu_tail == pytest.approx(tail)
    assert t.modules["trf_blocks.1"].out_mean == pytest.approx(seen["block_out"].mean(), rel=1e-5, abs=1e-7)
    assert t.modules["trf_blocks.1"].out_std == pytest.approx(seen["block_out"].std(), rel=1e-5)
    uniform = np.mean([math.log(i + 1) for i in range(x.shape[1])])  # entropy of a uniform choice among i+1 keys
    assert t.modules["trf_blocks.0.att"].attention_entropy == pytest.approx([uniform] * CFG["n_heads"], rel=1e-5)


def test_table_has_a_row_per_module_run_with_inputs_a_legend_and_the_parameter_gradients(traced):
    t, tensors, _, model = traced
    grouped, flat = t.table(), t.table(flat=True)
    assert f"{len(tensors)} backward nodes" in grouped
    header = grouped.splitlines()[0].split()
    assert header[:2] == ["module", "nodes"] and "inputs" in header
    # a block's two residual Adds are two rows, each reading the block's input and a branch's output
    block_rows = re.findall(r"^trf_blocks\.0 +#(\d+) .* (#\d+ #\d+) +Add$", grouped, re.M)
    assert len(block_rows) == 2
    # the attention module's own nodes (4 reshapes, 4 transposes, attention) come in runs between the projections
    att_rows = re.findall(r"^trf_blocks\.0\.att +#(\d+)(?:-(\d+))? ", grouped, re.M)
    assert sum(int(b or a) - int(a) + 1 for a, b in att_rows) == 9
    assert re.search(r"^trf_blocks\.1\.att\.W_query +#\d+ .* #\d+ \.weight \.bias +Linear$", grouped, re.M)
    assert grouped.count("saved is what the ops hold") == 1  # the legend, once, under the table
    node_lines = [line for line in flat.splitlines() if re.match(r"^ +\d+  ", line)]
    assert len(node_lines) == len(tensors)
    only = t.table(flat=True, module="trf_blocks.1.att")
    modules = {line.split()[2] for line in only.splitlines() if re.match(r"^ +\d+  ", line)}
    assert modules == {"trf_blocks.1.att", "trf_blocks.1.att.W_query", "trf_blocks.1.att.W_key",
                       "trf_blocks.1.att.W_value", "trf_blocks.1.att.out_proj"}
    assert "trf_blocks.1.att.out_proj.bias " in only and "trf_blocks.0.att.out_proj.bias " not in only
    assert "forward statistics" in grouped


def test_parameter_gradients_are_those_of_grad_when_the_trace_ended(traced):
    t, _, _, model = traced
    names = dict(model.named_parameters())
    assert {leaf.name for leaf in t.leaves} == set(names)
    for leaf in t.leaves:
        g = names[leaf.name].grad.numpy().astype(np.float64)
        assert leaf.grad_norm == pytest.approx(np.linalg.norm(g), rel=1e-9)
        assert (leaf.grad_min, leaf.grad_max, leaf.grad_zeros) == (g.min(), g.max(), np.mean(g == 0))
        row = next(line for line in t.table().splitlines() if line.startswith(leaf.name + " "))
        assert f"{leaf.grad_norm:.3e}" in row
    emb = next(leaf for leaf in t.leaves if leaf.name == "tok_emb.weight")
    assert 0 < emb.grad_zeros < 1  # rows of ids that were not in the batch get no gradient
    assert f"tok_emb.weight\\n30x8\\n|grad| {emb.grad_norm:.3g}" in t.to_dot()


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
    assert "<h2>Parameter gradients</h2>" in page and "trf_blocks.1.att.W_key.weight" in page


def test_the_trace_leaves_the_observers_even_when_the_block_raises():
    with pytest.raises(ZeroDivisionError):
        with tg.trace():
            1 / 0
    assert state.observers == []
