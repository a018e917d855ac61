"""`data: {loader: file.py:function}`: the command line trains on a function's (train, eval) batches through the
task of `dnicompile.fit` (DataTask, [Note: batches]); it must end with fit's parameters, and resume as fit does.
The bad inputs (not allowed, missing, raising, wrong results, batches that do not fit) are rows of
tests/test_bad_inputs.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import dnicompile
from dnicompile.cli import main
from dnicompile.compile.model_file import build_model
from dnicompile.spec import load_spec

MODEL = """\
import torch.nn as nn


def build_model():
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
"""

# 40 samples in batches of 8, shuffled each epoch from torch's generator: 5 steps an epoch
LOADER = """\
import torch
from torch.utils.data import DataLoader, TensorDataset


def make_loaders(batch_size, scale=1.0):
    g = torch.Generator().manual_seed(5)
    x = scale * torch.randn(56, 12, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    train, test = TensorDataset(x[:40], y[:40]), TensorDataset(x[40:], y[40:])
    return DataLoader(train, batch_size, shuffle=True), DataLoader(test, 16)
"""

SPEC = """\
model: build_model
inputs: {input: {shape: [8, 12]}}
cuts:
  - after: '1'
    delayed_gradient: {delay: 1, weights: stash}
  - after: '3'
    synthetic_gradient: {model: linear, condition_on_labels: true, optimizer: {name: Adam, lr: 1.0e-3}}
stages:
  default: {optimizer: {name: Adam, lr: 1.0e-2}}
data:
  loader: ../code/data.py:make_loaders
  loader_args: {scale: 2.0}
train: {batch_size: 8, eval_every: 4}
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run_files(tmp_path, monkeypatch):
    """model.py and data.py in tmp/code, the spec in tmp/specs (the loader's path is relative to it), and the
    working folder elsewhere, so that only the spec's folder can resolve the path."""
    (tmp_path / "code").mkdir()
    (tmp_path / "specs").mkdir()
    (tmp_path / "cwd").mkdir()
    (tmp_path / "code/model.py").write_text(MODEL)
    (tmp_path / "code/data.py").write_text(LOADER)
    (tmp_path / "specs/spec.yaml").write_text(SPEC)
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


def _cli(tmp: Path, *flags: str) -> int:
    base = [str(tmp / "code/model.py"), "--spec", str(tmp / "specs/spec.yaml"), "--allow-imports", "--train"]
    return main([*base, "--seed", "3", *flags])


def _weights(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)


def _train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "samples_per_s" in r or "test_loss" in r]


def test_the_command_line_trains_on_a_loader_as_fit_does(run_files, capsys):
    """12 steps (two epochs and a bit, evaluated every 4) from the command line: the parameters and every loss of
    dnicompile.fit on the same function's data, with the same seed, to the bit."""
    tmp = run_files
    assert _cli(tmp, "--steps", "12", "--log-every", "2", "--out", str(tmp / "cli")) == 0
    out = capsys.readouterr().out
    assert "12 steps on ../code/data.py:make_loaders (5 train batches / 1 eval batches)" in out

    torch.manual_seed(3)  # as the command line does before building the model
    model = build_model(tmp / "code/model.py", "build_model")
    program = dnicompile.compile_decoupled(model, load_spec(tmp / "specs/spec.yaml", allow_imports=True))
    module_spec = importlib.util.spec_from_file_location("loader_under_test", tmp / "code/data.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    train, evaluation = module.make_loaders(8, scale=2.0)
    summary = dnicompile.fit(program, train, evaluation, steps=12, eval_every=4, log_every=2, seed=3)

    got = _weights(tmp / "cli")
    for key, want in program.state_dict().items():
        torch.testing.assert_close(got[key], want, rtol=0, atol=0, msg=key)
    cli_rows = _train_rows(tmp / "cli")
    fit_rows = [r for r in summary["rows"] if "samples_per_s" in r or "test_loss" in r]
    assert [(r["step"], r["loss"], r.get("test_loss")) for r in cli_rows] == [
        (r["step"], r["loss"], r.get("test_loss")) for r in fit_rows
    ]
    assert [r["step"] for r in cli_rows if "test_loss" in r] == [4, 8, 12]
    assert json.loads((tmp / "cli/summary.json").read_text())["test_loss"] == summary["test_loss"]


def test_a_resumed_loader_run_ends_as_one_that_never_stopped(run_files, capsys):
    """Stopped after step 7 (in the second epoch's shuffled order), resumed to 12: the weights of 12 in one go."""
    tmp = run_files
    assert _cli(tmp, "--steps", "12", "--out", str(tmp / "straight"), "--log-every", "1") == 0
    assert _cli(tmp, "--steps", "7", "--out", str(tmp / "stopped"), "--log-every", "1") == 0
    assert _cli(tmp, "--steps", "12", "--resume", str(tmp / "stopped"), "--log-every", "1") == 0
    assert "resumed from step 7" in capsys.readouterr().out
    want, got = _weights(tmp / "straight"), _weights(tmp / "stopped")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    lines = {
        run: [(r["step"], r["loss"]) for r in _train_rows(tmp / run) if "samples_per_s" in r]
        for run in ("stopped", "straight")
    }
    assert lines["stopped"] == lines["straight"]  # cut back to step 7, then the same steps and losses
