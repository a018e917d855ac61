"""The distributed runtime (2 gloo workers on this host) against the local runtime and on failures."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dnicompile.cli import main
from dnicompile.runtime.placement import _balanced

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DNICOMPILE_FASHION_MNIST", ROOT.parent / "shared" / "data" / "fashion-mnist"))
pytestmark = pytest.mark.skipif(
    not (DATA / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not found at {DATA}; set DNICOMPILE_FASHION_MNIST to its folder",
)


def _cli(*argv: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point, so worker processes and exit codes are what a user sees."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    cmd = [sys.executable, "-m", "dnicompile", *argv, "--data", str(DATA)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _small_spec(tmp_path: Path, base: str, extra: str = "") -> Path:
    text = (ROOT / base).read_text().replace("shape: [128, 784]", "shape: [64, 784]") + extra
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


SGD = "{optimizer: {name: SGD, lr: 0.05, momentum: 0.9}}"


def test_exact_cuts_on_two_workers_equal_the_local_runtime(tmp_path):
    """Only exact cuts: pipeline-parallel training ends with the local runtime's parameters.

    SGD, because Adam turns the float noise of different thread counts on near-zero gradients (the
    biases before batch norm) into full-size steps, which would hide real differences."""
    spec = _small_spec(tmp_path, "specs/mlp_backprop.yaml")
    spec.write_text(spec.read_text().replace("{optimizer: {name: Adam, lr: 1.0e-3}}", SGD))
    common = ["examples/mlp.py", "--spec", str(spec), "--train", "--steps", "12", "--batch-size", "64", "--seed", "3"]
    local = _cli(*common, "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    two = _cli(*common, "--workers", "2", "--out", str(tmp_path / "dist"), "--logger", "jsonl,csv")
    assert two.returncode == 0, two.stderr
    a, b = _state(tmp_path / "local/model.pt"), _state(tmp_path / "dist/model.pt")
    assert a.keys() == b.keys()
    for key in a:  # weights, biases and batch-norm statistics
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # the loggers on several workers ([Note: loggers]): the driver's metrics.csv holds what metrics.jsonl holds
    from test_loggers import _assert_csv_equals_jsonl

    records = [json.loads(line) for line in (tmp_path / "dist/metrics.jsonl").read_text().splitlines()]
    assert len(records) >= 2 and any("test_accuracy" in r for r in records)
    _assert_csv_equals_jsonl(tmp_path / "dist/metrics.csv", records)


def test_synthetic_cuts_on_two_workers_with_no_queue_equal_the_local_runtime(tmp_path):
    """cDNI with `queue_depth: 0`: every rank waits for the true gradient of its batch, so each synthesizer
    learns in the same order as in one process, and the run ends with exactly the local runtime's parameters
    (the local run on one thread, as each worker is, so that the float sums are the same). The synthesizers are
    MLPs, whose first layers are random: they start from the same seed in both runtimes ([Note: seeds])."""
    spec = _small_spec(tmp_path, "specs/mlp_cdni.yaml", "distributed: {queue_depth: 0}\n")
    text = spec.read_text().replace(
        "{model: linear, condition_on_labels: true,", "{model: mlp, hidden: 64, condition_on_labels: true,"
    )
    assert "model: mlp" in text
    spec.write_text(text)
    common = ["examples/mlp.py", "--spec", str(spec), "--train", "--steps", "30", "--batch-size", "64", "--seed", "5"]
    local = _cli(*common, "--out", str(tmp_path / "local"), env={"OMP_NUM_THREADS": "1"})
    assert local.returncode == 0, local.stderr
    two = _cli(*common, "--workers", "2", "--out", str(tmp_path / "dist"))
    assert two.returncode == 0, two.stderr
    a, b = _state(tmp_path / "local/model.pt"), _state(tmp_path / "dist/model.pt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    # not a vacuous equality: the first stage, trained by its synthetic gradient alone, moved
    module_spec = importlib.util.spec_from_file_location("mlp_example", ROOT / "examples/mlp.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    torch.manual_seed(5)
    initial = module.build_model().state_dict()["layers.0.0.weight"]
    assert (initial - a["layers.0.0.weight"]).abs().max() > 1e-3


def test_cdni_on_two_workers_learns(tmp_path):
    spec = _small_spec(tmp_path, "specs/mlp_cdni.yaml")
    out = tmp_path / "run"
    r = _cli(
        "examples/mlp.py",
        "--spec",
        str(spec),
        "--train",
        "--steps",
        "200",
        "--batch-size",
        "64",
        "--eval-every",
        "200",
        "--workers",
        "2",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.6  # chance is 0.1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if "samples_per_s" in row]
    assert all(row["samples_per_s"] > 0 for row in train_rows)
    # the synthesizer across the rank boundary learned from gradients that arrived later
    assert any(row["staleness"] > 0 for row in train_rows)
    assert set(train_rows[-1]["cosine"]) == {"layers.0", "layers.1", "layers.2", "layers.3"}


FAILING_MODEL = '''
import torch.nn as nn


class Fragile(nn.Module):
    """Raises on its 6th call (the first call is shape propagation while compiling)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 5:
            raise RuntimeError("injected failure in Fragile.forward")
        return self.fc(x)


