"""What the stages' Adam sees under DNI: per-stage gradient scale and consistency, per-cut synthesizer scale.

Trains one MLP of benchmarks/feedforward_table.py (its spec, its defaults) for a few hundred steps and, at the
steps given, prints for every stage the median over its parameters of Adam's sqrt(v) (the RMS gradient Adam
divides by) and of |m| / sqrt(v) (how much of that gradient points the same way from step to step: Adam's step
is lr * m / sqrt(v); both bias-corrected, as Adam uses them), and for every cut the per-sample (RMS over the batch) norm of the synthetic gradient, of its target and their
cosine. Run it for backprop too (`--method backprop`) to see the true gradient's scale.

    python benchmarks/dni_dynamics.py --depth 4 --method dni --steps 1200 --report-at 20 100 400 1200
    python benchmarks/dni_dynamics.py --depth 4 --method backprop --steps 1200 --report-at 100 400 1200
    # the synthesizers' learning rate warmed up over 500 steps:
    python benchmarks/dni_dynamics.py --synth-warmup 0.01 500

The target's norm comes from the step's synthesizer loss and cosine (the loss is the mean squared difference, so
t^2 - 2 cos p t + p^2 = loss * numel / batch for the RMS norms p, t); the synthetic gradient's from a forward hook on the synthesizer.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import feedforward_table as ft  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ft.DEFAULT_DATA), help="Fashion-MNIST directory (default: %(default)s)")
    p.add_argument("--depth", type=int, default=4, help="hidden layers (default: %(default)s)")
    p.add_argument("--method", choices=("dni", "cdni", "backprop"), default="dni")
    p.add_argument("--steps", type=int, default=1200, help="steps to train (default: %(default)s)")
    p.add_argument(
        "--schedule-steps",
        type=int,
        default=6000,
        help="the run length the stage's cosine schedule spans, as in the table (default: %(default)s)",
    )
    p.add_argument("--report-at", type=int, nargs="+", default=[20, 100, 400, 1200], metavar="STEP")
    p.add_argument("--batch-size", type=int, default=ft.BATCH_SIZE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--synth-warmup",
        type=float,
        nargs=2,
        default=None,
        metavar=("START_FACTOR", "STEPS"),
        help="warm the DNI synthesizers' learning rate up (LinearLR) from START_FACTOR over STEPS",
    )
    p.add_argument(
        "--frozen-fit",
        type=int,
        default=0,
        metavar="STEPS",
        help="after training, for each cut in turn: stop the stages and every other synthesizer and train this "
        "cut's synthesizer alone for STEPS more batches, reporting its cosine (tracking or capacity?)",
    )
    p.add_argument("--out", default=None, help="write the reports as JSON here")
    return p.parse_args(argv)


def _with_warmup(synth: dict, warmup) -> dict:
    if warmup is None:
        return synth
    opt = {
        **synth["optimizer"],
        "scheduler": {"name": "LinearLR", "start_factor": warmup[0], "total_iters": int(warmup[1])},
    }
    return {**synth, "optimizer": opt}


def main(argv=None) -> int:
    args = parse_args(argv)
    from dnicompile import compile_decoupled
    from dnicompile.train.data import load_fashion_mnist

    torch.set_num_threads(args.threads)
    data = load_fashion_mnist(args.data)
    x_all, y_all = data.train_x, data.train_y
    spec = ft.build_spec(
        "mlp",
        args.depth,
        args.method,
        args.schedule_steps,
        args.batch_size,
        dni_mlp_synth=_with_warmup(ft.DNI_MLP_SYNTH, args.synth_warmup),
        dni_last_synth=_with_warmup(ft.DNI_LAST_SYNTH, args.synth_warmup),
    )
    torch.manual_seed(args.seed)
    model = ft._load_example("mlp").build_model(**spec["model_args"])
    program = compile_decoupled(model, spec)
    runtime = program.runtime

    pred_norm: dict[str, float] = {}
    numel: dict[str, int] = {}
    for cut in program.cuts:
        if cut.exact:
            continue
        for synth in runtime.interfaces[cut.index].models.grad.values():

            def hook(_m, _inp, out, key=cut.name):
                pred_norm[key] = float(out.detach().flatten(1).square().sum(1).mean().sqrt())  # RMS over samples
                numel[key] = out.numel()

            synth.register_forward_hook(hook)

    gen = torch.Generator().manual_seed(args.seed)
    reports = []
    print(
        f"{args.method}, {args.depth} hidden layers, batch {args.batch_size}; stage: median sqrt(v) / median "
        "|m|/sqrt(v); cut: synthetic-gradient norm / target norm (per sample) / cosine"
    )
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
        result = program.train_step(x_all[idx], y_all[idx])
        if step not in args.report_at:
            continue
        stages = []
        for opt in (s.optimizer for s in runtime.stages):
            beta1, beta2 = opt.param_groups[0]["betas"]
            ms, vs = [], []
            for state in opt.state.values():
                t = float(state["step"])  # Adam's bias corrections: m / (1 - beta1^t), v / (1 - beta2^t)
                ms.append(state["exp_avg"].flatten() / (1 - beta1**t))
                vs.append(state["exp_avg_sq"].flatten() / (1 - beta2**t))
            m, v = torch.cat(ms), torch.cat(vs)
            step_over_lr = m.abs() / (v.sqrt() + opt.param_groups[0]["eps"])  # |Adam's step| / lr
            stages.append({"sqrt_v": float(v.sqrt().median()), "m_over_sqrt_v": float(step_over_lr.median())})
        cuts = {}
        for name, cos in result.cosine.items():
            p = pred_norm[name]
            b = args.batch_size
            # RMS per-sample norms p, t: mean |p - t|^2 = p^2 + t^2 - 2 cos p t, cos over the whole batch
            total = result.synth_loss[name] * numel[name] / b
            disc = (cos * p) ** 2 - p * p + total
            t = cos * p + math.sqrt(max(disc, 0.0))
            cuts[name] = {"synth_norm": p, "target_norm": t, "cosine": cos}
        reports.append({"step": step, "stages": stages, "cuts": cuts})
        st = "  ".join(f"s{i} {s['sqrt_v']:.1e}/{s['m_over_sqrt_v']:.2f}" for i, s in enumerate(stages))
        ct = "  ".join(f"{k} {c['synth_norm']:.2e}/{c['target_norm']:.2e}/{c['cosine']:+.2f}" for k, c in cuts.items())
        print(f"step {step:5d}  {st}\n            {ct}", flush=True)
    frozen = frozen_fit(program, x_all, y_all, gen, args) if args.frozen_fit else {}
    if args.out:
        out = {"args": vars(args), "reports": reports, "frozen_fit": frozen}
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


def frozen_fit(program, x_all, y_all, gen, args, window: int = 50) -> dict:
    """For each synthetic cut: with the stages and the other synthesizers held still, how close does this cut's
    synthesizer get to its target? Cosine over the last `window` steps before the freeze ("online") and after
    args.frozen_fit steps of fitting alone ("frozen"); the program is restored between cuts."""
    runtime = program.runtime
    saved = (copy.deepcopy(program.model.state_dict()), copy.deepcopy(runtime.state_dict()))
    online = {}
    for _ in range(window):  # the online cosine, everything still learning
        idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
        for name, cos in program.train_step(x_all[idx], y_all[idx]).cosine.items():
            online.setdefault(name, []).append(cos)
    program.model.load_state_dict(saved[0])
    runtime.load_state_dict(saved[1])
    step_stages = runtime.step_stages
    schedulers = {i: iface.scheduler for i, iface in enumerate(runtime.interfaces) if not iface.exact}
    runtime.step_stages = lambda stages, ticks: None  # the stages stand still
    out = {}
    try:
        for cut in program.cuts:
            if cut.exact:
                continue
            lrs = {}
            for other in program.cuts:
                if other.exact or other.index == cut.index:
                    continue
                opt = runtime.interfaces[other.index].optimizer
                lrs[other.index] = [g["lr"] for g in opt.param_groups]
                for g in opt.param_groups:
                    g["lr"] = 0.0
                runtime.interfaces[other.index].scheduler = None
            cos = []
            for _ in range(args.frozen_fit):
                idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
                cos.append(program.train_step(x_all[idx], y_all[idx]).cosine[cut.name])
            on = sum(online[cut.name]) / window
            fr = sum(cos[-window:]) / window
            out[cut.name] = {"online": on, "frozen": fr}
            print(f"frozen fit {cut.name}: cosine {on:+.3f} online -> {fr:+.3f} after {args.frozen_fit} steps alone")
            program.model.load_state_dict(saved[0])
            runtime.load_state_dict(saved[1])
            for i, groups in lrs.items():
                for g, lr in zip(runtime.interfaces[i].optimizer.param_groups, groups):
                    g["lr"] = lr
            for i, sched in schedulers.items():
                runtime.interfaces[i].scheduler = sched
    finally:
        runtime.step_stages = step_stages
    return out


if __name__ == "__main__":
    raise SystemExit(main())
