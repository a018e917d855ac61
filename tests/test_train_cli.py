"""Training from the command line on real Fashion-MNIST, and the files it leaves."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from dnicompile.cli import main
from dnicompile.compile.model_file import load_module

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DNICOMPILE_FASHION_MNIST", ROOT.parent / "shared" / "data" / "fashion-mnist"))
needs_data = pytest.mark.skipif(
    not (DATA / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not found at {DATA}; set DNICOMPILE_FASHION_MNIST to its folder",
)


def _train(tmp_path, spec="specs/mlp_cdni.yaml", *flags):
    argv = [str(ROOT / "examples/mlp.py"), "--spec", str(ROOT / spec), "--train", "--data", str(DATA), *flags]
    return main(argv)


@needs_data
def test_short_cdni_run_learns_fashion_mnist(tmp_path, capsys):
    """A few hundred cDNI steps reach at least 75% test accuracy (backprop gets ~84% at 300 steps)."""
    torch.set_num_threads(2)
    out = tmp_path / "run"
    assert _train(tmp_path, "specs/mlp_cdni.yaml", "--steps", "300", "--eval-every", "150", "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 300
    assert summary["test_accuracy"] >= 0.75, summary
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "test_accuracy" in r]
    assert [r["step"] for r in evals] == [150, 300]
    assert all({"step", "loss", "test_accuracy"} <= r.keys() for r in evals)
    train_rows = [r for r in rows if "samples_per_s" in r]
    assert train_rows and all(r["samples_per_s"] > 0 for r in train_rows)
    # the synthesizers track the true gradient: positive cosine at every cut by the end
    assert set(train_rows[-1]["cosine"]) == {"layers.0", "layers.1", "layers.2", "layers.3"}
    assert all(c > 0.2 for c in train_rows[-1]["cosine"].values()), train_rows[-1]["cosine"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the final weights load into the original model class
    mlp = load_module(ROOT / "examples/mlp.py")
    model = mlp.build_model()
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert "test accuracy" in capsys.readouterr().out


@needs_data
def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tmp_path, "specs/mlp_backprop.yaml", "--steps", "3", "--out", str(out)) == 0
    before = (out / "model.pt").read_bytes()
    assert _train(tmp_path, "specs/mlp_backprop.yaml", "--steps", "3", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "model.pt").read_bytes() == before
    assert _train(tmp_path, "specs/mlp_backprop.yaml", "--steps", "3", "--out", str(out), "--overwrite") == 0


def test_missing_data_says_what_to_do(tmp_path, capsys):
    argv = [str(ROOT / "examples/mlp.py"), "--spec", str(ROOT / "specs/mlp_cdni.yaml"), "--train"]
    assert main([*argv, "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Fashion-MNIST not found" in err and "--data" in err and "dataset-fashion-mnist" in err
    assert "train-images-idx3-ubyte.gz" in err and "Traceback" not in err


def test_truncated_data_file_is_a_clear_error(tmp_path, capsys):
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (tmp_path / name).write_bytes(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + b"\x00" * 20)
    argv = [str(ROOT / "examples/mlp.py"), "--spec", str(ROOT / "specs/mlp_cdni.yaml"), "--train"]
    assert main([*argv, "--data", str(tmp_path)]) == 2
    assert "header says" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "tpu"], "expected cpu, cuda or cuda:N"),
        (["--steps", "0"], "expected a positive integer"),
        (["--batch-size", "x"], "expected a positive integer"),
    ],
)
def test_bad_training_flags(flags, message, capsys):
    argv = [str(ROOT / "examples/mlp.py"), "--spec", str(ROOT / "specs/mlp_cdni.yaml"), "--train", *flags]
    assert main([*argv, "--data", str(DATA)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(capsys):
    argv = [str(ROOT / "examples/mlp.py"), "--spec", str(ROOT / "specs/mlp_cdni.yaml"), "--train", "--device", "cuda"]
    assert main([*argv, "--data", str(DATA)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_data
def test_cdni_trains_on_cuda(tmp_path):
    out = tmp_path / "run"
    assert _train(tmp_path, "specs/mlp_cdni.yaml", "--steps", "300", "--device", "cuda", "--out", str(out)) == 0
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] >= 0.75


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@needs_data
def test_ctrl_c_stops_cleanly_and_keeps_what_was_written(tmp_path):
    import signal
    import subprocess
    import time

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "dnicompile",
        str(ROOT / "examples/mlp.py"),
        "--spec",
        str(ROOT / "specs/mlp_cdni.yaml"),
        "--train",
        "--data",
        str(DATA),
        "--steps",
        "100000",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stdout and "Traceback" not in stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line is whole JSON
    assert len(rows) >= 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and 0 < summary["steps_done"] < 100000
    model = load_module(ROOT / "examples/mlp.py").build_model()
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert not list(out.glob(".*.tmp"))  # no half-written files left behind


@needs_data
def test_a_non_finite_loss_stops_the_run_naming_the_step_and_stage(tmp_path, capsys):
    """The output layer (stage 4, no batch norm after it) at SGD lr 1e38 overflows within a few steps: exit 2 with
    the step and the first stage whose parameters are not finite, no traceback; the checkpoints written before it
    (every step) are kept, and none of the failed step."""
    text = (ROOT / "specs/mlp_backprop.yaml").read_text()
    text = text.replace(
        "  default: {optimizer: {name: Adam, lr: 1.0e-3}}",
        "  default: {optimizer: {name: Adam, lr: 1.0e-3}}\n  4: {optimizer: {name: SGD, lr: 1.0e38}}",
    )
    text = text.replace(
        "train: {steps: 1000, batch_size: 128, eval_every: 250}",
        "train: {steps: 1000, batch_size: 128, eval_every: 250, checkpoint_every: 1}",
    )
    assert "1.0e38" in text and "checkpoint_every: 1" in text
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    out = tmp_path / "run"
    argv = [str(ROOT / "examples/mlp.py"), "--spec", str(spec), "--train", "--data", str(DATA), "--steps", "50"]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the training loss is" in err, err
    assert re.search(r"stage\d's parameters are the first that are not finite", err) or "loss itself overflowed" in err
    assert "Traceback" not in err and "bug" not in err
    step = int(err.split(" at step ")[1].split(":")[0])
    assert 1 < step < 50
    saved = sorted(out.glob("ckpt-*"))
    assert saved and all(int(p.name.split("-")[1]) < step for p in saved), (saved, step)
    assert all((p / ".metadata").is_file() for p in saved)