def build_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), Fragile(), nn.Linear(32, 10))
'''


def test_a_failing_worker_stops_the_whole_run_with_its_error(tmp_path):
    (tmp_path / "fragile.py").write_text(FAILING_MODEL)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "inputs: {input: {shape: [32, 1, 28, 28]}}\n"
        "trace: {leaf_modules: [Fragile]}\n"
        "cuts:\n  - after: '2'\n    synthetic_gradient: {model: linear}\n"
        "data: fashion-mnist\n"
        "distributed: {timeout_s: 20}\n"
    )
    start = time.monotonic()
    r = _cli(
        str(tmp_path / "fragile.py"),
        "--spec",
        str(spec),
        "--train",
        "--steps",
        "50",
        "--batch-size",
        "32",
        "--workers",
        "2",
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert r.returncode == 1
    assert "rank 1 (stage1) failed" in r.stderr and "injected failure in Fragile.forward" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert elapsed < 60


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_launcher_stops_every_worker(tmp_path, sig, code):
    """`kill PID` (or Ctrl-C sent to the launcher alone) stops the workers too, after a step they agree on: each
    writes its shard of that step's checkpoint and the driver the run's outputs; none is left behind."""
    spec = _small_spec(tmp_path, "specs/mlp_cdni.yaml")
    metrics = tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "dnicompile", "examples/mlp.py", "--spec", str(spec), "--train", "--workers", "2"]
    cmd += ["--steps", "100000", "--batch-size", "64", "--eval-every", "1000000", "--data", str(DATA)]
    cmd += ["--metrics", str(metrics), "--out", str(tmp_path / "run")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # SIGINT must reach it with its default meaning even where the test runner's shell ignores it
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("samples_per_s") >= 2):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no training rows within 120 s"
            time.sleep(0.2)
        children = _children(proc.pid)
        assert len(children) >= 2, children  # the two workers (and the spawn helper)
        stopped = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert time.monotonic() - stopped < 30
    assert "the workers stop after an agreed step" in err and "Traceback" not in err, err
    time.sleep(1)
    assert [pid for pid in children if _alive(pid)] == []
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["interrupted"] and summary["stopped_by"] == "SIGTERM"  # the launcher's one SIGTERM each
    latest = (tmp_path / "run/LATEST").read_text().strip()
    assert latest == f"ckpt-{summary['steps_done']:08d}"
    # [Note: dcp checkpoints]: each rank's data file, one metadata
    assert sorted(p.name for p in (tmp_path / "run" / latest).iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # fields after "(comm)": state, ppid, ...
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


DELAYED = (
    "  - after: layers.1\n    delayed_gradient: {delay: 1}\n",
    "distributed: {checkpoint_every: 5, placement: [[0, 1], [2, 3, 4]]}\n",
)


@pytest.mark.parametrize("kind", ["exact", "delayed"])
def test_resume_continues_from_the_last_checkpoint(tmp_path, kind):
    """Resumed at step 5 (the checkpoint of step 7 lost), on to step 10: the weights of 10 straight steps; with a
    delayed cut between the ranks, its queue (a batch owed a gradient) is in the checkpoint."""
    spec = _small_spec(tmp_path, "specs/mlp_backprop.yaml", "distributed: {checkpoint_every: 5}\n")
    if kind == "delayed":
        text = spec.read_text().replace("  - after: layers.1\n", DELAYED[0])
        spec.write_text(text.replace("distributed: {checkpoint_every: 5}\n", DELAYED[1]))
    spec.write_text(spec.read_text().replace("{optimizer: {name: Adam, lr: 1.0e-3}}", SGD))
    common = ["examples/mlp.py", "--spec", str(spec), "--train", "--batch-size", "64", "--workers", "2"]
    first = _cli(*common, "--steps", "7", "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    # every 5 steps and at the end, as in one process
    assert (tmp_path / "a/LATEST").read_text().strip() == "ckpt-00000007"
    assert sorted(p.name for p in (tmp_path / "a").glob("ckpt-*")) == ["ckpt-00000005", "ckpt-00000007"]
    shutil.rmtree(tmp_path / "a/ckpt-00000007")  # as if the run had died at step 7
    # continue to step 10 from the checkpoint at step 5, and compare with a run that never stopped
    resumed = _cli(*common, "--steps", "10", "--out", str(tmp_path / "a"), "--resume", str(tmp_path / "a"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 5" in resumed.stdout
    straight = _cli(*common, "--steps", "10", "--out", str(tmp_path / "b"))
    assert straight.returncode == 0, straight.stderr
    a, b = _state(tmp_path / "a/model.pt"), _state(tmp_path / "b/model.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    spec = _small_spec(tmp_path, "specs/mlp_backprop.yaml")
    argv = ["examples/mlp.py", "--spec", str(spec), "--train", "--workers", "2", "--resume", str(tmp_path)]
    r = _cli(*argv)
    assert r.returncode == 2 and "no checkpoint there" in r.stderr and "Traceback" not in r.stderr


def test_more_workers_than_stages_is_a_clear_error(capsys):
    argv = [str(ROOT / "examples/mlp.py"), "--spec", str(ROOT / "specs/mlp_cdni.yaml"), "--train"]
    assert main([*argv, "--workers", "9", "--data", str(DATA)]) == 2
    assert "only 5 stages" in capsys.readouterr().err


def test_balanced_placement_minimises_the_largest_group():
    assert _balanced([1, 1, 1, 1], 2) == [(0, 1), (2, 3)]
    assert _balanced([10, 1, 1, 1, 1], 2) == [(0, 0), (1, 4)]
    assert _balanced([1, 2, 3, 4, 5], 3) == [(0, 2), (3, 3), (4, 4)]
