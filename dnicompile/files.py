"""Files a run writes and reads back: atomic, durable writes (write to a temporary file beside the target,
fsync, rename, fsync the folder), checkpoint series kept to the newest K, and loading a tensor file without
running code from it.

[Note: checkpoint files] A checkpoint is a folder `ckpt-<step, 8 digits>/` written with torch.distributed.checkpoint
([Note: dcp checkpoints] in checkpoint.py), by one process or by every rank of several. It is written as
`.ckpt-<step>.tmp/`, each file fsynced, then renamed into place (and the parent folder fsynced), so a folder with
a checkpoint's name is complete; `LATEST` names the newest. Other files are written atomically and fsynced before
their rename; a crash leaves at most a `.<name>.<random>.tmp` file or a `.ckpt-<step>.tmp/` folder, which the next
run removes (`remove_stale_tmp`). A run keeps its newest K checkpoints (`prune_checkpoints`), and resuming tries
them newest first: a damaged one (truncated, unreadable, incomplete) falls back to the one before, while a file
that asks to run code (a pickled callable) is refused outright (`UnsafeFileError`), since dnicompile never writes
one. dnicompile 0.1.0 wrote `ckpt-<step>.pt` files and `ckpt-<step>/rank<k>.pt` shards: they are listed (to keep,
prune and remove them) but not resumed.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import DNIError


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush `path` (a file, or a folder's entries) to the disk; a file system that cannot is let be."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary file in `path`'s folder, fsync it, then rename it to `path` (and fsync
    the folder): never a half-written file at `path`, not even after a power cut, and no temporary file left
    behind when `write` fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600; the file gets what open() would give it
        _fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, directory=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda p: p.write_text(text))


def save_atomic(obj, path: Path) -> None:
    """torch.save `obj` to `path` atomically."""
    write_atomic(path, lambda p: torch.save(obj, p))


# the temporary files write_atomic makes: `.` + the target's name + `.` + mkstemp's 8 random characters + `.tmp`
_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
# the folders a checkpoint is written in (and an older one of the same step is moved to while it is replaced)
_TMP_DIR = re.compile(r"^\.ckpt-\d{8,}\.(tmp|old)$")


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Remove the temporary files an interrupted write_atomic left in `folder` and in its checkpoint folders;
    returns what was removed. Only files named as write_atomic names them are touched."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for where in [folder, *(p for _, p in checkpoints(folder, "dir"))]:
        for p in where.iterdir():
            if _TMP.match(p.name) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                removed.append(p)
    for p in folder.iterdir():
        if _TMP_DIR.match(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


_CKPT = {"file": re.compile(r"^ckpt-(\d{8,})\.pt$"), "dir": re.compile(r"^ckpt-(\d{8,})$")}
# what a checkpoint folder holds: DCP's metadata and data files (and dnicompile 0.1.0's rank<k>.pt shards)
_SHARD = re.compile(r"^(rank\d+\.pt|\.metadata|__\d+\.metadata|__\d+_\d+\.distcp)$")


def checkpoint_name(step: int, kind: str) -> str:
    return f"ckpt-{step:08d}" + (".pt" if kind == "file" else "")


def checkpoints(folder: Path, kind: str) -> list[tuple[int, Path]]:
    """The checkpoints in `folder`, newest (highest step) first: `ckpt-<step>.pt` files (kind "file") or
    `ckpt-<step>/` folders (kind "dir")."""
    pattern = _CKPT[kind]
    found = []
    folder = Path(folder)
    if not folder.is_dir():
        return found
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m and (p.is_file() if kind == "file" else p.is_dir()) and not p.is_symlink():
            found.append((int(m.group(1)), p))
    return sorted(found, key=lambda sp: sp[0], reverse=True)


def remove_checkpoint(path: Path) -> None:
    """Remove one checkpoint: a `ckpt-<step>/` folder's files (and the folder, once nothing else is in it), or an
    old `ckpt-<step>.pt` file."""
    path = Path(path)
    if path.is_dir():
        for p in path.iterdir():
            if (_SHARD.match(p.name) or _TMP.match(p.name)) and p.is_file():
                p.unlink(missing_ok=True)
        try:
            path.rmdir()
        except OSError:  # something that is not ours is in it: leave it
            pass
    else:
        path.unlink(missing_ok=True)


def prune_checkpoints(folder: Path, keep: int, kind: str) -> list[Path]:
    """Keep the newest `keep` checkpoints of `kind` in `folder`; remove the others. Returns the removed."""
    old = [p for _, p in checkpoints(folder, kind)[max(keep, 1) :]]
    for p in old:
        remove_checkpoint(p)
    return old


class UnsafeFileError(DNIError):
    """A tensor file that would run code when loaded (a pickled callable or class): refused."""


class DamagedFileError(DNIError):
    """A tensor file that cannot be read (truncated, corrupt, not a torch file)."""


def load_tensors(path: Path, map_location=None):
    """torch.load with weights_only=True: tensors and plain containers only, so loading never runs code from
    the file. Raises UnsafeFileError when the file asks for anything else (nothing of it has run), and
    DamagedFileError when it cannot be read."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        # the weights-only unpickler names the global it refused ("Unsupported global: GLOBAL posix.system");
        # anything else it stops at is bytes that are not a pickle at all
        asked = re.search(r"GLOBAL ([\w.]+)", text)
        if asked or "global" in text.lower():
            what = asked.group(1) if asked else "a Python object"
            raise UnsafeFileError(
                f"{path}: refused: the file asks to load {what}, which is code, not tensors; a checkpoint that "
                "dnicompile writes holds only tensors and plain values, so this one was made or changed by "
                "something else. Nothing from it was run."
            ) from None
        detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
        raise DamagedFileError(f"{path}: not a readable checkpoint ({_first_line(detail)})") from None
    except OSError as e:
        if e.errno is not None:
            raise  # the file system said no (permission, I/O error): the caller names the path and the cause
        raise DamagedFileError(
            f"{path}: not a readable checkpoint ({_first_line(str(e)) or type(e).__name__})"
        ) from None
    except Exception as e:  # a truncated or corrupt archive: miniz, zlib, decoding errors
        raise DamagedFileError(
            f"{path}: not a readable checkpoint ({_first_line(str(e)) or type(e).__name__})"
        ) from None


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= 160 else line[:157] + "..."


def newest_readable(folder: Path, found: list[tuple[int, Path]], read, say=None):
    """For --resume: the first of `found` (checkpoints, newest first) that `read(step, path)` reads without a
    DamagedFileError, as (step, path, what read returned); `say(text)` hears the ones skipped and the choice. A
    DNIError when none can be read."""
    skipped = []
    for step, path in found:
        try:
            value = read(step, path)
        except DamagedFileError as e:
            skipped.append(str(e))
            continue
        if say is not None:
            for line in skipped:
                say(f"skipping {line}")
            say(f"resuming from {path.name} (step {step}){' instead' if skipped else ''}")
        return step, path, value
    raise DNIError(f"--resume {folder}: no checkpoint there can be read: " + "; ".join(skipped))
