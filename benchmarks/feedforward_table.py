"""Feed-forward DNI / cDNI on Fashion-MNIST: a table of test error, as in Jaderberg et al. 2017 (section 3.1).

Fully connected nets with 3, 4, 5 and 6 hidden layers of 256 units (batch norm, ReLU; examples/mlp.py) and the
small conv net of examples/cnn.py, with a cut after every hidden layer / conv block, each trained three ways with
the same stage optimizer, batch size and number of steps:

- backprop: every cut exact (the true gradient crosses it);
- DNI:      a synthetic gradient at every cut, without labels;
- cDNI:     a synthetic gradient at every cut, conditioned on the one-hot labels.

Plus the decoupled-update experiment: cDNI with every stage on a `probability: 0.2` clock (each stage updates on a
random fifth of the steps, independently of the others).

    python benchmarks/feedforward_table.py --out results/feedforward.json
    python benchmarks/feedforward_table.py --only mlp3 mlp4 --steps 2000 --seeds 0
    python benchmarks/feedforward_table.py --only 'cnn/*' --batch-size 128 --seeds 0 1 2   # the conv net's rows

Runs execute in parallel worker processes (--jobs, default 2), one torch thread each. Results are written to
--out after every finished run, so an interrupted benchmark keeps what it measured; a markdown table of test
error (mean over seeds, in percent) is printed at the end.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fashion-mnist"

DEPTHS = (3, 4, 5, 6)
DELAYED = tuple(f"delayed{d}_{w}" for d in (1, 3) for w in ("stash", "current", "recompute"))
METHODS = ("backprop", "dni", "cdni", "cdni_p0.2", "frozen", "local", *DELAYED)
METHOD_TITLES = {
    "backprop": "backprop",
    "dni": "DNI",
    "cdni": "cDNI",
    "cdni_p0.2": "cDNI, p=0.2 clocks",
    "frozen": "hidden layers frozen",
    "local": "local loss, one cut",
    **{m: f"delayed {m[7]}, {m.split('_')[1]}" for m in DELAYED},
}
# "local" (issue 16) is one cut in the middle of the hidden layers (after layers.{depth // 2 - 1}; conv: after the
# first block) with a local-loss head trained on the labels (LOCAL_HEAD); nothing is sent back across it.
LOCAL_HEAD = {"head": "mlp", "hidden": 256, "layers": 1, "optimizer": {"name": "Adam", "lr": 1.0e-3}}
# The conv net's head, as in specs/cnn_local.yaml: one 3x3 convolution of 32 channels (the next block's width),
# average pooling, linear. 256 channels on the first block's 14x14 maps would cost 2.7x backprop's step.
CONV_LOCAL_HEAD = {"head": "conv", "hidden": 32}
# "delayed{d}_{weights}" (issue 16) is one cut at the same place as "local", with `delayed_gradient: {delay: d,
# weights: ...}`: the stages before it step with the true gradient of the batch they ran d steps before.
# "frozen" is a reference point, not a method: exact cuts, but the hidden stages' clocks never tick, so only the
# output layer learns, on top of the randomly initialised hidden layers. A synthetic gradient that is no better
# than no gradient at all ends up about here.

# ----------------------------------------------------------------------------------------- settings
# Everything below is plain spec content: the benchmark tunes nothing outside the spec.
# The stage optimizer (and its schedule) is the same for every method of a row.
STAGE_OPTIMIZER = {
    "name": "Adam",
    "lr": 3.0e-4,
    "scheduler": {"name": "CosineAnnealingLR", "T_max": None},  # T_max: filled in with --steps
}
BATCH_SIZE = 512
# Synthetic-gradient models. MLP boundaries are (B, 256) vectors; conv boundaries are (B, C, H, W) feature maps.
MLP_SYNTH = {"model": "linear", "optimizer": {"name": "Adam", "lr": 1.0e-3}}
# Unconditioned DNI's synthesizer learns at 30x the rate: its target drifts as the stages behind it learn, and
# a slow synthesizer lags it (negative cosines at the first cut). Measured at 6000 steps, test error of mlp3 /
# mlp4 DNI: Adam 1e-5: 26.9 / -, 1e-4: 24.0 / 26.0, 1e-3: 18.6 / 20.9, 1e-2: 16.0 / 17.8, 3e-2: 16.0 / 17.3,
# 1e-1: 16.3 / 17.8; an MLP synthesizer (1 hidden layer of 1024) at 1e-3: 20.0 / 23.0, at 1e-2: 15.1 / 16.4 (the
# default). cDNI goes the other way (linear at 3e-2: 12.2 / 12.7 against 10.4 / 10.6 at 1e-3), so each keeps its own.
DNI_MLP_SYNTH = {"model": "mlp", "hidden": 1024, "layers": 1, "optimizer": {"name": "Adam", "lr": 1.0e-2}}
# DNI's last cut learns from the true gradient, whose part a synthesizer without labels can predict is small
# beside the label noise; a slower synthesizer there averages more of it. MLP 4 layers, batches of 512, stages at
# Adam 3e-4, seed 0: last cut at 1e-2 (as the others) 14.32, 3e-3 13.87, 1e-3 14.39.
DNI_LAST_SYNTH = {"model": "mlp", "hidden": 1024, "layers": 1, "optimizer": {"name": "Adam", "lr": 3.0e-3}}
CONV_SYNTH = {"model": "conv", "layers": 0, "kernel_size": 5, "optimizer": {"name": "Adam", "lr": 1.0e-4}}
CLOCK_PROBABILITY = 0.2


def stage_optimizer(updates: int, base: dict | None = None) -> dict:
    """The stage optimizer, its cosine schedule spanning `updates` optimizer steps (schedulers step on ticks)."""
    opt = copy.deepcopy(base or STAGE_OPTIMIZER)
    sched = opt.get("scheduler")
    if sched is not None and "T_max" in sched:
        sched["T_max"] = max(1, updates)
    return opt


def synth_config(arch: str, method: str, mlp_synth: dict, conv_synth: dict, dni_mlp_synth: dict) -> dict | None:
    if method in ("backprop", "frozen", "local") or method in DELAYED:
        return None
    if arch == "cnn":
        sg = copy.deepcopy(conv_synth)
    else:
        sg = copy.deepcopy(dni_mlp_synth if method == "dni" else mlp_synth)
    sg["condition_on_labels"] = method.startswith("cdni")
    return sg


def dni_last_synth_config(given: dict | None) -> dict | None:
    """DNI's last-cut synthesizer: None given -> the default; {} (`--dni-last-synth null`) -> none of its own."""
    if given is None:
        return DNI_LAST_SYNTH
    return given or None


