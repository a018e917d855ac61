"""Automatic cuts (`cuts: {auto: {stages: S, balance: ...}}`) against references computed here.

On random DAG models (tests/test_random_dags.py's): the candidates are exactly the compute nodes whose output
is the only value live across them (found from the reference graph, independently of dnicompile); the cuts
chosen make a program that is the model, forward and gradients; and no split of the candidates into the same
number of stages has a smaller largest stage (brute force over all of them, with FLOPs and parameter counts
computed here from torch's own shape propagation). An auto spec makes the same program as the cuts it prints,
pasted in.
"""

from __future__ import annotations

import copy
import itertools
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_random_dags import BATCH, BINARY, UNARY, WIDTH, RandomDAG, compute_nodes, dag_ops, live_across
from torch.fx.passes.shape_prop import ShapeProp

from dnicompile import compile_decoupled
from dnicompile.cli import main
from dnicompile.compile.auto import balance_chain, cuts_data, cuts_yaml, pinned_cuts, stage_costs
from dnicompile.errors import PartitionError, SpecError
from dnicompile.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def reference_candidates(graph: fx.Graph) -> list[fx.Node]:
    """Compute nodes (but the last) that are the only value live across a cut after them."""
    nodes = compute_nodes(graph)
    return [n for n in nodes[:-1] if live_across(graph, {n.name}) == [{n.name}]]


def reference_costs(model: nn.Module, x: torch.Tensor, balance: str) -> tuple[fx.Graph, dict[str, float]]:
    """The cost of each compute node: parameters of its module, or FLOPs (2 per multiply-add of a Linear,
    one per output element otherwise), from torch.fx's own ShapeProp."""
    gm = fx.symbolic_trace(model)
    ShapeProp(gm).propagate(x)
    costs = {}
    for n in compute_nodes(gm.graph):
        numel = n.meta["tensor_meta"].shape.numel()
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            params = sum(p.numel() for p in mod.parameters())
            costs[n.name] = params if balance == "params" else 2 * numel * mod.in_features
        else:
            costs[n.name] = 0 if balance == "params" else numel
    return gm.graph, costs


def split_costs(graph: fx.Graph, costs: dict[str, float], after: list[str]) -> list[float]:
    """The stage costs of cutting after the nodes `after` (program order decides the stages)."""
    order = [n.name for n in compute_nodes(graph)]
    bounds = sorted(order.index(a) + 1 for a in after)
    bounds = [0, *bounds, len(order)]
    return [sum(costs[n] for n in order[a:b]) for a, b in zip(bounds, bounds[1:])]


def nbytes(graph: fx.Graph, names: list[str]) -> int:
    """Bytes crossing cuts after `names` (each crossed by its node's float32 output alone)."""
    meta = {n.name: n.meta["tensor_meta"] for n in graph.nodes if "tensor_meta" in n.meta}
    return sum(meta[n].shape.numel() * 4 for n in names)


@st.composite
def chain_ops(draw) -> list[tuple[str, int, int, bool]]:
    """RandomDAG ops that go on from the value before, with short skips: graphs that have places to cut
    (dag_ops' long skips and summed outputs mostly leave none)."""
    ops = []
    for k in range(1, draw(st.integers(2, 8)) + 1):
        kind = draw(st.sampled_from(BINARY + UNARY))
        b = draw(st.integers(max(0, k - 3), k - 1)) if kind in BINARY else -1
        ops.append((kind, k - 1, b, draw(st.booleans())))
    return ops


