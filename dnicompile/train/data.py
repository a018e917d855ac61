"""Data sets for training from the command line: Fashion-MNIST from its IDX files."""

from __future__ import annotations

import functools
import gzip
import struct
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


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file ({e}); the file may be truncated, download it again.") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number {data[:4].hex()}).")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but the file has {body.size}.")
    return body.reshape(dims)


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
    looked = ", ".join(str(d) for d in candidates)
    missing = ""
    if explicit and Path(explicit).is_dir():
        absent = [s + ".gz" for s in FASHION_MNIST_FILES.values() if not _find(Path(explicit), s)]
        missing = f" (missing: {', '.join(absent)})"
    elif explicit:
        missing = " (no such directory)"
    raise DataError(
        f"Fashion-MNIST not found in {looked}{missing}. Pass --data DIR with the four IDX files "
        f"({', '.join(s + '.gz' for s in FASHION_MNIST_FILES.values())}), or install Debian's package "
        "`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist)."
    )


def load_fashion_mnist(directory: str | None) -> Dataset:
    return _load_fashion_mnist(find_fashion_mnist(directory).resolve())


@functools.lru_cache(maxsize=2)
def _load_fashion_mnist(d: Path) -> Dataset:
    """Decoding the gzipped files takes seconds: keep the last data set in memory (tensors are not mutated)."""
    arrays = {k: read_idx(_find(d, stem)) for k, stem in FASHION_MNIST_FILES.items()}
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

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch_size > len(self.order):
            self.order = torch.randperm(len(self.x), generator=self.gen)
            self.pos = 0
            self.epoch += 1
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.x[idx], self.y[idx]