def build_spec(
    arch: str,
    depth: int,
    method: str,
    steps: int,
    batch_size: int,
    mlp_synth: dict | None = None,
    conv_synth: dict | None = None,
    optimizer: dict | None = None,
    dni_mlp_synth: dict | None = None,
    dni_last_synth: dict | None = None,
) -> dict:
    """The spec (as a dict) of one run: a cut after every hidden layer (mlp) or conv block (cnn)."""
    sg = synth_config(arch, method, mlp_synth or MLP_SYNTH, conv_synth or CONV_SYNTH, dni_mlp_synth or DNI_MLP_SYNTH)
    if arch == "cnn":
        # channels-last conv weights: the same numbers, 1.5-1.9x faster per step on one core (examples/cnn.py)
        prefix, inputs, model_args = "blocks", [batch_size, 1, 28, 28], {"channels_last": True}
    else:
        prefix, inputs, model_args = "layers", [batch_size, 784], {"depth": depth, "hidden": 256}
    stages: dict = {"default": {"optimizer": stage_optimizer(steps, optimizer)}}
    if method.endswith("_p0.2"):
        # every stage updates with probability p per step: about p * steps updates, over which the lr anneals
        stages["default"] = {
            "optimizer": stage_optimizer(round(CLOCK_PROBABILITY * steps), optimizer),
            "clock": {"probability": CLOCK_PROBABILITY},
        }
    if method == "frozen":
        for i in range(depth):  # the hidden stages never tick; the last stage (the output layer) does
            stages[i] = {"clock": {"offset": steps}}
    last_sg = sg
    own_last = dni_last_synth_config(dni_last_synth)
    if method == "dni" and arch == "mlp" and own_last is not None:
        last_sg = {**copy.deepcopy(own_last), "condition_on_labels": False}
    cuts = []
    for i in range(depth):
        cut: dict = {"after": f"{prefix}.{i}"}
        if sg is not None:
            cut["synthetic_gradient"] = copy.deepcopy(last_sg if i == depth - 1 else sg)
        cuts.append(cut)
    if method == "local":  # one cut, with a local loss; the stages on each side are one locked group each
        middle = max(depth // 2 - 1, 0)
        head = {**LOCAL_HEAD, **CONV_LOCAL_HEAD} if arch == "cnn" else LOCAL_HEAD
        cuts = [{"after": f"{prefix}.{middle}", "local_loss": copy.deepcopy(head)}]
    if method in DELAYED:  # one cut, where "local" has its own
        delay, weights = int(method[7]), method.split("_")[1]
        cuts = [
            {"after": f"{prefix}.{max(depth // 2 - 1, 0)}", "delayed_gradient": {"delay": delay, "weights": weights}}
        ]
    return {
        "model": "build_model",
        "model_args": model_args,
        "inputs": {"x": {"shape": inputs, "dtype": "float32"}},
        "cuts": cuts,
        "stages": stages,
        "loss": "cross_entropy",
        "data": "fashion-mnist",
        "train": {"steps": steps, "batch_size": batch_size},
    }


def experiments() -> list[dict]:
    """Every run of the table but the seed: mlp{3..6} x every method, cnn x backprop, DNI, cDNI, local, delayed."""
    exps = []
    for depth in DEPTHS:
        for method in METHODS:
            exps.append({"row": f"mlp{depth}", "arch": "mlp", "depth": depth, "method": method})
    for method in ("backprop", "dni", "cdni", "local", *DELAYED):  # local and delayed: one cut after the first block
        exps.append({"row": "cnn", "arch": "cnn", "depth": 3, "method": method})
    return exps


def select(exps: list[dict], only: list[str] | None) -> list[dict]:
    """Keep runs whose row, method or `row/method` matches one of the --only patterns (shell-style globs)."""
    if not only:
        return exps
    keep = []
    for e in exps:
        names = (e["row"], e["method"], f"{e['row']}/{e['method']}")
        if any(fnmatch.fnmatchcase(n, pat) for pat in only for n in names):
            keep.append(e)
    return keep


# ----------------------------------------------------------------------------------------- one run
_DATA = None


def _load_example(name: str):
    path = REPO / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _init_worker(data_dir: str) -> None:
    global _DATA
    import torch

    torch.set_num_threads(1)
    from dnicompile.train.data import load_fashion_mnist

    _DATA = load_fashion_mnist(data_dir)


def run_one(job: dict, configure=None) -> dict:
    """Train one (row, method, seed) and return its record (test accuracy, curve, synthesizer cosines).
    `configure(program)`, if given, runs after compiling and before training (e.g. to set interface classes)."""
    import torch

    from dnicompile import compile_decoupled
    from dnicompile.train.loop import FitOptions, fit
    from dnicompile.train.tasks import Classification

    torch.set_num_threads(1)
    spec = job["spec"]
    module = _load_example(job["arch"])
    torch.manual_seed(job["seed"])
    model = module.build_model(**spec["model_args"])
    program = compile_decoupled(model, spec)
    if configure is not None:
        configure(program)
    opts = FitOptions(
        steps=job["steps"], batch_size=job["batch_size"], eval_every=job["eval_every"], seed=job["seed"], log_every=50
    )
    start = time.perf_counter()
    summary = fit(program, Classification(_DATA), opts)
    elapsed = time.perf_counter() - start
    rows = summary["rows"]
    curve = [(r["step"], r["test_accuracy"]) for r in rows if "test_accuracy" in r]
    train_rows = [r for r in rows if "cosine" in r]
    last = train_rows[-10:]
    cosine = {}
    for r in last:
        for k, v in r["cosine"].items():
            cosine.setdefault(k, []).append(v)
    ticks = [s.clock.ticks for s in program.runtime.stages]
    return {
        "row": job["row"],
        "method": job["method"],
        "seed": job["seed"],
        "steps": job["steps"],
        "batch_size": job["batch_size"],
        "test_accuracy": summary["test_accuracy"],
        "test_error": 1.0 - summary["test_accuracy"],
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        "curve": curve,
        "cosine_last": {k: sum(v) / len(v) for k, v in cosine.items()},
        "stage_updates": ticks,
        "elapsed_s": elapsed,
        "spec": spec,
    }


# ----------------------------------------------------------------------------------------- table
def _fmt(errors: list[float]) -> str:
    if not errors:
        return "–"
    mean = 100 * statistics.fmean(errors)
    if len(errors) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(errors):.2f}"