@settings(max_examples=40, deadline=None)
@given(
    ops=st.one_of(chain_ops(), dag_ops()),
    seed=st.integers(0, 2**16),
    stages=st.integers(2, 4),
    balance=st.sampled_from(["flops", "params"]),
)
def test_auto_cuts_on_random_dags_are_valid_and_optimal(ops, seed, stages, balance, checks):
    torch.manual_seed(seed)
    model = RandomDAG(ops)
    x = torch.randn(BATCH, WIDTH)
    graph, costs = reference_costs(model, x, balance)
    candidates = [n.name for n in reference_candidates(graph)]
    reference = copy.deepcopy(model)
    spec = {"cuts": {"auto": {"stages": stages, "balance": balance}}}

    if len(candidates) < stages - 1:
        with pytest.raises(SpecError, match=f"at most {len(candidates) + 1} stages|no point"):
            compile_decoupled(model, spec, example_inputs=x)
        return
    program = compile_decoupled(model, spec, example_inputs=x)

    plan = program.cut_plan
    assert [c.node for c in plan.candidates] == candidates
    chosen = [cut.node for cut in program.cuts]
    assert len(program.stages) == stages
    assert [[b.name for b in cut.boundary] for cut in program.cuts] == [[n] for n in chosen]
    # the costs the balance used are the reference costs, piece by piece
    assert plan.stage_costs() == pytest.approx(split_costs(graph, costs, chosen))
    # optimal: no split of the candidates has a smaller largest stage; among those that reach it, none
    # carries fewer bytes across its cuts
    splits = [list(c) for c in itertools.combinations(candidates, stages - 1)]
    largest = {tuple(s): max(split_costs(graph, costs, s)) for s in splits}
    best = min(largest.values())
    assert max(split_costs(graph, costs, chosen)) == pytest.approx(best, rel=1e-9, abs=1e-9)
    fewest = min(nbytes(graph, list(s)) for s, v in largest.items() if v <= best * (1 + 1e-9) + 1e-9)
    assert nbytes(graph, chosen) == fewest
    # valid: the program is the model (all cuts exact: plain backprop's gradients)
    checks.nodes_once(program, model)
    checks.forward_matches(program, model, (x,))
    weights = torch.randn(BATCH, WIDTH)
    checks.grads_match(reference, program, model, (x,), lambda out: (out * weights).sum())
    # the names the cuts are written with (module paths where they name the node) cut at the same places
    pasted = compile_decoupled(copy.deepcopy(reference), {"cuts": cuts_data(program.spec)}, example_inputs=x)
    assert pasted.partition.stage_nodes == program.partition.stage_nodes


@settings(max_examples=200, deadline=None)
@given(
    costs=st.lists(st.integers(0, 20), min_size=1, max_size=9),
    weights=st.data(),
    parts=st.integers(1, 5),
)
def test_balance_chain_is_the_brute_force_optimum(costs, weights, parts):
    assume(parts <= len(costs))
    w = weights.draw(st.lists(st.integers(0, 3), min_size=len(costs) - 1, max_size=len(costs) - 1))
    chosen = balance_chain([float(c) for c in costs], parts, w)
    assert list(chosen) == sorted(set(chosen)) and len(chosen) == parts - 1
    assert all(0 <= i < len(costs) - 1 for i in chosen)
    every = list(itertools.combinations(range(len(costs) - 1), parts - 1))
    best = min(max(stage_costs(costs, s)) for s in every)
    assert max(stage_costs(costs, chosen)) == best
    fewest = min(sum(w[i] for i in s) for s in every if max(stage_costs(costs, s)) == best)
    assert sum(w[i] for i in chosen) == fewest


# ----------------------------------------------------------------------------- the examples


def _auto_spec(inputs: dict, stages: int, balance: str = "flops", kind: dict | None = None) -> dict:
    return {"inputs": inputs, "cuts": {"auto": {"stages": stages, "balance": balance, "kind": kind or {}}}}


def _same_program(a, b) -> None:
    assert a.spec.cuts == b.spec.cuts
    assert a.partition.stage_nodes == b.partition.stage_nodes
    assert [c.boundary for c in a.cuts] == [c.boundary for c in b.cuts]
    assert [(c.kind, c.synthetic_gradient) for c in a.cuts] == [(c.kind, c.synthetic_gradient) for c in b.cuts]


