"""A hierarchical run checkpoints and resumes, on two workers ([Note: hierarchical checkpoints]) and in one
process, with the upper core's truncation segment open at the checkpoint ([Note: open upper segment]): every
resumed run ends with the parameters of the run that never stopped, to the bit.

The interface's synthetic gradient is scaled to 0, so that two workers train exactly the weights one process
does (test_recurrent.py's test_hierarchical_on_two_workers_equals_local_runtime): the reference is the run in
one process that never stopped. The upper core ticks at stream times 2, 5, 8, ... and learns every 3 ticks;
a step is 12 characters, so after steps 2, 4 and 5 its segment holds 2, 1 and 2 ticks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import signal_when
from test_recurrent import HIER_SPEC, _text, run_cli, write

from dnicompile.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parent.parent
SPEC = HIER_SPEC.replace("upper: {{core: upper,", "upper: {{core: upper, truncation: 3,").replace(
    "train: {{steps: 6, batch_size: 4, eval_every: 3}}",
    "train: {{steps: 10, batch_size: 4, eval_every: 5, checkpoint_every: 4}}",
)


def _assert_same_weights(a: Path, b: Path) -> None:
    x, y = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference (10 steps in one process), and a run stopped after 5 whose last 3 steps ran on two workers
    (ckpt-4 and ckpt-5): 2 steps in one process, then resumed on two workers (the segment open at each)."""
    tmp = tmp_path_factory.mktemp("hierarchical")
    text, vocab = _text(tmp)
    spec = write(tmp, "h.yaml", SPEC.format(vocab=vocab, scale=0.0))
    base = [ROOT / "examples/hierarchical.py", "--spec", spec, "--train", "--data", text]
    assert main_ok([*base, "--out", tmp / "reference"])
    assert main_ok([*base, "--steps", "2", "--out", tmp / "two"])
    assert main_ok([*base, "--workers", "2", "--steps", "5", "--resume", tmp / "two"])
    return tmp, base


def main_ok(args) -> bool:
    from dnicompile.cli import main

    return main([str(a) for a in args]) == 0


def test_a_two_worker_checkpoint_holds_the_open_segment_and_resumes_in_one_process(runs, capsys):
    tmp, base = runs
    assert sorted(p.name for p in (tmp / "two").glob("ckpt-*")) == ["ckpt-00000004", "ckpt-00000005"]
    ckpt = Checkpoint(tmp / "two" / "ckpt-00000005")
    assert ckpt.world == 2 and ckpt.placement == [(0, 0), (1, 1)]
    upper = ckpt.parts(["runtime"])["runtime"]["upper"]
    assert [t["time"] for t in upper["ticks"]] == [56, 59] and upper["start"] is not None
    assert upper["updates"] == 6  # ticks 2 .. 53, three a segment
    shutil.copytree(tmp / "two", tmp / "two_in_one")
    code, out, err = run_cli([*base, "--resume", tmp / "two_in_one"], capsys)
    assert code == 0, err
    assert "resuming from ckpt-00000005 (step 5)" in out
    _assert_same_weights(tmp / "reference", tmp / "two_in_one")


def test_two_workers_resume_from_the_checkpoint_before_a_damaged_one(runs, capsys):
    tmp, base = runs
    run = tmp / "damaged"
    shutil.copytree(tmp / "two", run)
    data = run / "ckpt-00000005" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])  # a disk that filled up
    code, out, err = run_cli([*base, "--workers", "2", "--resume", run], capsys)
    assert code == 0, err
    assert "damaged/ckpt-00000005: not a readable checkpoint" in out, out
    assert "resuming from ckpt-00000004 (step 4) instead" in out, out
    _assert_same_weights(tmp / "reference", run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["step"] for r in rows if "loss" in r]
    assert train == sorted(set(train)) and train[-1] == 10  # cut back to step 4, then the resumed run's lines
    assert rows[-2]["upper_updates"] == 13  # 40 ticks by step 10, three a segment: counted from the start
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-00000008", "ckpt-00000010"]


def test_a_one_process_run_resumes_with_the_upper_segment_open(runs, capsys):
    """(A one-process checkpoint resumed on two workers: the fixture's, checked by the tests that go on from it.)"""
    tmp, base = runs
    code, out, err = run_cli([*base, "--steps", "5", "--out", tmp / "one"], capsys)
    assert code == 0, err
    assert len(Checkpoint(tmp / "one" / "ckpt-00000005").parts(["runtime"])["runtime"]["upper"]["ticks"]) == 2
    code, out, err = run_cli([*base, "--resume", tmp / "one"], capsys)
    assert code == 0, err
    _assert_same_weights(tmp / "reference", tmp / "one")


def test_sigterm_stops_two_workers_at_a_checkpoint_that_resumes_exactly(runs, capsys):
    tmp, base = runs
    run, metrics = tmp / "stopped", tmp / "stopped" / "metrics.jsonl"
    cmd = [sys.executable, "-m", "dnicompile", *map(str, base), "--workers", "2", "--steps", "100000"]
    cmd += ["--eval-every", "1000000", "--log-every", "2", "--out", str(run)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    _, err = signal_when(proc, lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, what="training rows")
    assert proc.returncode == 143, err
    stopped = json.loads((run / "summary.json").read_text())["steps_done"]
    latest = (run / "LATEST").read_text().strip()
    assert latest == f"ckpt-{stopped:08d}"
    # model.pt holds the upper core as rank 1 trained it up to the stop, not as rank 0 last saw it (no evaluation)
    ckpt = Checkpoint(run / latest)
    weights = torch.load(run / "model.pt", weights_only=True)
    for key, value in ckpt.load([f"model.{k}" for k in weights]).items():
        torch.testing.assert_close(weights[key[len("model.") :]], value, rtol=0, atol=0)
    steps = ["--steps", str(stopped + 3)]
    code, out, err = run_cli([*base, *steps, "--resume", run], capsys)
    assert code == 0, err
    code, out, err = run_cli([*base, *steps, "--out", tmp / "reference_stopped"], capsys)
    assert code == 0, err
    _assert_same_weights(tmp / "reference_stopped", run)
