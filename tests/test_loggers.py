"""Loggers ([Note: loggers]): metrics.csv and TensorBoard's event files hold what metrics.jsonl holds."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import dnicompile
from dnicompile import DNIError, compile_decoupled
from dnicompile.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DNICOMPILE_FASHION_MNIST", ROOT.parent / "shared" / "data" / "fashion-mnist"))
HAS_TB = importlib.util.find_spec("tensorboard") is not None
needs_tb = pytest.mark.skipif(not HAS_TB, reason='tensorboard is not installed (pip install -e ".[tb]")')

# a synthetic cut (cosine and synth_loss per cut: nested dicts) and an exact one (cosine None)
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


def _program():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    return compile_decoupled(model, SPEC)


def _batches(n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8 * n, 12, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 8 * n, 8)]


class Collect:
    """A logger of the user's own: keeps what it is given."""

    def __init__(self):
        self.got, self.closed = [], False

    def write(self, record, kind):
        self.got.append((kind, json.loads(json.dumps(record))))

    def close(self):
        self.closed = True


pytestmark = pytest.mark.usefixtures("one_thread")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _flat(record: dict) -> dict:
    """The columns a record should fill: one level of nesting, written out by hand (cosine/<cut>)."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{cut}": v for cut, v in value.items()})
        else:
            flat[key] = value
    return flat


def _assert_csv_equals_jsonl(csv_path: Path, records: list[dict]) -> None:
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    assert len(rows) == len(records)
    want_columns = {k for r in records for k in _flat(r)}
    assert len(header) == len(set(header)) and set(header) == want_columns
    for row, record in zip(rows, records):
        flat = _flat(record)
        for column in header:
            value, cell = flat.get(column), row[column]
            if value is None:
                assert cell == "", (column, record["step"])
            elif isinstance(value, list):  # one figure per rank (cpu_ms_per_step): a JSON list in the cell
                assert json.loads(cell) == value, (column, record["step"], cell, value)
            elif isinstance(value, float) and math.isnan(value):
                assert math.isnan(float(cell)), (column, record["step"])
            else:
                assert float(cell) == float(value), (column, record["step"], cell, value)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """20 steps, a log line every 5 and an evaluation every 10, to every logger."""
    out = tmp_path_factory.mktemp("loggers") / "run"
    mine = Collect()
    names = ["jsonl", "csv", "tensorboard"] if HAS_TB else ["jsonl", "csv"]
    batches = _batches()
    summary = dnicompile.fit(
        _program(), batches, batches[:2], steps=20, log_every=5, eval_every=10, out=out, loggers=[*names, mine]
    )
    return out, summary, mine


def test_csv_rows_are_the_jsonl_records(run):
    out, summary, _ = run
    records = _jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 10, 15, 20, 20]  # train, train + eval, ...
    assert records == json.loads(json.dumps(summary["rows"]))
    assert any("cosine" in r and r["cosine"] for r in records)  # nested values are there to flatten
    _assert_csv_equals_jsonl(out / "metrics.csv", records)


def test_a_logger_object_gets_every_record_with_its_kind(run):
    out, _, mine = run
    records = _jsonl(out / "metrics.jsonl")
    assert [r for _, r in mine.got] == records
    assert [k for k, _ in mine.got] == ["train" if "samples_per_s" in r else "eval" for r in records]
    assert mine.closed


@needs_tb
def test_tensorboard_holds_the_same_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    want: dict[str, list[tuple[int, float]]] = {}
    for r in _jsonl(out / "metrics.jsonl"):
        kind = "train" if "samples_per_s" in r else "eval"
        for key, value in _flat(r).items():
            if key != "step" and isinstance(value, (int, float)):
                want.setdefault(f"{kind}/{key}", []).append((r["step"], float(np.float32(value))))
    assert "train/cosine/1" in want and "eval/test_loss" in want
    assert sorted(events.Tags()["scalars"]) == sorted(want)
    for tag, points in want.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert len(got) == len(points), tag
        for (step, value), (s, v) in zip(points, got):
            assert s == step and (v == value or (math.isnan(v) and math.isnan(value))), (tag, step, v, value)


CRASH = """
import os, signal, sys
import torch, torch.nn as nn
import dnicompile
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
program = dnicompile.compile_decoupled(model, sys.argv[2])
def batches():
    g = torch.Generator().manual_seed(5)
    for i in range(1000):
        if i == 22:  # during step 23: after the evaluation at step 20 added its columns
            os.kill(os.getpid(), signal.SIGKILL)
        x = torch.randn(8, 12, generator=g)
        yield x, (x[:, 0] > 0).long()
