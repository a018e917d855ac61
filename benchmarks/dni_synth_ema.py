"""Experiment: DNI with the synthetic gradients drawn from a Polyak (EMA) average of each synthesizer.

benchmarks/dni_dynamics.py --frozen-fit shows the inner cuts' synthesizers can fit their bootstrapped targets
(cosine 0.67-0.76 when the rest of the program holds still) but reach only 0.06-0.10 online: they chase a
target that jitters with the synthesizer behind them. Here each synthesizer still learns online, but the
gradient it sends into its stage (and so into the bootstrapped target of the cut before) comes from an
exponential moving average of its weights (torch.optim.swa_utils.AveragedModel), a "target network" as in
temporal-difference learning. The runtime is patched in this process only; nothing in dnicompile changes.

    python benchmarks/dni_synth_ema.py --decay 0.9 --depth 4 --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import feedforward_table as ft  # noqa: E402


def patch(decay: float, which: str) -> None:
    """Make LocalRuntime send each synthesizer's EMA prediction into the stage; the online one still learns."""
    from dnicompile.runtime import local

    cls = local.LocalRuntime
    apply_orig, update_orig = cls.apply_synthetic_gradient, cls.update_synthetic_gradient

    def averaged(self, cut) -> dict:
        """The cut's averaged synthesizers, made on first use; {} where this run does not average the cut."""
        store = self.__dict__.setdefault("_ema", {})
        if cut.index not in store:
            last = max(c.index for c in self.program.cuts if not c.exact)
            store[cut.index] = {}
            if which == "all" or (which == "last") == (cut.index == last):
                for name, m in self.synth[cut.index].grad.items():
                    avg = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
                    store[cut.index][name] = avg.train().requires_grad_(False)
        return store[cut.index]

    def apply_synthetic_gradient(self, cut, outputs, ctx, open_group):
        ema = averaged(self, cut)
        if not ema:
            return apply_orig(self, cut, outputs, ctx, open_group)
        cs = self.synth[cut.index]
        self.synth[cut.index] = SimpleNamespace(grad=ema)  # the stage follows the averaged synthesizers
        try:
            apply_orig(self, cut, outputs, ctx, open_group)
        finally:
            self.synth[cut.index] = cs
        # the online synthesizers make the predictions that learn from the target
        return {
            b.name: cs.grad[b.name](h.detach(), ctx.context) for b, h in zip(cut.boundary, outputs) if b.name in ema
        }

    def update_synthetic_gradient(self, cut, preds, deltas, batch, result):
        update_orig(self, cut, preds, deltas, batch, result)
        for name, avg in averaged(self, cut).items():
            avg.update_parameters(self.synth[cut.index].grad[name])

    cls.apply_synthetic_gradient = apply_synthetic_gradient
    cls.update_synthetic_gradient = update_synthetic_gradient


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
    patch(args.decay, args.cuts)
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
    rec = ft.run_one(job)
    name = f"ema{args.decay}_{args.cuts}"
    keep = ("row", "method", "seed", "test_error", "final_train_loss", "cosine_last", "elapsed_s", "curve")
    with open(args.out, "a") as f:
        f.write(json.dumps({"name": name, **{k: rec[k] for k in keep}}) + "\n")
    print(f"{name} {rec['row']}/dni: {100 * rec['test_error']:.2f}% ({rec['elapsed_s']:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
