"""Tied weights across cuts (an embedding tied to the output head), with the torch.fx front end.

One tensor is read by the first and the last stage. The last stage owns it: its optimizer alone updates it,
with the sum of the gradients both stages computed for it, as backprop does.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dnicompile import compile_decoupled


class LM(nn.Module):
    def __init__(self, vocab: int = 50, width: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.body = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, tokens):
        return self.head(self.body(self.emb(tokens)))  # (B, T, vocab)


def _spec(sg=None, optimizer=None):
    return {
        "inputs": {"tokens": {"shape": [4, 5], "dtype": "int64", "high": 50}},
        "cuts": [{"after": "emb", "synthetic_gradient": sg}, {"after": "body"}],
        "stages": {"default": {"optimizer": optimizer or {"name": "Adam", "lr": 1e-2}}},
    }


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (4, 5), generator=g), torch.randint(0, 50, (4, 5), generator=g)


def test_tied_tensor_is_owned_by_its_last_stage_and_shown_in_the_table():
    torch.manual_seed(0)
    model = LM()
    program = compile_decoupled(model, _spec())
    (tied,) = program.partition.tied
    assert tied.names == ("emb.weight", "head.weight") and tied.stages == (0, 2) and tied.owner == 2
    w = model.emb.weight
    assert all(p is not w for p in program.stages[0].parameters())  # read by stage0, not updated by it
    assert any(p is w for p in program.stages[2].parameters())
    assert {id(p) for p in program.parameters()} == {id(p) for p in model.parameters()}
    text = " ".join(program.summary().split())
    assert "tied: emb.weight = head.weight [50, 16], used by stage0, stage2; updated by stage2" in text
    # the stages still read the very tensor, under the model's names
    assert program.stages[0].graph_module.get_submodule("emb").weight is w
    assert program.stages[2].graph_module.get_submodule("head").weight is w


def test_exact_cuts_with_tied_weights_train_like_plain_backprop(checks):
    torch.manual_seed(0)
    model = LM()
    reference = copy.deepcopy(model)
    program = compile_decoupled(model, _spec())
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2)

    def loss(m, x, y):
        return F.cross_entropy(m(x).reshape(-1, 50), y.reshape(-1))

    checks.trains_like_plain(program, model, reference, opt, [_batch(step) for step in range(4)], loss)


def test_synthetic_cut_owner_updates_once_with_both_gradients():
    """Across a synthetic cut the first stage's gradient for the tied tensor (from the synthetic gradient) is
    added to the last stage's before the owner's single update."""
    torch.manual_seed(0)
    model = LM()
    sg = {"model": "linear", "optimizer": {"name": "Adam", "lr": 1e-2}}
    program = compile_decoupled(model, _spec(sg=sg, optimizer={"name": "SGD", "lr": 0.5}))
    for step in range(5):  # let the zero-initialised synthesizer learn to send a gradient
        program.train_step(*_batch(step))
    w = model.emb.weight
    parts = []
    hook = w.register_hook(lambda g: parts.append(g.clone()))
    before = w.detach().clone()
    program.train_step(*_batch(99))
    hook.remove()
    assert len(parts) == 2, "one gradient from stage0 (synthetic), one from stage2 (the loss)"
    assert all(p.abs().sum() > 0 for p in parts)
    torch.testing.assert_close(w.grad, parts[0] + parts[1])
    torch.testing.assert_close(w.detach(), before - 0.5 * (parts[0] + parts[1]))


# ----------------------------------------------------------------------------- distributed: replicas stay equal

SHARED_LAYER = """
import torch
import torch.nn as nn


class Shared(nn.Module):
    \"\"\"One Linear used twice, early and late: cut in between, its weight is tied across ranks.\"\"\"

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(784, 32)
        self.shared = nn.Linear(32, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.shared(torch.relu(self.inp(x.flatten(1)))))
        h = torch.relu(self.mid(h))
        return self.head(torch.relu(self.shared(h)))


model = Shared()
"""

SHARED_SPEC = """
inputs:
  x: {shape: [64, 784]}
cuts:
  - after: relu_1
  - after: relu_2
stages:
  default: {optimizer: {name: SGD, lr: 0.05, momentum: 0.9}}
data: fashion-mnist
distributed: {placement: [[0], [1, 2]]}
"""


def test_tied_weights_on_two_workers_equal_the_local_runtime(tmp_path):
    """The tied Linear is replicated on rank 0 (stage0) and rank 1 (stage2); its gradients are summed over
    both, each rank steps its copy: training ends where the local runtime's does."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = Path(os.environ.get("DNICOMPILE_FASHION_MNIST", root.parent / "shared" / "data" / "fashion-mnist"))
    if not (data / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not found at {data}")
    (tmp_path / "model.py").write_text(SHARED_LAYER)
    (tmp_path / "spec.yaml").write_text(SHARED_SPEC)
    common = [sys.executable, "-m", "dnicompile", str(tmp_path / "model.py"), "--spec", str(tmp_path / "spec.yaml")]
    common += ["--train", "--steps", "8", "--batch-size", "64", "--seed", "3", "--data", str(data)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = {  # both at once: most of each run is starting Python and torch
        name: subprocess.Popen(
            [*common, *extra, "--out", str(tmp_path / name)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for name, extra in (("local", []), ("dist", ["--workers", "2"]))
    }
    runs = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err.decode()
        runs[name] = torch.load(tmp_path / name / "model.pt", weights_only=True)
    a, b = runs["local"], runs["dist"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
