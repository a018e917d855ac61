"""dnicompile inside PyTorch Lightning: a LightningModule with manual optimization calling `program.train_step`.

The compiled program is an `nn.Module` attribute of the LightningModule, so Lightning moves it to the device,
puts it in train / eval mode and saves its weights in its checkpoints; the program's per-stage optimizers (and
synthesizers, clocks, pending delayed batches) are its own, so `configure_optimizers` returns none and
`on_save_checkpoint` / `on_load_checkpoint` carry the program's runtime state beside Lightning's. Everything
else is Lightning's: the loop, validation, logging, callbacks.

Needs the `lightning` extra: `pip install -c constraints.txt -e ".[lightning]"`.

    python examples/lightning_mlp.py --data ../shared/data/fashion-mnist --steps 300   # cDNI, 4 hidden layers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import dnicompile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlp import build_model  # noqa: E402

# cDNI (synthetic gradients conditioned on the labels) after every hidden layer: the spec the CLI trains
SPEC = Path(__file__).resolve().parent.parent / "specs" / "mlp_cdni.yaml"


class ProgramSteps(torch.optim.Optimizer):
    """What Lightning sees as the optimizer: its `step(closure)` runs the closure, the program's training step,
    in which the stages' own optimizers step. Lightning counts these steps (global_step, max_steps,
    val_check_interval) as it counts any optimizer's."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return closure() if closure is not None else None


class DecoupledClassifier(L.LightningModule):
    """A classifier trained by dnicompile's decoupled stages, under Lightning's loop."""

    def __init__(self, model: torch.nn.Module, spec: str | Path = SPEC):
        super().__init__()
        self.automatic_optimization = False  # the program steps its own stages' optimizers
        self.program = dnicompile.compile_decoupled(model, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        result = self.optimizers().step(closure=lambda: self.program.train_step(x, y))
        self.log("train_loss", result.loss, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.program(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return ProgramSteps(self.program.parameters())  # the stages' optimizers live in the program (spec `stages`)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["dnicompile_runtime"] = self.program.runtime.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.program.runtime.load_state_dict(checkpoint["dnicompile_runtime"])


def loaders(data_dir: str, batch_size: int = 128) -> tuple[DataLoader, DataLoader]:
    """Fashion-MNIST as DataLoaders of flat (B, 784) images and labels."""
    from dnicompile.train.data import load_fashion_mnist

    ds = load_fashion_mnist(data_dir)
    train = TensorDataset(ds.train_x.flatten(1), ds.train_y)
    test = TensorDataset(ds.test_x.flatten(1), ds.test_y)
    g = torch.Generator().manual_seed(0)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, generator=g),
        DataLoader(test, batch_size=1000),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="Fashion-MNIST directory (default: the usual places)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="runs/lightning_mlp", help="Lightning's logs and checkpoints")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    train, test = loaders(args.data)
    module = DecoupledClassifier(build_model())
    trainer = L.Trainer(
        max_steps=args.steps,
        val_check_interval=min(100, args.steps),
        check_val_every_n_epoch=None,
        accelerator="auto",
        devices=1,
        default_root_dir=args.out,
        logger=L.pytorch.loggers.CSVLogger(args.out),
    )
    trainer.fit(module, train, test)
    print(f"val_acc {float(trainer.callback_metrics['val_acc']):.4f} after {trainer.global_step} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
