"""Parallel branches ([Note: stage DAG] in compile/partition.py): two towers cut after each one give stages that
form a DAG (tower A -> head, tower B -> head), not a chain. Against references: the program is the model; exact
cuts train like plain PyTorch; synthetic cuts like a loop written by hand."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dnicompile import compile_decoupled
from dnicompile.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _example():
    spec = importlib.util.spec_from_file_location("two_tower_example", ROOT / "examples" / "two_tower.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _spec(batch: int, top: dict | None = None, bottom: dict | None = None, lr: float = 1e-2) -> dict:
    return {
        "inputs": {"x": {"shape": [batch, 784]}},
        "cuts": [{"after": "top", **(top or {})}, {"after": "bottom", **(bottom or {})}],
        "stages": {"default": {"optimizer": {"name": "Adam", "lr": lr}}},
    }


def _batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_two_towers_form_a_dag_and_the_drawings_show_its_edges():
    from dnicompile.describe import summary_text
    from dnicompile.inspect import stages_dot

    torch.manual_seed(0)
    model = _example().TwoTower(hidden=16, depth=2)
    program = compile_decoupled(model, _spec(8))
    assert not program.chain
    assert sorted(program.stage_graph.edges) == [(0, 2), (1, 2)]  # no edge between the towers
    top, bottom = program.cuts
    # the cut after a tower owns what that tower sends; its point still has every value live across it
    assert [b.name for b in top.sent] == ["top_layers_3"] and [b.name for b in top.boundary] == ["x", "top_layers_3"]
    assert [b.name for b in bottom.sent] == ["bottom_layers_3"]
    # tower B reads the program input itself, and not tower A's output (no relay through it)
    assert [t.name for t in program.stages[1].inputs] == ["x"]
    assert [(b.name, src) for b, src in program.partition.stage_inputs[1]] == [("x", -1)]
    assert [(b.name, src) for b, src in program.partition.stage_inputs[2]] == [
        ("top_layers_3", 0),
        ("bottom_layers_3", 1),
    ]
    x, _ = _batch(8, 0)
    torch.testing.assert_close(program(x), model(x))
    dot = stages_dot(program)
    assert '"stage0" -> "stage2"' in dot and '"stage1" -> "stage2"' in dot and '"input" -> "stage1"' in dot
    assert '"stage0" -> "stage1"' not in dot
    table = summary_text(program, width=300)
    assert "from stage0" in table and "from input" in table and "-> stage2" in table


class Chain(nn.Module):
    """A residual skip over the cut: each stage reads the one before, so the skip is relayed, as before."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = self.a(x)
        return self.c(self.b(h) + h) + x


class Stem(nn.Module):
    """A stem read by two branches and by the head: the branches do not read each other, so the stem's output
    goes straight to each of the three."""

    def __init__(self):
        super().__init__()
        self.stem, self.left, self.right, self.head = (nn.Linear(6, 6) for _ in range(4))

    def forward(self, x):
        s = self.stem(x)
        return self.head(self.left(s) * self.right(s) + s)


def test_a_value_is_relayed_along_a_chain_and_sent_straight_across_branches():
    chain = compile_decoupled(Chain(), {"inputs": {"x": {"shape": [4, 6]}}, "cuts": [{"after": "a"}, {"after": "b"}]})
    assert chain.chain and sorted(chain.stage_graph.edges) == [(0, 1), (1, 2)]
    assert all(cut.sent == cut.boundary for cut in chain.cuts)  # a chain: the cuts as they always were
    assert [(b.name, src) for b, src in chain.partition.stage_inputs[2]] == [("x", 1), ("a", 1), ("b", 1)]
    cuts = [{"after": "stem"}, {"after": "left"}, {"after": "right"}]
    stem = compile_decoupled(Stem(), {"inputs": {"x": {"shape": [4, 6]}}, "cuts": cuts})
    assert not stem.chain and sorted(stem.stage_graph.edges) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert [(b.name, src) for b, src in stem.partition.stage_inputs[3]] == [("stem", 0), ("left", 1), ("right", 2)]
    for program, model in ((chain, Chain()), (stem, Stem())):
        model.load_state_dict(program.state_dict())
        x = torch.randn(4, 6)
        torch.testing.assert_close(program(x), model(x))


