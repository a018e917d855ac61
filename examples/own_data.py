"""Train on your own data: a CSV file read into a DataLoader, a model of your own, a spec string, dnicompile.fit.

The example writes its own CSV first (12 numeric columns and a class label in 3 classes, 4000 rows), so it runs
anywhere; pass --csv to read yours instead (numbers in every column, the label last, a header row).

    python examples/own_data.py --out runs/own_data            # writes runs/own_data/data.csv, then trains
    python examples/own_data.py --csv my.csv --epochs 5         # your file: any number of feature columns
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset, random_split

import dnicompile

# The cut after the second hidden layer takes a delayed true gradient: the first stage steps with the gradient
# of the batch it ran one step before, and never waits for the second stage's backward.
SPEC = """
inputs: {{input: {{shape: [64, {features}]}}}}
cuts:
  - after: '3'
    delayed_gradient: {{delay: 1, weights: stash}}
stages:
  default: {{optimizer: {{name: Adam, lr: 2.0e-3}}}}
loss: cross_entropy
"""


def synthetic(rows: int = 4000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes of points in 12 dimensions, separated by two noisy nonlinear rules: (x, y)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 12, generator=g)
    score = x[:, 0] * x[:, 1] + torch.sin(2 * x[:, 2]) + 0.3 * torch.randn(rows, generator=g)
    y = (score > -0.3).long() + (score > 0.7).long()
    return x, y


def make_csv(path: Path, rows: int = 4000, seed: int = 0) -> None:
    """The synthetic data as a CSV file (5 decimals)."""
    x, y = synthetic(rows, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"f{i}" for i in range(12)] + ["label"])
        for features, label in zip(x.tolist(), y.tolist()):
            w.writerow([f"{v:.5f}" for v in features] + [label])


def read_csv(path: Path) -> TensorDataset:
    """Every column but the last as float features, the last as an integer class label."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))[1:]
    x = torch.tensor([[float(v) for v in r[:-1]] for r in rows])
    y = torch.tensor([int(r[-1]) for r in rows])
    return TensorDataset(x, y)


def build_model(features: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
        nn.Linear(128, classes),
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", type=Path, help="your CSV (header row; numeric features; the class label last)")
    p.add_argument("--out", type=Path, help="a folder for metrics, checkpoints, the model and curves")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--resume", action="store_true", help="go on with the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    args = p.parse_args()
    path = args.csv
    if path is None:
        path = (args.out or Path("runs/own_data")) / "data.csv"
        if not path.exists():
            make_csv(path)
    data = read_csv(path)
    classes = int(data.tensors[1].max()) + 1
    train, test = random_split(data, [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = build_model(data.tensors[0].shape[1], classes)
    program = dnicompile.compile_decoupled(model, SPEC.format(features=data.tensors[0].shape[1]))
    print(program.summary())
    loader = DataLoader(train, batch_size=64, shuffle=True, drop_last=True)
    summary = dnicompile.fit(
        program,
        loader,
        DataLoader(test, batch_size=256),
        epochs=args.epochs,
        eval_every=len(loader),  # once per epoch
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=True,
    )
    print(f"test accuracy {summary['test_accuracy']:.4f} after {summary['steps_done']} steps")


if __name__ == "__main__":
    main()
