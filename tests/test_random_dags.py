"""Random DAG models, cut at random valid points: the program is still the model.

A model is a chain of Linear layers of one width where layer k reads one or two earlier values
(the input or earlier layers' outputs), combined with add, mul, cat, relu or tanh, optionally with a
residual connection around the layer; the outputs nobody reads are summed. Cuts are drawn from the
traced graph's compute nodes (by fx node name, or by module path where that names the same node), so
they land inside residual paths and across long skips. For every draw: program(x) == model(x), every
node sits in exactly one stage, each cut's boundary is exactly the values live across it, and with
exact cuts one backward through the program gives plain backprop's gradients.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dnicompile import compile_decoupled

WIDTH = 6
BATCH = 5
COMPUTE_OPS = ("call_module", "call_function", "call_method")
BINARY = ("add", "mul", "cat")
UNARY = ("linear", "relu", "tanh")


class RandomDAG(nn.Module):
    """values[0] = x; values[k] = layers[k-1](combine(values[a], values[b])) (+ values[a] if residual)."""

    def __init__(self, ops: list[tuple[str, int, int, bool]], width: int = WIDTH):
        super().__init__()
        self.ops = ops
        self.layers = nn.ModuleList(nn.Linear(2 * width if kind == "cat" else width, width) for kind, *_ in ops)
        read = {a for _, a, _, _ in ops} | {b for kind, _, b, _ in ops if kind in BINARY}
        self.sinks = [k for k in range(1, len(ops) + 1) if k not in read]

    def forward(self, x):
        values = [x]  # each (B, width)
        for (kind, a, b, residual), layer in zip(self.ops, self.layers):
            u = values[a]
            if kind == "add":
                h = u + values[b]
            elif kind == "mul":
                h = u * values[b]
            elif kind == "cat":
                h = torch.cat([u, values[b]], dim=1)  # (B, 2 * width)
            elif kind == "relu":
                h = F.relu(u)
            elif kind == "tanh":
                h = u.tanh()  # a call_method node
            else:
                h = u
            h = layer(h)
            values.append(u + h if residual else h)
        out = values[self.sinks[0]]
        for k in self.sinks[1:]:
            out = out + values[k]
        return out


@st.composite
def dag_ops(draw) -> list[tuple[str, int, int, bool]]:
    ops = []
    for k in range(1, draw(st.integers(2, 7)) + 1):
        kind = draw(st.sampled_from(BINARY + UNARY))
        a = draw(st.integers(0, k - 1))
        b = draw(st.integers(0, k - 1)) if kind in BINARY else -1
        ops.append((kind, a, b, draw(st.booleans())))
    return ops


def compute_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op in COMPUTE_OPS]


def live_across(graph: fx.Graph, after: set[str]) -> list[set[str]]:
    """For each cut (after each node named in `after`, in program order): the values defined at or
    before it and used behind it; computed here from the reference graph, independently of dnicompile."""
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    cut_positions = sorted(pos[n] for n in nodes if n.name in after)
    return [
        {n.name for n in nodes if n.op != "output" and pos[n] <= p and any(pos[u] > p for u in n.users)}
        for p in cut_positions
    ]


@settings(max_examples=30, deadline=None)
@given(ops=dag_ops(), seed=st.integers(0, 2**16), data=st.data())
def test_random_dag_program_is_the_model(ops, seed, data, checks):
    torch.manual_seed(seed)
    model = RandomDAG(ops)
    x = torch.randn(BATCH, WIDTH)
    reference_graph = fx.symbolic_trace(model).graph
    nodes = compute_nodes(reference_graph)
    # any cut after a compute node but the last leaves every stage something to compute
    chosen = data.draw(st.lists(st.sampled_from(nodes[:-1]), min_size=1, max_size=4, unique=True), label="cuts")
    cuts = []
    for node in chosen:
        by_path = node.op == "call_module" and data.draw(st.booleans(), label=f"name {node.name} by module path")
        cuts.append({"after": node.target if by_path else node.name})
    reference = copy.deepcopy(model)

    program = compile_decoupled(model, {"cuts": cuts}, example_inputs=x)

    assert len(program.stages) == len(cuts) + 1
    expected = live_across(reference_graph, {n.name for n in chosen})
    assert [{b.name for b in cut.boundary} for cut in program.cuts] == expected
    checks.nodes_once(program, model)
    checks.params_shared(program, model)
    checks.forward_matches(program, model, (x,))
    weights = torch.randn(BATCH, WIDTH)
    checks.grads_match(reference, program, model, (x,), lambda out: (out * weights).sum())