test = [next(batches()) for _ in range(2)]
dnicompile.fit(program, batches(), test, steps=100, log_every=5, eval_every=10, out=sys.argv[1], loggers=["jsonl", "csv"])
"""


def test_a_crash_leaves_a_readable_csv(tmp_path):
    """A run killed (SIGKILL: no finally, no close) after the evaluations widened the header: the CSV reads back
    with every record the JSONL file has."""
    out = tmp_path / "run"
    (tmp_path / "spec.yaml").write_text(SPEC)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASH), str(out), str(tmp_path / "spec.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    records = _jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 10, 15, 20, 20]
    _assert_csv_equals_jsonl(out / "metrics.csv", records)
    assert not list(out.glob(".*.tmp"))


def test_a_resumed_run_cuts_its_logs_back_to_its_checkpoint(tmp_path):
    """Logged to step 12, resumed from step 8's checkpoint: steps 10 and 12 are in each log once, as resumed."""
    out = tmp_path / "run"
    batches = _batches()
    names = ["jsonl", "csv", "tensorboard"] if HAS_TB else ["jsonl", "csv"]
    options = dict(steps=12, log_every=2, checkpoint_every=4, out=out, loggers=names)
    dnicompile.fit(_program(), batches, **options)
    shutil.rmtree(out / "ckpt-00000012")  # as if it had stopped after step 8's checkpoint, having logged to 12
    assert [p.name for p in sorted(out.glob("ckpt-*"))] == ["ckpt-00000008"]
    first = _jsonl(out / "metrics.jsonl")
    dnicompile.fit(_program(), batches, **options, resume=True)
    records = _jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    assert records[:4] == first[:4] and records[4]["elapsed_s"] != first[4]["elapsed_s"]  # 10 and 12: resumed
    _assert_csv_equals_jsonl(out / "metrics.csv", records)
    if HAS_TB:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        got = [(e.step, e.value) for e in events.Scalars("train/elapsed_s")]
        assert got == [(r["step"], float(np.float32(r["elapsed_s"]))) for r in records]


def _cli(tmp_path, *flags) -> int:
    argv = [str(ROOT / "examples/mlp.py"), "--spec", str(ROOT / "specs/mlp_backprop.yaml"), "--train", *flags]
    return main([*argv, "--data", str(DATA)])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--logger", "jsonl,cvs"], "unknown logger 'cvs' (did you mean 'csv'?)"),
        (["--logger", ""], "unknown logger ''"),
        (["--logger", "csv"], "--logger csv: writes metrics.csv into --out DIR, or next to --metrics"),
        (["--logger", "jsonl,tensorboard"], "--logger tensorboard: writes tensorboard/ into --out DIR"),
    ],
)
def test_bad_logger_flags_exit_2(tmp_path, capsys, flags, message):
    assert _cli(tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_tensorboard_missing_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an environment without it finds
    assert _cli(tmp_path, "--logger", "tensorboard", "--out", str(tmp_path / "run"), "--steps", "1") == 2
    assert 'pip install -e ".[tb]"' in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(DNIError, match=r'pip install -e "\.\[tb\]"'):
        dnicompile.fit(_program(), _batches(), steps=1, out=tmp_path / "api", loggers=["tensorboard"])


def test_fit_refuses_loggers_it_cannot_write(tmp_path):
    with pytest.raises(DNIError, match="loggers=csv: writes metrics.csv into out=; give out="):
        dnicompile.fit(_program(), _batches(), steps=1, loggers=["csv"])
    with pytest.raises(DNIError, match="unknown logger"):
        dnicompile.fit(_program(), _batches(), steps=1, out=tmp_path, loggers=["wandb"])
    with pytest.raises(DNIError, match="object: not a logger"):
        dnicompile.fit(_program(), _batches(), steps=1, out=tmp_path, loggers=[object()])

    class NoKind:
        def write(self, record):
            raise AssertionError("called")

        def close(self):
            pass

    with pytest.raises(DNIError, match=r"NoKind.write\(record\): a logger's write is called with \(record, kind\)"):
        dnicompile.fit(_program(), _batches(), steps=1, out=tmp_path / "nokind", loggers=[NoKind()])


@pytest.mark.skipif(not (DATA / "train-images-idx3-ubyte.gz").is_file(), reason=f"Fashion-MNIST not found at {DATA}")
def test_the_command_line_writes_csv_next_to_metrics(tmp_path):
    """Without --out, csv goes next to --metrics; a jsonl left out of --logger is not written."""
    metrics = tmp_path / "m.jsonl"
    assert _cli(tmp_path, "--logger", "csv", "--metrics", str(metrics), "--steps", "4", "--log-every", "2") == 0
    assert not metrics.exists()
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2", "4", "4"]
    # a second run there is refused, as --metrics would be
    assert _cli(tmp_path, "--logger", "csv", "--metrics", str(metrics), "--steps", "4") == 2
