"""Stage options against plain fp32 eager stages (issue 20; BENCHMARKS.md, "Stage options: bf16 and torch.compile").

Each contender is one run of the public CLI on Fashion-MNIST, in a fresh process of 1 thread, with the shipped
all-exact spec and one `--set` on every stage:

  fp32           the spec as shipped (eager, fp32)
  bf16           --set stages.default.precision=bf16   (torch.autocast(bfloat16) on CPU; fp32 weights)
  compile        --set stages.default.compile=true     (torch.compile, inductor)
  bf16+compile   both

for `examples/mlp.py` (specs/mlp_backprop.yaml: 4 hidden layers of 256, batch 128, 4 exact cuts) and
`examples/wide_mlp.py` (specs/wide_mlp_backprop.yaml: 8 layers of 1024, batch 256, one exact cut). Runs are
interleaved (rep 1 of every contender, then rep 2, ...) and the figures are medians over --reps:

- samples/s in the steady state: training samples between the log line at --warmup steps and the last log line,
  over the training time between them (`train_s` of metrics.jsonl, which leaves out evaluation). Compilation
  happens before the warm-up line, so it is not in the rate; it is reported apart as `first_s` (the training
  time to the first log line);
- the test accuracy after --steps steps (the whole test set, from metrics.jsonl's last line);
- the process's wall time.

    python benchmarks/stage_options.py [--reps 3] [--steps 1000] [--json benchmarks/results/stage_options.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (machine(), load(), env(): the same records as the other benchmarks)

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "mlp": ("examples/mlp.py", "specs/mlp_backprop.yaml"),
    "wide_mlp": ("examples/wide_mlp.py", "specs/wide_mlp_backprop.yaml"),
}
CONTENDERS = {
    "fp32": (),
    "bf16": ("stages.default.precision=bf16",),
    "compile": ("stages.default.compile=true",),
    "bf16+compile": ("stages.default.precision=bf16", "stages.default.compile=true"),
}


def run(model: str, contender: str, args, tmp: Path) -> dict:
    source, spec = MODELS[model]
    out = tmp / f"{model}-{contender}".replace("+", "_")
    argv = [
        sys.executable, "-m", "dnicompile", source, "--spec", spec, "--train", "--threads", "1",
        "--data", args.data, "--steps", str(args.steps), "--eval-every", str(args.steps), "--log-every", "10",
        "--seed", str(args.seed), "--out", str(out), "--logger", "jsonl",
        *(a for kv in CONTENDERS[contender] for a in ("--set", kv)),
    ]  # fmt: skip
    start = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env=throughput.env(), cwd=ROOT, timeout=3600)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"{model}/{contender} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [x for x in records if "samples_per_s" in x]
    warm = next(x for x in lines if x["step"] >= args.warmup)
    last = lines[-1]
    batch = yaml.safe_load((ROOT / spec).read_text())["train"]["batch_size"]
    rate = (last["step"] - warm["step"]) * batch / (last["train_s"] - warm["train_s"])
    return {
        "samples_per_s": rate,
        "first_s": lines[0]["train_s"],
        "test_accuracy": records[-1]["test_accuracy"],
        "wall_s": wall,
        "load": throughput.load(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fashion-mnist"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=50, help="steps before the timed part (compilation included)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    results: dict = {"machine": throughput.machine(), "args": vars(args) | {"json": str(args.json)}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for model in args.models:
                for contender in args.contenders:
                    r = run(model, contender, args, Path(tmp) / f"rep{rep}")
                    results["runs"].setdefault(f"{model}/{contender}", []).append(r)
                    print(
                        f"rep {rep} {model:8s} {contender:13s} {r['samples_per_s']:8.0f} samples/s  first "
                        f"{r['first_s']:5.1f} s  test acc {r['test_accuracy']:.4f}  wall {r['wall_s']:5.1f} s  "
                        f"load {r['load']:.1f}",
                        flush=True,
                    )
                    if args.json:
                        args.json.write_text(json.dumps(results, indent=1))
    print("\n| model | contender | samples/s (median) | x fp32 | first log line (s) | test accuracy | wall (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for model in args.models:
        base = (
            statistics.median(r["samples_per_s"] for r in results["runs"][f"{model}/fp32"])
            if "fp32" in args.contenders
            else None
        )
        for contender in args.contenders:
            runs = results["runs"][f"{model}/{contender}"]
            rate = statistics.median(r["samples_per_s"] for r in runs)
            accs = " / ".join(f"{r['test_accuracy']:.4f}" for r in runs)
            ratio = f"{rate / base:.2f}" if base else "-"
            first = statistics.median(r["first_s"] for r in runs)
            wall = statistics.median(r["wall_s"] for r in runs)
            print(f"| {model} | {contender} | {rate:.0f} | {ratio} | {first:.1f} | {accs} | {wall:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