def test_exact_cuts_on_two_towers_train_like_plain_pytorch():
    torch.manual_seed(0)
    model = _example().TwoTower(hidden=24, depth=2)
    reference = copy.deepcopy(model)
    program = compile_decoupled(model, _spec(16))
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for step in range(4):
        x, y = _batch(16, step)
        result = program.train_step(x, y)
        opt.zero_grad()
        loss = F.cross_entropy(reference(x), y)
        loss.backward()
        opt.step()
        assert result.loss == pytest.approx(loss.item(), rel=1e-6)
    for (key, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, msg=key)
    assert not torch.equal(model.top.layers[0].weight, _example().TwoTower(hidden=24, depth=2).top.layers[0].weight)


def test_synthetic_cuts_on_two_towers_equal_a_loop_written_by_hand():
    """cDNI after each tower: each tower steps with its synthesizer's prediction, the head with the loss, and each
    synthesizer learns from the gradient the head sends back to its tower."""
    torch.manual_seed(0)
    model = _example().TwoTower(hidden=24, depth=2)
    reference = copy.deepcopy(model)
    cdni = {
        "synthetic_gradient": {
            "model": "linear",
            "condition_on_labels": True,
            "optimizer": {"name": "Adam", "lr": 1e-2},
        }
    }
    program = compile_decoupled(model, _spec(16, top=cdni, bottom=cdni))
    rt = program.runtime
    synths = [copy.deepcopy(iface.models.grad[cut.sent[0].name]) for iface, cut in zip(rt.interfaces, program.cuts)]
    towers, head = [reference.top, reference.bottom], reference.head
    tower_opts = [torch.optim.Adam(t.parameters(), lr=1e-2) for t in towers]
    head_opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    synth_opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in synths]
    for step in range(4):
        x, y = _batch(16, step)
        result = program.train_step(x, y)
        context = F.one_hot(y, 10).float()
        sent, preds = [], []
        for tower, opt, synth in zip(towers, tower_opts, synths):
            opt.zero_grad()
            h = tower(x)
            pred = synth(h.detach(), context)
            h.backward(pred.detach() / len(x))  # the synthetic gradient, scale 1, per sample
            opt.step()
            sent.append(h.detach().requires_grad_(True))
            preds.append(pred)
        head_opt.zero_grad()
        loss = F.cross_entropy(head(torch.cat(sent, dim=1)), y)
        loss.backward()
        head_opt.step()
        for opt, pred, leaf in zip(synth_opts, preds, sent):
            opt.zero_grad()
            F.mse_loss(pred, leaf.grad * len(x)).backward()
            opt.step()
        assert result.loss == pytest.approx(loss.item(), rel=1e-6)
    for (key, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, msg=key)
    for iface, cut, synth in zip(rt.interfaces, program.cuts, synths):
        for ours, theirs in zip(iface.models.grad[cut.sent[0].name].parameters(), synth.parameters()):
            torch.testing.assert_close(ours, theirs)


def test_a_delayed_cut_on_branches_is_refused_where_the_spec_says_it():
    model = _example().TwoTower(hidden=8, depth=1)
    spec = """
inputs:
  x: {shape: [4, 784]}
cuts:
  - after: top
    delayed_gradient: {delay: 1}
  - after: bottom
"""
    with pytest.raises(
        SpecError, match=r"<yaml>:6:\d+: delayed cut `top` .*do not form a chain \(stage0 -> stage2, stage1 -> stage2\)"
    ):
        compile_decoupled(model, spec)
