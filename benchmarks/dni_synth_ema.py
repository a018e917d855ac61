"""Experiment: DNI with the synthetic gradients drawn from a Polyak (EMA) average of each synthesizer.

benchmarks/dni_dynamics.py --frozen-fit shows the inner cuts' synthesizers can fit their bootstrapped targets
(cosine 0.67-0.76 when the rest of the program holds still) but reach only 0.06-0.10 online: they chase a
target that jitters with the synthesizer behind them. Here each synthesizer still learns online, but the
gradient it sends into its stage (and so into the bootstrapped target of the cut before) comes from an
exponential moving average of its weights (torch.optim.swa_utils.AveragedModel), a "target network" as in
temporal-difference learning. It is a small subclass of the synthetic interface, set on the program's cuts
through `program.interface_classes`.

    python benchmarks/dni_synth_ema.py --decay 0.9 --depth 4 --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dnicompile.interfaces import SyntheticInterface

sys.path.insert(0, str(Path(__file__).resolve().parent))
import feedforward_table as ft  # noqa: E402


class EMASyntheticInterface(SyntheticInterface):
    """A synthetic interface whose stage steps with an exponential moving average of each synthesizer (decay
    `decay`); the online synthesizers still make the predictions that learn, and the averages follow them."""

    decay = 0.9

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.averaged = nn.ModuleDict(
            {
                name: AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=False)
                .train()
                .requires_grad_(False)
                for name, m in self.models.grad.items()
            }
        )

    def modules(self) -> list[nn.Module]:
        return [*super().modules(), self.averaged]

    def train(self, mode: bool = True) -> None:
        self.models.train(mode)  # the averages stay in training mode, as the synthesizers they stand in for

    def gradient(self, h, context, preds, batch):
        scale = self.scale / batch
        return {name: self.averaged[name](h[name].detach(), context).detach() * scale for name in preds}

    def learned(self, h, context) -> None:
        for name, avg in self.averaged.items():
            avg.update_parameters(self.models.grad[name])


def configure(decay: float, which: str):
    """Set the EMA interface on all synthetic cuts, the inner ones, or the last one."""
    cls = type("EMASynthetic", (EMASyntheticInterface,), {"decay": decay})

    def apply(program) -> None:
        synthetic = [c for c in program.cuts if not c.exact]
        last = synthetic[-1].name
        for cut in synthetic:
            if which == "all" or (which == "last") == (cut.name == last):
                program.interface_classes[cut.name] = cls

    return apply


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decay", type=float, required=True, help="EMA decay of the averaged synthesizers")
    p.add_argument("--cuts", choices=("all", "inner", "last"), default="all", help="which cuts average")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(ft.DEFAULT_DATA))
    p.add_argument("--out", required=True, help="JSON-lines file the record is appended to")
    args = p.parse_args(argv)
    ft._init_worker(args.data)
    job = {
        "row": f"mlp{args.depth}",
        "arch": "mlp",
        "depth": args.depth,
        "method": "dni",
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": ft.BATCH_SIZE,
        "spec": ft.build_spec("mlp", args.depth, "dni", args.steps, ft.BATCH_SIZE),
        "eval_every": 1000,
    }
    rec = ft.run_one(job, configure=configure(args.decay, args.cuts))
    name = f"ema{args.decay}_{args.cuts}"
    keep = ("row", "method", "seed", "test_error", "final_train_loss", "cosine_last", "elapsed_s", "curve")
    with open(args.out, "a") as f:
        f.write(json.dumps({"name": name, **{k: rec[k] for k in keep}}) + "\n")
    print(f"{name} {rec['row']}/dni: {100 * rec['test_error']:.2f}% ({rec['elapsed_s']:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
