"""A text run in one process stopped at a checkpoint and resumed ends like the run that never stopped: the
recurrent runtime's checkpoint carries the stream (the core's state between chunks, the prediction waiting for
its target, the lower clock's segment count) as well as the task's position in the text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dnicompile.cli import main

ROOT = Path(__file__).resolve().parents[1]
TEXT = Path(os.environ.get("DNICOMPILE_TEXT", ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"))


@pytest.mark.skipif(not TEXT.is_file(), reason=f"tiny Shakespeare not found at {TEXT}")
def test_a_resumed_text_run_ends_like_one_that_never_stopped(tmp_path, capsys):
    spec = ROOT / "specs" / "charlm_dni.yaml"  # a checkpoint at the end of each run (checkpoint_every: 1000)
    base = [str(ROOT / "examples" / "charlm.py"), "--spec", str(spec), "--train", "--data", str(TEXT)]
    base += ["--eval-every", "1000", "--seed", "3"]
    assert main([*base, "--steps", "24", "--out", str(tmp_path / "straight")]) == 0
    assert main([*base, "--steps", "12", "--out", str(tmp_path / "resumed")]) == 0
    capsys.readouterr()
    assert main([*base, "--steps", "24", "--resume", str(tmp_path / "resumed")]) == 0
    assert "resuming from" in capsys.readouterr().out
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