@pytest.mark.parametrize("example", ["wide_mlp", "resnet"])
def test_auto_spec_is_the_program_of_its_printed_cuts(example):
    """The cuts printed as YAML, pasted into the spec, compile to the same program, which trains alike."""
    import importlib

    module = importlib.import_module(example)
    if example == "wide_mlp":
        model, inputs, batch = module.build_model(depth=5, width=48), {"x": {"shape": [16, 784]}}, (16, 784)
    else:
        model, inputs, batch = module.build_model(widths=(4, 8, 8)), {"x": {"shape": [8, 1, 12, 12]}}, (8, 1, 12, 12)
    kind = {
        "synthetic_gradient": {"model": "linear", "condition_on_labels": True, "optimizer": {"name": "SGD", "lr": 0.1}}
    }
    twin = copy.deepcopy(model)
    auto = compile_decoupled(model, _auto_spec(inputs, 3, "flops", kind))
    printed = yaml.safe_load(cuts_yaml(auto.spec, auto.cut_plan))
    assert [c["after"] for c in printed["cuts"]] == [c.after for c in auto.spec.cuts]
    pasted = compile_decoupled(twin, {"inputs": inputs, "cuts": printed["cuts"]})
    _same_program(auto, pasted)
    x, y = torch.randn(*batch), torch.randint(0, 10, (batch[0],))
    for program in (auto, pasted):
        torch.manual_seed(0)
        program.build_runtime()
        for _ in range(2):
            program.train_step(x, y)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_nodes_prints_the_candidates_and_yaml_to_paste(tmp_path, capsys):
    spec = tmp_path / "auto.yaml"
    spec.write_text(
        "model: build_model\nmodel_args: {depth: 4, width: 32}\ninputs:\n  x: {shape: [8, 784]}\n"
        "cuts:\n  auto:\n    stages: 3\n    kind: {synthetic_gradient: {model: linear}}\n"
    )
    assert main([str(ROOT / "examples/wide_mlp.py"), "--spec", str(spec), "--nodes"]) == 0
    out = capsys.readouterr().out
    assert "candidate cut points" in out and "layers.1" in out
    pasted_text = out[out.index("cuts:\n") :].split("\n\n")[0]
    cuts = yaml.safe_load(pasted_text)["cuts"]
    assert [c["synthetic_gradient"] for c in cuts] == [{"model": "linear"}, {"model": "linear"}]
    # the pasted spec compiles to the same program, and --nodes on it marks the same cuts
    written = tmp_path / "written.yaml"
    written.write_text(spec.read_text().split("cuts:")[0] + pasted_text + "\n")
    module = __import__("wide_mlp")
    a = compile_decoupled(module.build_model(depth=4, width=32), load_spec(spec))
    b = compile_decoupled(module.build_model(depth=4, width=32), load_spec(written))
    _same_program(a, b)
    assert main([str(ROOT / "examples/wide_mlp.py"), "--spec", str(written), "--nodes"]) == 0
    out = capsys.readouterr().out
    assert "candidate cut points" in out and "# cuts chosen by" not in out


def test_workers_load_the_cuts_chosen_here():
    """`--workers` and the runs it starts load the spec again: the cuts chosen here go with them as a --set,
    so a worker never chooses again (with `balance: time` it could choose otherwise)."""
    from types import SimpleNamespace

    from dnicompile.train.launch import run_fields

    module = __import__("wide_mlp")
    spec_path = ROOT / "specs/wide_mlp_auto.yaml"
    small_numbers = ["cuts.auto.kind.synthetic_gradient.optimizer={name: Adam, lr: 1.0e-5, eps: 1.0e-8}"]
    program = compile_decoupled(module.build_model(depth=4, width=32), load_spec(spec_path, overrides=small_numbers))
    assert pinned_cuts(load_spec(spec_path)) == []
    args = SimpleNamespace(model="examples/wide_mlp.py", spec=str(spec_path), set=["train.steps=3"], argv=None)
    args.steps = args.batch_size = args.eval_every = args.seed = args.data = None
    overrides = run_fields(args, program.spec)["overrides"]
    assert overrides[0] == "train.steps=3" and overrides[1:] == pinned_cuts(program.spec)
    again = load_spec(spec_path, overrides=overrides)
    assert again.cuts == program.spec.cuts and again.train.steps == 3
    assert again.cuts[0].synthetic_gradient.optimizer.arguments() == {"lr": 1e-5, "eps": 1e-8}  # numbers, not text


