"""What the command line says is true (issue 20, item 7): --version, the advice when --train has no data, the files
a run reports writing, and output files that get the user's umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dnicompile.cli import main
from dnicompile.files import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0

    assert capsys.readouterr().out.strip() == f"dnicompile {version('dnicompile')}"


def test_train_without_data_points_to_fit(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text((ROOT / "specs/mlp_backprop.yaml").read_text().replace("data: fashion-mnist\n", ""))
    code = main([str(ROOT / "examples/mlp.py"), "--spec", str(spec), "--train", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "the spec has no `data:`" in err and "dnicompile.fit" in err


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, mask):
    before = os.umask(mask)
    try:
        write_text_atomic(tmp_path / "f.txt", "x")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o666 & ~mask


def test_the_last_line_names_where_the_metrics_went(tmp_path, capsys):
    data = Path(os.environ.get("DNICOMPILE_FASHION_MNIST", ROOT.parent / "shared" / "data" / "fashion-mnist"))
    if not data.exists():
        pytest.skip("Fashion-MNIST not found")
    argv = [str(ROOT / "examples/mlp.py"), "--spec", str(ROOT / "specs/mlp_backprop.yaml"), "--train", "--steps", "2"]
    argv += [
        "--batch-size",
        "16",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--metrics",
        str(tmp_path / "m.jsonl"),
    ]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines at spaces
    assert f"wrote model.pt, checkpoint.pt, curves.png, summary.json to {tmp_path / 'run'}" in out
    assert f"and the metrics to {tmp_path / 'm.jsonl'}" in out
    assert not (tmp_path / "run/metrics.jsonl").exists()


def test_plain_progress_lines_log_every_and_the_run_record(tmp_path, capsys):
    """Output that is not a terminal gets plain progress lines; --log-every sets the metrics grid; summary.json
    records the spec, seed, device, versions and the command line."""
    import json

    import torch

    data = Path(os.environ.get("DNICOMPILE_FASHION_MNIST", ROOT.parent / "shared" / "data" / "fashion-mnist"))
    if not data.exists():
        pytest.skip("Fashion-MNIST not found")
    argv = [str(ROOT / "examples/mlp.py"), "--spec", str(ROOT / "specs/mlp_cdni.yaml"), "--train", "--steps", "6"]
    argv += ["--batch-size", "16", "--data", str(data), "--out", str(tmp_path / "run"), "--log-every", "2"]
    argv += ["--seed", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if "/6:" in line] == [
        "step      2/6",
        "step      4/6",
        "step      6/6",
    ]
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "samples_per_s" in r] == [2, 4, 6]
    run = json.loads((tmp_path / "run/summary.json").read_text())["run"]
    assert run["seed"] == 3 and run["device"] == "cpu" and run["versions"]["torch"] == torch.__version__
    assert run["spec"]["cuts"][0]["after"] == "layers.0" and "--log-every" in run["command"]


def test_nodes_lists_the_module_paths_a_cut_can_name(capsys):
    """--nodes names, at each node, the module paths (leaf or not) whose last node it is: what `after:` takes."""
    assert main([str(ROOT / "examples/mlp.py"), "--spec", str(ROOT / "specs/mlp_cdni.yaml"), "--nodes"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│ layers_0_2 ")]
    assert rows and "layers.0, layers.0.2" in rows[0]