def markdown_table(records: list[dict]) -> str:
    """Test error (%) per row and method, mean ± std over seeds; gaps to backprop in points."""
    rows = [r for r in dict.fromkeys(rec["row"] for rec in records)]
    order = {f"mlp{d}": i for i, d in enumerate(DEPTHS)} | {"cnn": len(DEPTHS)}
    rows.sort(key=lambda r: order.get(r, 99))
    methods = [m for m in METHODS if any(rec["method"] == m for rec in records)]
    by = {}
    for rec in records:
        by.setdefault((rec["row"], rec["method"]), []).append(rec["test_error"])
    head = ["net"] + [METHOD_TITLES[m] for m in methods]
    gaps = [m for m in ("dni", "cdni", "local", *DELAYED) if m in methods and "backprop" in methods]
    head += [f"{METHOD_TITLES[m]} − backprop" for m in gaps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        title = f"MLP, {row[3:]} hidden layers" if row.startswith("mlp") else "CNN, 3 conv blocks"
        cells = [title] + [_fmt(by.get((row, m), [])) for m in methods]
        for m in gaps:
            a, b = by.get((row, m)), by.get((row, "backprop"))
            cells.append(f"{100 * (statistics.fmean(a) - statistics.fmean(b)):+.2f}" if a and b else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main
def _json_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _json_or_null_arg(text: str) -> dict:
    """A JSON object, or `null` for "none of its own" (returned as {})."""
    if text.strip() == "null":
        return {}
    return _json_arg(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Fashion-MNIST directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=6000, help="training steps per run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="batch size (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; the table shows mean ± std")
    p.add_argument("--eval-every", type=int, default=1000, help="test-set evaluation interval (default: %(default)s)")
    p.add_argument("--out", default=None, help="results JSON path (written after every finished run)")
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="run only these rows / methods / row/method, shell globs,\n"
        "e.g. --only mlp3 mlp4, --only cdni, --only 'mlp*/backprop' cnn",
    )
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each (default: %(default)s)")
    p.add_argument(
        "--mlp-synth",
        type=_json_arg,
        default=None,
        metavar="JSON",
        help=f"MLP synthetic-gradient spec of cDNI, replacing the default\n{json.dumps(MLP_SYNTH)}",
    )
    p.add_argument(
        "--dni-mlp-synth",
        type=_json_arg,
        default=None,
        metavar="JSON",
        help=f"MLP synthetic-gradient spec of DNI, replacing the default\n{json.dumps(DNI_MLP_SYNTH)}",
    )
    p.add_argument(
        "--dni-last-synth",
        type=_json_or_null_arg,
        default=None,
        metavar="JSON",
        help="MLP synthetic-gradient spec of DNI's last cut (the one that learns from the true gradient),\n"
        f"replacing the default {json.dumps(DNI_LAST_SYNTH)} (null: the same as the other cuts)",
    )
    p.add_argument(
        "--conv-synth",
        type=_json_arg,
        default=None,
        metavar="JSON",
        help=f"conv synthetic-gradient spec, replacing the default\n{json.dumps(CONV_SYNTH)}",
    )
    p.add_argument(
        "--stage-optimizer",
        type=_json_arg,
        default=None,
        metavar="JSON",
        help=f"stage optimizer spec for every method, replacing the default\n{json.dumps(STAGE_OPTIMIZER)}",
    )
    p.add_argument("--list", action="store_true", help="list the selected runs and exit")
    p.add_argument(
        "--table-from",
        nargs="+",
        default=None,
        metavar="JSON",
        help="print the table of earlier results files (merged; seeds pool; a later file's run replaces an\n"
        "earlier one's of the same row, method and seed) and exit, running nothing",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table_from:
        # a later file's run replaces an earlier one's of the same row, method and seed (a rerun with new settings)
        latest = {}
        for f in args.table_from:
            for r in json.loads(Path(f).read_text())["runs"]:
                latest[(r["row"], r["method"], r["seed"])] = r
        records = list(latest.values())
        records = [r for r in records if r in select(records, args.only)]
        print(markdown_table(records))
        return 0
    exps = select(experiments(), args.only)
    if not exps:
        print(f"--only {' '.join(args.only)} selects no run; rows: mlp3..mlp6, cnn; methods: {', '.join(METHODS)}")
        return 2
    jobs = []
    for e in exps:
        for seed in args.seeds:
            spec = build_spec(
                e["arch"],
                e["depth"],
                e["method"],
                args.steps,
                args.batch_size,
                args.mlp_synth,
                args.conv_synth,
                args.stage_optimizer,
                args.dni_mlp_synth,
                args.dni_last_synth,
            )
            jobs.append({**e, "seed": seed, "steps": args.steps, "batch_size": args.batch_size, "spec": spec})
    # the slowest runs first, so that the two workers finish at about the same time
    jobs.sort(key=lambda j: (j["arch"] != "cnn", j["method"] == "backprop", -j["depth"]))
    if args.list:
        for j in jobs:
            print(f"{j['row']}/{j['method']} seed {j['seed']}")
        return 0
    from dnicompile.train.data import load_fashion_mnist

    load_fashion_mnist(args.data)  # fail early, in the parent, on a bad --data
    for j in jobs:
        j["eval_every"] = args.eval_every
    out = Path(args.out) if args.out else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
        "jobs": args.jobs,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "stage_optimizer": stage_optimizer(args.steps, args.stage_optimizer),
        "mlp_synthesizer": args.mlp_synth or MLP_SYNTH,
        "dni_mlp_synthesizer": args.dni_mlp_synth or DNI_MLP_SYNTH,
        "dni_last_synthesizer": dni_last_synth_config(args.dni_last_synth),
        "conv_synthesizer": args.conv_synth or CONV_SYNTH,
        "clock_probability": CLOCK_PROBABILITY,
    }
    records: list[dict] = []
    start = time.perf_counter()

    def save() -> None:
        if out is None:
            return
        meta["elapsed_s"] = time.perf_counter() - start
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps({"meta": meta, "runs": records}, indent=1) + "\n")
        os.replace(tmp, out)

    print(f"{len(jobs)} runs, {args.jobs} at a time, {args.steps} steps of batch {args.batch_size}", flush=True)
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(args.jobs, initializer=_init_worker, initargs=(args.data,))
    try:
        for rec in pool.imap_unordered(run_one, jobs):
            records.append(rec)
            save()
            print(
                f"[{time.perf_counter() - start:7.0f}s] {rec['row']}/{rec['method']} seed {rec['seed']}: "
                f"test error {100 * rec['test_error']:.2f}% ({rec['elapsed_s']:.0f}s)",
                flush=True,
            )
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    save()
    print()
    print(markdown_table(records))
    print(f"\ntotal {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