def test_time_balance_measures_and_leaves_the_model_as_it_was():
    import resnet

    model = resnet.build_model(widths=(4, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = {"x": {"shape": [4, 1, 28, 28]}}
    torch.manual_seed(0)
    compile_decoupled(model, _auto_spec(inputs, 2, "flops"))  # compiling draws the example inputs
    rng = torch.random.get_rng_state()
    torch.manual_seed(0)
    program = compile_decoupled(model, _auto_spec(inputs, 2, "time"))
    plan = program.cut_plan
    assert len(plan.costs["time"]) == len(plan.candidates) + 1 and all(t > 0 for t in plan.costs["time"])
    assert max(plan.stage_costs()) == pytest.approx(
        min(max(stage_costs(plan.costs["time"], [i])) for i in range(len(plan.candidates)))
    )
    assert torch.equal(torch.random.get_rng_state(), rng)  # timing drew no random numbers (dropout)
    for k, v in model.state_dict().items():  # batch-norm statistics included
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- errors


def _run(tmp_path, text: str, capsys, *flags: str) -> tuple[int, str]:
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: build_model\nmodel_args: {depth: 2, width: 16}\ninputs:\n  x: {shape: [4, 784]}\n" + text)
    code = main([str(ROOT / "examples/wide_mlp.py"), "--spec", str(spec), *flags])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "cuts:\n  auto: {stages: 40}\n",
            ["spec.yaml:6:10", "`stages: 40` needs 39 cuts", "only 5 points where", "at most 6 stages"],
        ),
        (
            "cuts:\n  auto: {stages: 2, balanse: time}\n",
            ["spec.yaml:6:21", "cuts.auto.balanse", "did you mean 'balance'"],
        ),
        (
            "cuts:\n  auto: {stages: 2, balance: flop}\n",
            ["spec.yaml:6:21", "cuts.auto.balance", "'time', 'flops' or 'params'"],
        ),
        (
            "cuts:\n  auto:\n    stages: 2\n    kind: {synthetic_gradent: {}}\n",
            ["spec.yaml:8:12", "cuts.auto.kind.synthetic_gradent", "did you mean 'synthetic_gradient'"],
        ),
        ("cuts:\n  autoo: {stages: 2}\n", ["spec.yaml:6:3", "cuts.autoo", "did you mean 'auto'"]),
        ("cuts:\n  auto: {stages: 1}\n", ["spec.yaml:6:10", "cuts.auto.stages", "greater than or equal to 2"]),
    ],
)
def test_auto_spec_errors_are_located(tmp_path, capsys, text, expected):
    code, err = _run(tmp_path, text, capsys)
    assert code == 2, err
    for part in expected:
        assert part in err, err
    assert "Traceback" not in err


class MaskedBlocks(nn.Module):
    """Blocks that each read a mask made once from the input: a tensor no gradient flows through, read on
    both sides of every cut (as a causal mask is). The places to cut are still between the blocks."""

    def __init__(self, blocks: int = 3, width: int = WIDTH):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))

    def forward(self, x):
        keep = x > 0  # (B, width) bool
        h = x
        for layer in self.layers:
            h = h + torch.where(keep, layer(h), -h).tanh()
        return h


