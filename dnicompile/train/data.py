"""Data sets for training from the command line: Fashion-MNIST from its IDX files (found, or downloaded on first
use by train/download.py), and the data a spec's own `data.loader` function returns."""

from __future__ import annotations

import functools
import gzip
import importlib
import importlib.util
import inspect
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..compile.model_file import exec_file, nearby_file, user_frame
from ..errors import DataError, did_you_mean
from . import download

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)


@dataclass(frozen=True)
class Dataset:
    """Images scaled to [0, 1] as float32 (N, 1, 28, 28), labels int64 (N,)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str


# An IDX file declares its shape before its data; nothing is read past what it declares, and no file may
# declare more than this (Fashion-MNIST's largest file is 47 MB), so a gzip bomb fails after its header.
MAX_IDX_BYTES = 1 << 30


def read_idx(path: Path, ndim: int | None = None, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array of its declared shape.

    The header is checked first (magic number, `ndim` dimensions when given, a size of at most `max_bytes`),
    then exactly the declared number of bytes is decompressed into an array of that size, and a file with
    more data than that is refused: memory and time stay bounded by what the header declares."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = _read_exactly(f, 4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
                raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number {head.hex()}).")
            if ndim is not None and head[3] != ndim:
                raise DataError(f"{path}: the header says {head[3]} dimensions; this file should have {ndim}.")
            raw_dims = _read_exactly(f, 4 * head[3])
            if len(raw_dims) < 4 * head[3]:
                raise DataError(f"{path}: the file ends inside its header; it is truncated, download it again.")
            dims = struct.unpack(f">{head[3]}I", raw_dims)
            size = math.prod(dims)
            if size > max_bytes:
                raise DataError(
                    f"{path}: the header says shape {dims} ({size:,} bytes), more than the {max_bytes:,} an IDX "
                    "file here may hold; the file is corrupt or not a data set of this kind."
                )
            body = np.empty(size, dtype=np.uint8)
            got = _read_into(f, memoryview(body))
            if got < size:
                raise DataError(
                    f"{path}: the header says shape {dims} ({size:,} bytes) but the file holds only {got:,}; it is "
                    "truncated, download it again."
                )
            if f.read(1):
                raise DataError(
                    f"{path}: the header says shape {dims} ({size:,} bytes) but the file holds more; it is "
                    "corrupt (or a decompression bomb), download it again."
                )
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read IDX file ({e}); the file may be truncated, download it again.") from None
    return body.reshape(dims)


def _read_exactly(f, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = f.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def _read_into(f, view: memoryview, chunk: int = 1 << 20) -> int:
    """Fill `view` from `f` in chunks of at most `chunk` bytes; the number of bytes read."""
    pos = 0
    while pos < len(view):
        n = f.readinto(view[pos : pos + chunk])
        if not n:
            break
        pos += n
    return pos


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _complete(directory: Path) -> bool:
    return all(_find(directory, stem) for stem in FASHION_MNIST_FILES.values())


def find_fashion_mnist(explicit: str | None) -> Path:
    """The directory holding the four Fashion-MNIST files: `explicit` (--data or the spec's data.path), else
    Debian's system path, else the cache folder, where they are downloaded on first use (train/download.py).

    An explicit directory that lacks the files is an error, never a download. Call it once before starting
    worker processes: they then find the files in the cache."""
    if explicit:
        d = Path(explicit)
        if _complete(d):
            return d
        # a relative path is taken from the working directory (whether it came from --data or the spec's data.path)
        looked = str(d) if d.is_absolute() else f"{d} (that is, {d.absolute()})"
        if d.is_dir():
            absent = [s + ".gz" for s in FASHION_MNIST_FILES.values() if not _find(d, s)]
            missing = f" (missing: {', '.join(absent)})"
        else:
            missing = " (no such directory)"
        raise DataError(
            f"Fashion-MNIST not found in {looked}{missing}. Pass --data DIR (or set the spec's data.path; a relative "
            f"path is taken from the working directory) with the four IDX files ({_file_names()}), install Debian's "
            "package `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist), or give neither to use the "
            f"cache folder {download.dataset_dir('fashion-mnist')}, where they are downloaded on first use."
        )
    for d in [*(Path(s) for s in SYSTEM_DIRS), download.dataset_dir("fashion-mnist")]:
        if _complete(d):
            return d
    try:
        return download.fetch("fashion-mnist")
    except download.DownloadError as e:
        cache = download.dataset_dir("fashion-mnist")
        system = " or ".join(SYSTEM_DIRS) or "no system folder"
        raise DataError(
            f"Fashion-MNIST not found in {system} or the cache folder {cache}, and it could not be downloaded: "
            f"{e}. Provide the four IDX files ({_file_names()}) one of three ways: (1) pass --data DIR (or set the "
            "spec's data.path) to a folder that holds them; (2) install Debian's package `dataset-fashion-mnist` "
            f"(apt-get install dataset-fashion-mnist); (3) put them in {cache} (the cache folder; "
            f"{download.CACHE_ENV}=DIR moves it to DIR/fashion-mnist), copied from {download.FASHION_MNIST_URL} or "
            f"any copy. With none of these, the next run tries the download again"
            + (f" once {download.OFFLINE_ENV} is unset." if download.offline() else ".")
        ) from None


def _file_names() -> str:
    return ", ".join(s + ".gz" for s in FASHION_MNIST_FILES.values())


def load_fashion_mnist(directory: str | None) -> Dataset:
    return _load_fashion_mnist(find_fashion_mnist(directory).resolve())


@functools.lru_cache(maxsize=2)
def _load_fashion_mnist(d: Path) -> Dataset:
    """Decoding the gzipped files takes seconds: keep the last data set in memory (tensors are not mutated)."""
    arrays = {
        k: read_idx(_find(d, stem), ndim=3 if k.endswith("images") else 1) for k, stem in FASHION_MNIST_FILES.items()
    }
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"{d}: {split} has {n_img} images but {n_lab} labels.")

    def images(a: np.ndarray) -> torch.Tensor:  # one float32 copy, divided in place (numpy's way made two: 8x slower)
        return torch.from_numpy(a).to(torch.float32).div_(255.0).unsqueeze(1)  # (N, 1, 28, 28)

    return Dataset(
        train_x=images(arrays["train_images"]),
        train_y=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_x=images(arrays["test_images"]),
        test_y=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        source=str(d),
    )


def load_dataset(name: str, directory: str | None) -> Dataset:
    if name == "fashion-mnist":
        return load_fashion_mnist(directory)
    raise DataError(f"unknown data set {name!r}; this version knows fashion-mnist.")


class Batches:
    """Endless shuffled mini-batches (reshuffled each epoch, reproducible from the seed)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        if batch_size > len(x):
            raise DataError(f"batch size {batch_size} is larger than the training set ({len(x)} examples).")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(x), generator=self.gen)
        self.pos = 0
        self.epoch = 0

    def skip(self, steps: int) -> None:
        """Advance past `steps` batches exactly as `next()` would, without gathering them (for --resume)."""
        for _ in range(steps):
            if self.pos + self.batch_size > len(self.order):
                self.order = torch.randperm(len(self.x), generator=self.gen)
                self.pos = 0
                self.epoch += 1
            self.pos += self.batch_size

    def state_dict(self) -> dict:
        """Where the batches are: the generator, this epoch's order and the position in it (for checkpoints)."""
        return {"gen": self.gen.get_state(), "order": self.order.clone(), "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.order, self.pos, self.epoch = state["order"].clone(), int(state["pos"]), int(state["epoch"])

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch_size > len(self.order):
            self.order = torch.randperm(len(self.x), generator=self.gen)
            self.pos = 0
            self.epoch += 1
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.x[idx], self.y[idx]


# --------------------------------------------------------------------------- the spec's own data: data.loader
def call_loader(spec, batch_size: int) -> tuple[Any, Any]:
    """The (train, eval) iterables of batches that the spec's `data.loader` function returns (eval may be None).

    'file.py:function' imports the file (relative to the spec's folder; its folder goes on sys.path, as a model
    file's does), 'package.module:function' the module; load_spec has refused either unless imports are allowed.
    The function is called with `data.loader_args`, plus `batch_size` where it takes that argument and the
    arguments do not set it. Every failure is a DataError located at the spec's `data.loader`."""
    cfg = spec.data
    where = f"{spec.where('data', 'loader')}: `data.loader: {cfg.loader}`"
    target, _, name = cfg.loader.rpartition(":")
    module = _import_loader_file(target, spec.folder, where) if target.endswith(".py") else _import(target, where)
    fn = getattr(module, name, None)
    if fn is None:
        public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise DataError(
            f"{where}: {target} has no function `{name}`{did_you_mean(name, public)}; name the function that returns "
            "(train, eval) iterables of batches."
        )
    if not callable(fn):
        raise DataError(f"{where}: `{name}` is a {type(fn).__name__}, not a function returning (train, eval).")
    kwargs = dict(cfg.loader_args)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        signature = None
    params = signature.parameters if signature is not None else {}
    if "batch_size" in params and "batch_size" not in kwargs:
        kwargs["batch_size"] = batch_size
    call = f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        got = fn(**kwargs)
    except Exception as e:  # the user's function raised (frames below this one are the user's)
        raised_at = user_frame(e.__traceback__.tb_next)
        if isinstance(e, TypeError) and not raised_at:  # the call itself: the arguments do not fit
            at = f"{spec.where('data', 'loader_args')}: " if cfg.loader_args else ""
            raise DataError(
                f"{at}{where}: calling {call} failed: {e}. It takes {name}{signature or '(...)'}; make "
                "`data.loader_args` match."
            ) from None
        raise DataError(f"{where}: {call} raised at {raised_at or target}: {type(e).__name__}: {e}") from None
    except (SystemExit, KeyboardInterrupt) as e:
        raised_at = user_frame(e.__traceback__.tb_next) or target
        raise DataError(
            f"{where}: {call} stopped at {raised_at} ({type(e).__name__}); it must return the data."
        ) from None
    return _checked_pair(got, f"{where}: {name}()")


_LOADER_SHAPE = (
    "it must return (train, eval): two iterables of batches, eval may be None (e.g. `return DataLoader(train_set, "
    "64, shuffle=True), DataLoader(test_set, 256)`)"
)


def _checked_pair(got, what: str) -> tuple[Any, Any]:
    """(train, eval) as the function returned them, or a DataError saying what it returned instead."""
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        kind = f"a {type(got).__name__} of {len(got)}" if isinstance(got, (tuple, list)) else type(got).__name__
        raise DataError(f"{what} returned {kind}; {_LOADER_SHAPE}.")
    for part, value in zip(("train", "eval"), got):
        if value is None and part == "eval":
            continue
        if isinstance(value, (str, bytes, dict, torch.Tensor)) or not hasattr(value, "__iter__"):
            kind = "None" if value is None else type(value).__name__
            raise DataError(f"{what} returned {kind} as its {part} data, not an iterable of batches; {_LOADER_SHAPE}.")
    return got[0], got[1]


def _import_loader_file(target: str, folder: Path, where: str):
    """Import a data loader file by path, relative to the spec's folder."""
    path = Path(target) if Path(target).is_absolute() else folder / target
    if not path.is_file():
        close = nearby_file(path)
        hint = f" (did you mean {close!r}?)" if close else ""
        raise DataError(
            f"{where}: no file {path}{hint}; a relative path is read from the spec's folder ({folder}): give the "
            "file's path from there, or an absolute one."
        )
    return exec_file(path, "data loader file", DataError, prefix=f"{where}: ")


def _import(module_name: str, where: str):
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise DataError(
            f"{where}: cannot import module {module_name!r} ({e}); for a file next to the spec write "
            f"'{module_name.replace('.', '/')}.py:function'."
        ) from None
    except Exception as e:
        raise DataError(f"{where}: importing module {module_name!r} raised {type(e).__name__}: {e}") from None
