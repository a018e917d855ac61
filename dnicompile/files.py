"""Writing files so that a reader never sees half of one: write to a temporary file beside it, then rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary file in `path`'s folder, then rename it to `path`: never a half-written
    file at `path`, and no temporary file left behind when `write` fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda p: p.write_text(text))


def save_atomic(obj, path: Path) -> None:
    """torch.save `obj` to `path` atomically."""
    write_atomic(path, lambda p: torch.save(obj, p))
