"""Data sets for training from the command line: Fashion-MNIST from its IDX files."""

from __future__ import annotations

import functools
import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

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


def find_fashion_mnist(explicit: str | None) -> Path:
    """The directory holding the four Fashion-MNIST files: `explicit`, else Debian's system path."""
    candidates = [Path(explicit)] if explicit else [Path(d) for d in SYSTEM_DIRS]
    for d in candidates:
        if all(_find(d, stem) for stem in FASHION_MNIST_FILES.values()):
            return d
    # a relative path is taken from the working directory (whether it came from --data or the spec's data.path)
    looked = ", ".join(str(d) if d.is_absolute() else f"{d} (that is, {d.absolute()})" for d in candidates)
    missing = ""
    if explicit and Path(explicit).is_dir():
        absent = [s + ".gz" for s in FASHION_MNIST_FILES.values() if not _find(Path(explicit), s)]
        missing = f" (missing: {', '.join(absent)})"
    elif explicit:
        missing = " (no such directory)"
    raise DataError(
        f"Fashion-MNIST not found in {looked}{missing}. Pass --data DIR (or set the spec's data.path; a relative "
        "path is taken from the working directory) with the four IDX files "
        f"({', '.join(s + '.gz' for s in FASHION_MNIST_FILES.values())}), or install Debian's package "
        "`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist)."
    )


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

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)  # (N, 1, 28, 28)

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
