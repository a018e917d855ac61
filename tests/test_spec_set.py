"""`--set KEY=VALUE`: spec values overridden from the command line, checked by the same models as the file, with
errors placed at the --set (issue 20, item 6)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dnicompile import SpecError, load_spec
from dnicompile.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "mlp_cdni.yaml"
DATA = Path(os.environ.get("DNICOMPILE_FASHION_MNIST", ROOT.parent / "shared" / "data" / "fashion-mnist"))


def test_overrides_replace_values_and_make_sections():
    base = load_spec(SPEC)
    spec = load_spec(
        SPEC,
        overrides=[
            "stages.default.optimizer.lr=1e-4",
            "cuts.0.synthetic_gradient.model=mlp",
            "distributed.queue_depth=0",  # a section the file does not have
            "train.steps=7",
        ],
    )
    assert spec.stages["default"].optimizer.lr == 1e-4 != base.stages["default"].optimizer.lr
    assert spec.cuts[0].synthetic_gradient.model == "mlp" and base.cuts[0].synthetic_gradient.model != "mlp"
    # the others stay, though the file's cuts share one `&cdni` mapping
    assert [c.synthetic_gradient.model for c in spec.cuts[1:]] == [c.synthetic_gradient.model for c in base.cuts[1:]]
    assert spec.distributed.queue_depth == 0 and spec.train.steps == 7
    # the places of the other keys are still the file's
    assert spec.where("cuts", 1, "after") == base.where("cuts", 1, "after")
    assert spec.where("train", "steps") == "--set train.steps=7"


@pytest.mark.parametrize(
    "setting, expected",
    [
        (
            "stages.default.optimiser.lr=1e-4",
            r"--set stages.default.optimiser.lr=1e-4: unknown key .*'optimizer'",
        ),
        ("stages.default.optimizer.lr=fast", r"--set stages.default.optimizer.lr=fast: `stages.default.optimizer.lr`"),
        ("cuts.9.after=layers.0", r"--set cuts.9.after=layers.0: `cuts` has no item 9 \(it has 4\)"),
        ("cuts.0.after.x=1", r"`cuts\[0\].after` is 'layers.0', not a mapping with `x`"),
        ("train.steps", r"--set train.steps: expected KEY=VALUE"),
        ("train..steps=3", r"has an empty part"),
        ("train.steps=[1", r"--set train.steps=\[1: the value is not YAML"),
        ("trian.steps=3", r"--set trian.steps=3: unknown key `trian` \(did you mean 'train'"),
    ],
)
def test_a_bad_override_names_the_set(setting, expected):
    with pytest.raises(SpecError, match=expected):
        load_spec(SPEC, overrides=[setting])


def test_the_command_line_reports_a_bad_set_with_exit_2(capsys):
    code = main([str(ROOT / "examples/mlp.py"), "--spec", str(SPEC), "--set", "cuts.0.synthetic_gradient.modle=mlp"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--set cuts.0.synthetic_gradient.modle=mlp: unknown key" in err and "did you mean 'model'" in err
    assert "Traceback" not in err


@pytest.mark.skipif(not DATA.exists(), reason="Fashion-MNIST not found")
def test_overrides_reach_every_worker(tmp_path):
    """Two workers rebuild the spec from its file: with --set stages.default.clock.offset=1000, no stage updates in
    3 steps, so the weights are the initial ones."""
    import subprocess
    import sys

    spec = ROOT / "specs" / "mlp_backprop.yaml"
    cmd = [sys.executable, "-m", "dnicompile", "examples/mlp.py", "--spec", str(spec), "--train", "--workers", "2"]
    cmd += ["--steps", "3", "--batch-size", "32", "--data", str(DATA), "--out", str(tmp_path / "run"), "--threads", "1"]
    cmd += ["--set", "stages.default.clock.offset=1000"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    trained = torch.load(tmp_path / "run/model.pt", weights_only=True)
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from mlp import build_model
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)  # the spec's train.seed, as the command line seeds before building the model
    initial = dict(build_model().named_parameters())  # (batch norm's running statistics move in any forward)
    for key, value in initial.items():
        torch.testing.assert_close(trained[key], value, rtol=0, atol=0, msg=key)
