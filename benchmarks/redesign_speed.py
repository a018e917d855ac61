"""Speed before and after a change of the runtime: two checkouts of dnicompile, measured in one run, interleaved.

For each repetition and each checkout (alternating which goes first), three contenders of benchmarks/throughput.py,
each a fresh process run by that checkout's own throughput.py (so each uses its own dnicompile):
  (a) plain PyTorch backprop, one process, 1 thread (the reference of the run)
  (d) the local runtime's train_step, cDNI spec, 1 thread
  (e) the distributed runtime, cDNI spec, 2 workers of 1 thread (the CLI)
The report gives medians in samples/s and each contender over (a) of the same checkout.

    git worktree add ../before 003c5c4
    python benchmarks/redesign_speed.py --before ../before --after . --depth 16 --reps 5 \\
        --json benchmarks/results/redesign_speed.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

CONTENDERS = ("a_plain", "d_local_dni", "e_distributed_dni")


def _load(tree: Path, name: str):
    """A checkout's benchmarks/throughput.py as a module: its ROOT, specs and children are that checkout's."""
    spec = importlib.util.spec_from_file_location(name, tree / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one(tp, contender: str, args, tmp: Path) -> float:
    if contender == "a_plain":
        return tp.run_child("plain", args, threads=1)["samples_per_s"]
    spec = tp.spec_for("dni", 2, 5, tmp)
    if contender == "d_local_dni":
        return tp.run_child("local", args, spec=spec)["samples_per_s"]
    return tp.run_distributed(spec, 2, args, tmp)["samples_per_s"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="checkout of the code before the change")
    p.add_argument("--after", default=".", help="checkout of the code after the change")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--queue-depth", type=int, default=4)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"))
    p.add_argument("--json", help="write the runs here")
    args = p.parse_args(argv)
    args.threads, args.seed, args.microbatches = 1, 0, 4
    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    modules = {}
    for label, tree in trees.items():
        tp = _load(tree, f"throughput_{label}")
        tp.DEPTH, tp.QUEUE_DEPTH = args.depth, args.queue_depth
        modules[label] = tp
    runs = {label: {c: [] for c in CONTENDERS} for label in trees}
    with tempfile.TemporaryDirectory(prefix="dni-redesign-") as tmp_name:
        for rep in range(args.reps):
            order = list(trees) if rep % 2 == 0 else list(trees)[::-1]
            for contender in CONTENDERS:
                for label in order:
                    value = _one(modules[label], contender, args, Path(tmp_name))
                    runs[label][contender].append(value)
                    print(f"rep {rep + 1}/{args.reps} {label:6s} {contender}: {value:.0f} samples/s", flush=True)
    print(f"\nmedians over {args.reps} interleaved runs, depth {args.depth}, batch {args.batch_size}:")
    print("| contender | before | after | after / before | before / (a) | after / (a) |")
    print("|---|---:|---:|---:|---:|---:|")
    med = {label: {c: statistics.median(v) for c, v in r.items()} for label, r in runs.items()}
    for c in CONTENDERS:
        b, a = med["before"][c], med["after"][c]
        rb, ra = b / med["before"]["a_plain"], a / med["after"]["a_plain"]
        print(f"| {c} | {b:.0f} | {a:.0f} | {a / b:.3f} | {rb:.2f} | {ra:.2f} |")
    if args.json:
        out = {"command": "python benchmarks/redesign_speed.py " + " ".join(argv or sys.argv[1:]), "args": vars(args)}
        out.update(trees={k: str(v) for k, v in trees.items()}, runs=runs, medians=med)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
