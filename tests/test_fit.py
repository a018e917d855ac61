"""`dnicompile.fit` on a user's own data: the one training loop with batches from any iterable ([Note: batches])."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dnicompile
from dnicompile import DNIError, compile_decoupled
from dnicompile.errors import DataError

SPEC = """
inputs: {input: {shape: [8, 12]}}
cuts:
  - after: '1'
    synthetic_gradient: {model: linear, condition_on_labels: true, optimizer: {name: Adam, lr: 1.0e-3}}
  - after: '3'
stages:
  default: {optimizer: {name: Adam, lr: 1.0e-2}}
loss: cross_entropy
"""


def _program(spec: str = SPEC):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    return compile_decoupled(model, spec)


def _dataset(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_fit_with_a_dataloader_equals_train_step_by_hand():
    """Two epochs of a shuffling DataLoader (its order drawn from torch's generator): the parameters of fit are those
    of train_step called on the same batches, after the same seed and the same runtime."""
    data = _dataset()
    program = _program()
    summary = dnicompile.fit(program, DataLoader(data, batch_size=8, shuffle=True), epochs=2, seed=3)
    assert summary["steps_done"] == 10

    by_hand = _program()
    torch.manual_seed(3)
    by_hand.build_runtime()
    for _ in range(2):
        for x, y in DataLoader(data, batch_size=8, shuffle=True):  # draws its order where fit's loader does
            by_hand.train_step(x, y)
    got, want = program.state_dict(), by_hand.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(got["0.weight"], _program().state_dict()["0.weight"])  # it trained


def test_dict_batches_eval_data_and_metrics(tmp_path):
    data = _dataset()
    batches = [{"input": data.tensors[0][i : i + 8], "labels": data.tensors[1][i : i + 8]} for i in range(0, 40, 8)]
    program = _program()
    summary = dnicompile.fit(program, batches, batches[:2], steps=30, eval_every=10, out=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "test_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    # the evaluation is the program's own loss and accuracy on the held-out batches
    program.eval()
    with torch.no_grad():
        out = [program(b["input"]) for b in batches[:2]]
    loss = sum(float(nn.functional.cross_entropy(o, b["labels"])) * 8 for o, b in zip(out, batches)) / 16
    acc = sum(int((o.argmax(-1) == b["labels"]).sum()) for o, b in zip(out, batches)) / 16
    assert evals[-1]["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert summary["test_accuracy"] == pytest.approx(acc)
    assert evals[-1]["test_loss"] < evals[0]["test_loss"]  # it learns
    assert all("train_accuracy" in r and "cosine" in r for r in rows if "samples_per_s" in r)
    for name in ("model.pt", "summary.json", "curves.png", "ckpt-00000030/.metadata", "LATEST"):
        assert (tmp_path / "run" / name).exists(), name


def test_a_resumed_fit_ends_as_one_that_never_stopped(tmp_path):
    """Stopped after step 6 (the checkpoint of step 7 lost), resumed to step 13: the same parameters as 13 steps
    in one go. The shuffled order of the epoch under way is drawn again from the random state at its start."""
    loader = DataLoader(_dataset(), batch_size=8, shuffle=True)
    first = _program()
    dnicompile.fit(first, loader, steps=7, checkpoint_every=3, keep_checkpoints=5, out=tmp_path / "a")
    shutil.rmtree(tmp_path / "a/ckpt-00000007")
    resumed = _program()
    summary = dnicompile.fit(resumed, loader, steps=13, checkpoint_every=3, out=tmp_path / "a", resume=True)
    assert summary["steps_done"] == 13
    straight = _program()
    dnicompile.fit(straight, loader, steps=13, out=tmp_path / "b")
    for key, want in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], want, rtol=0, atol=0, msg=key)
    steps = [json.loads(line)["step"] for line in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 13  # cut back to step 6, then on


@pytest.mark.parametrize(
    "batch, expected",
    [
        ((torch.zeros(8, 12),), r"a batch is tuple\(Tensor\[8, 12\] float32\), but the program takes 1 input\(s\) "),
        ([torch.zeros(8, 12), torch.zeros(8).long(), torch.zeros(8)], r"list\(Tensor\[8, 12\] float32, Tensor\[8\]"),
        ({"inputs": torch.zeros(8, 12), "y": torch.zeros(8).long()}, r"without \['input'\]: a dict batch names"),
        ((torch.zeros(8, 3, 4), torch.zeros(8).long()), r"input `input`: the model was traced with \(8, 12\).*reshape"),
        ("not a batch", r"a batch is str, but the program takes"),
    ],
)
def test_a_batch_that_does_not_fit_shows_its_structure(batch, expected):
    with pytest.raises(DataError, match=expected):
        dnicompile.fit(_program(), [batch], steps=1)


def test_fit_argument_errors(tmp_path):
    program = _program()
    with pytest.raises(DNIError, match="either steps= or epochs="):
        dnicompile.fit(program, [], steps=1, epochs=1)
    with pytest.raises(DNIError, match="epochs= needs data with a length"):
        dnicompile.fit(program, iter([]), epochs=1)
    with pytest.raises(DataError, match="gave no batch"):
        dnicompile.fit(program, [], steps=1)
    data = _dataset()
    batches = [(data.tensors[0][:8], data.tensors[1][:8])]
    dnicompile.fit(program, batches, steps=2, out=tmp_path / "run")
    with pytest.raises(DNIError, match="already holds a run"):
        dnicompile.fit(program, batches, steps=2, out=tmp_path / "run")
    shutil.rmtree(tmp_path / "run")


def test_the_own_data_example_runs(tmp_path, monkeypatch, capsys):
    """README's "Train on your own data": the example writes its CSV, trains one epoch and scores the held-out part."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["own_data.py", "--out", str(tmp_path / "run"), "--epochs", "2"])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "own_data.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "delayed true gradient" in out and "test accuracy" in out
    accuracy = float(out.strip().splitlines()[-1].split()[2])
    assert accuracy > 0.55  # three classes; the largest holds about 40%
    assert (tmp_path / "run/data.csv").exists() and (tmp_path / "run/summary.json").exists()
