"""Local-loss cuts (issue 16): an auxiliary head on the boundary tensors trains the stage before the cut on the
labels, and nothing is sent back. Compared with a hand computation, with the spec, and on Fashion-MNIST."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dnicompile import compile_decoupled
from dnicompile.cli import main
from dnicompile.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DNICOMPILE_FASHION_MNIST", ROOT.parent / "shared" / "data" / "fashion-mnist"))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(12, 16), nn.Tanh())
        self.b = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def _spec(head="linear", weight=1.0, kinds=("local",)):
    cuts = []
    for after, kind in zip(("a", "b"), kinds):
        cut = {"after": after}
        if kind == "local":
            cut["local_loss"] = {"head": head, "hidden": 8, "weight": weight, "optimizer": {"name": "SGD", "lr": 0.1}}
        elif kind == "synthetic":
            cut["synthetic_gradient"] = {"model": "linear", "condition_on_labels": True}
        cuts.append(cut)
    return {
        "inputs": {"x": {"shape": [8, 12]}},
        "cuts": cuts,
        "stages": {"default": {"optimizer": {"name": "SGD", "lr": 0.1}}},
        "loss": "cross_entropy",
    }


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_first_stage_steps_with_the_head_loss_gradient_alone(weight):
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    program = compile_decoupled(model, _spec(weight=weight))
    head = program.runtime.interfaces[0].head
    head_ref = copy.deepcopy(head)
    x, y = _batch()
    result = program.train_step(x, y)
    # by hand: stage a's gradient is weight * d CE(head(a(x)), y) / d a's weights; the rest of the net plays no part
    h = reference.a(x)
    loss = F.cross_entropy(head_ref(h), y)
    grads = torch.autograd.grad(weight * loss, list(reference.a.parameters()))
    for p, g in zip(model.a.parameters(), grads):
        torch.testing.assert_close(p.grad, g)
    # the head took one SGD step on its own loss (unweighted)
    head_grads = torch.autograd.grad(F.cross_entropy(head_ref(reference.a(x).detach()), y), list(head_ref.parameters()))
    for p, p0, g in zip(head.parameters(), head_ref.parameters(), head_grads):
        torch.testing.assert_close(p, p0 - 0.1 * g)
    assert result.synth_loss["a"] == pytest.approx(float(loss.detach()))
    assert 0.0 <= result.head_accuracy["a"] <= 1.0


def test_nothing_crosses_back_a_local_cut():
    """The stages after the cut get the true loss's gradient, the stage before it none of it: a changed loss
    downstream leaves stage a's gradient as it was, and the second stage does not compute a gradient for its input."""
    torch.manual_seed(0)
    program = compile_decoupled(Net(), _spec())
    x, y = _batch()
    program.train_step(x, y)
    first = [p.grad.clone() for p in program.model.a.parameters()]
    torch.manual_seed(0)
    other = compile_decoupled(Net(), _spec())
    with torch.no_grad():
        other.model.head.weight.mul_(3.0)  # a different downstream: the loss and its gradient change
    other.train_step(x, y)
    for g, p in zip(first, other.model.a.parameters()):
        torch.testing.assert_close(p.grad, g)
    assert program.model.b[0].weight.grad is not None and program.model.head.weight.grad is not None


def test_mixed_kinds_and_the_state_dict_of_a_head():
    torch.manual_seed(0)
    program = compile_decoupled(Net(), _spec(head="mlp", kinds=("local", "synthetic")))
    rt = program.runtime
    assert [i.kind for i in rt.interfaces] == ["local", "synthetic"]
    x, y = _batch()
    for _ in range(3):
        result = program.train_step(x, y)
    assert "a" in result.head_accuracy and "b" in result.cosine
    state = copy.deepcopy(rt.state_dict())
    torch.manual_seed(1)
    again = compile_decoupled(Net(), _spec(head="mlp", kinds=("local", "synthetic")))
    again.runtime.load_state_dict(state)
    for p, q in zip(rt.interfaces[0].head.parameters(), again.runtime.interfaces[0].head.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert set(program.state_dict()) == set(Net().state_dict())  # the heads are not part of the model's state
    assert "head" in state["interfaces"]["a"]  # they are in the runtime's (the checkpoint's)


def test_spec_errors_name_the_cut():
    bad = _spec()
    bad["cuts"][0]["synthetic_gradient"] = {"model": "linear"}
    with pytest.raises(SpecError, match="one kind"):
        compile_decoupled(Net(), bad)
    conv = _spec(head="conv")
    with pytest.raises(SpecError, match="conv head needs one"):
        compile_decoupled(Net(), conv).runtime  # noqa: B018 - building the runtime builds the heads


@pytest.mark.skipif(not (DATA / "train-images-idx3-ubyte.gz").is_file(), reason=f"Fashion-MNIST not found at {DATA}")
def test_local_loss_learns_fashion_mnist(tmp_path, capsys):
    """specs/mlp_local.yaml from the command line: a short run learns (chance is 10%)."""
    out = tmp_path / "run"
    argv = ["examples/mlp.py", "--spec", str(ROOT / "specs" / "mlp_local.yaml"), "--train", "--data", str(DATA)]
    argv += ["--steps", "150", "--eval-every", "150", "--out", str(out)]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert main(argv) == 0
    finally:
        os.chdir(cwd)
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.70, summary