def test_tensors_without_gradient_may_cross_an_automatic_cut(checks):
    torch.manual_seed(0)
    model = MaskedBlocks()
    reference = copy.deepcopy(model)
    x = torch.randn(BATCH, WIDTH)
    program = compile_decoupled(model, {"cuts": {"auto": {"stages": 3}}}, example_inputs=x)
    plan = program.cut_plan
    # after each block but the last (the mask itself is no place: no gradient flows through it)
    assert [c.node for c in plan.candidates] == ["add", "add_1"]
    assert [c.node for c in program.cuts] == ["add", "add_1"]
    for cut in program.cuts:
        assert sorted(b.name for b in cut.boundary) == sorted(["gt", cut.node])
        assert cut.boundary[0].dtype == torch.bool or cut.boundary[1].dtype == torch.bool
    checks.forward_matches(program, model, (x,))
    checks.grads_match(reference, program, model, (x,), lambda out: out.square().sum())


class ScaledMLP(nn.Module):
    """A float computed from the batch size half way, used at the end: partition cannot carry it across a cut."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        h = self.a(x).relu()
        scale = h.shape[0] ** 0.5  # a Python float of the batch size
        h = self.b(h).relu()
        return self.c(h) / scale


class EarlyScaledMLP(ScaledMLP):
    def forward(self, x):
        scale = x.shape[0] ** 0.5  # made first: it would cross every point
        return self.c(self.b(self.a(x).relu()).relu()) / scale


def test_points_partition_refuses_are_no_candidates():
    x = torch.randn(BATCH, WIDTH)
    for after in ("b", "relu_1", "c"):  # the float would cross: refused when written by hand
        with pytest.raises(PartitionError, match="a float value crosses"):
            compile_decoupled(ScaledMLP(), {"cuts": [{"after": after}]}, example_inputs=x)
    program = compile_decoupled(ScaledMLP(), {"cuts": {"auto": {"stages": 3}}}, example_inputs=x)
    assert [c.node for c in program.cut_plan.candidates] == ["a", "relu"]
    with pytest.raises(SpecError, match="only 2 points where it can be cut automatically .* after `a`, `relu`"):
        compile_decoupled(ScaledMLP(), {"cuts": {"auto": {"stages": 4}}}, example_inputs=x)
    with pytest.raises(SpecError, match="no point where it can be cut automatically"):
        compile_decoupled(EarlyScaledMLP(), {"cuts": {"auto": {"stages": 2}}}, example_inputs=x)


def test_automatic_cuts_in_an_exported_gpt(checks):
    """examples/gpt.py goes through torch.export: the causal mask is a buffer, the token ids and targets cross
    every cut, the embedding is tied to the head. The cuts land between the blocks, evenly."""
    import gpt

    torch.manual_seed(0)
    model = gpt.build_model(vocab_size=11, block_size=8, n_layer=3, n_head=2, n_embd=8, dropout=0.0)
    inputs = {
        "idx": {"shape": [2, 8], "dtype": "int64", "high": 11},
        "targets": {"shape": [2, 8], "dtype": "int64", "high": 11},
    }
    spec = {"inputs": inputs, "cuts": {"auto": {"stages": 3}}, "loss": {"from_output": 1, "labels": "targets"}}
    program = compile_decoupled(model, spec)
    assert program.frontend == "export"
    assert [c.after for c in program.spec.cuts] == ["transformer.h.0", "transformer.h.1"]
    idx, targets = torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8))
    checks.forward_matches(program, model, (idx, targets))


DATA = ROOT.parent / "shared" / "data" / "fashion-mnist"


@pytest.mark.skipif(not (DATA / "train-images-idx3-ubyte.gz").is_file(), reason=f"Fashion-MNIST not found at {DATA}")
def test_time_balance_is_refused_under_torchrun(tmp_path, capsys, monkeypatch):
    """Under torchrun every process compiles for itself: timed cuts could differ between ranks."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, err = _run(
        tmp_path,
        "cuts:\n  auto: {stages: 2, balance: time}\ndata: fashion-mnist\n",
        capsys,
        "--train",
        "--data",
        str(DATA),
    )
    assert code == 2, err
    assert "spec.yaml:6:21" in err and "`balance: time` under torchrun" in err and "paste" in err
