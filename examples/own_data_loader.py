"""The data of examples/own_data.py for the command line: a function that returns (train, eval) batches, named in
specs/own_data_loader.yaml as `data: {loader: ../examples/own_data_loader.py:make_loaders}`.

    dnicompile examples/own_data.py --spec specs/own_data_loader.yaml --allow-imports --train --out runs/own_data_cli
    ... --set data.loader_args.csv=my.csv       # your CSV (header row; numeric features; the class label last)
"""

from __future__ import annotations

from pathlib import Path

import torch
from own_data import read_csv, synthetic  # examples/own_data.py, next to this file
from torch.utils.data import DataLoader, TensorDataset, random_split


def make_loaders(batch_size: int = 64, csv: str | None = None) -> tuple[DataLoader, DataLoader]:
    """80% of the rows to train on, shuffled each epoch (from torch's generator, so --resume draws the same
    batches), 20% held out. `batch_size` is the run's (--batch-size, else the spec's train.batch_size)."""
    data = read_csv(Path(csv)) if csv else TensorDataset(*synthetic())
    train, test = random_split(data, [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    return DataLoader(train, batch_size, shuffle=True, drop_last=True), DataLoader(test, 256)
