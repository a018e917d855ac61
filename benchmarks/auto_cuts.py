"""How even are the stages `cuts: {auto: ...}` makes? (BENCHMARKS.md, "Automatic cuts".)

For each model, each number of stages S and each `balance`, compile with automatic exact cuts and report the
slowest stage against the mean: by the cost the cuts were chosen by (what the DP optimised), and by time
measured afterwards on the compiled program's stages (forward + backward of each on the example batch, the
fastest of --reps runs; the program's own stages, not the pieces the cuts were chosen from).
Hand-placed cuts from specs/ (made exact) are measured the same way where a spec has that many stages.

Run from the repository root:  python benchmarks/auto_cuts.py [--reps 5] [--models wide_mlp,resnet,hf_gpt2]

`--throughput`: 2-worker throughput (the CLI, `--workers 2 --threads 1`, on the example's data) with 2 stages cut
by hand and by `auto` (flops, time), every contender's cut a local loss with a linear head (THROUGHPUT_KIND:
nothing is sent back across it, so each rank runs at its own stage's pace and the slower stage sets the rate).
Hand-placed: the shipped 2-stage spec's cut (wide MLP `layers.3`, GPT-2 `transformer.h.1`) and, for ResNet, whose
shipped spec has 4 stages, the middle one of its 3 cuts (`blocks.1.bn1`). GPT-2 is left out: its example trains
in one process (examples/hf_gpt2.py), and at S = 2 every balance cuts it where the shipped spec does. Samples/s over the training steps after
the first log line (start-up and first steps excluded), contenders interleaved, median of --reps:

    python benchmarks/auto_cuts.py --throughput [--reps 3] [--steps 60] [--json benchmarks/results/auto_cuts_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from dnicompile import compile_decoupled  # noqa: E402
from dnicompile.compile.model_file import build_model  # noqa: E402
from dnicompile.spec import load_spec  # noqa: E402

THROUGHPUT_KIND = {"local_loss": {"head": "linear", "optimizer": {"name": "Adam", "lr": 1.0e-3}}}
HAND_2 = {"wide_mlp": "layers.3", "resnet": "blocks.1.bn1", "hf_gpt2": "transformer.h.1"}
DATA = {"wide_mlp": "fashion-mnist", "resnet": "fashion-mnist"}  # hf_gpt2 trains from its own script, one process
MODELS = {  # model file, base spec (its inputs, model_args, loss), hand-placed specs by number of stages
    "wide_mlp": ("examples/wide_mlp.py", "specs/wide_mlp_backprop.yaml", {2: "specs/wide_mlp_dni.yaml"}),
    "resnet": ("examples/resnet.py", "specs/resnet.yaml", {4: "specs/resnet.yaml"}),
    "hf_gpt2": ("examples/hf_gpt2.py", "specs/hf_gpt2_local.yaml", {2: "specs/hf_gpt2_local.yaml"}),
}


def ratio(costs: list[float]) -> float:
    """The slowest stage over the mean stage: 1.0 is perfect, S means one stage holds everything."""
    return max(costs) / (sum(costs) / len(costs))


def measured(program, reps: int) -> list[float]:
    """Seconds of forward + backward of each stage of the compiled program on its example batch: the fastest of
    `reps` runs after a warm-up (other work on a shared machine only adds time). Gradients and batch-norm
    statistics are put back afterwards."""
    saved = {k: v.detach().clone() for k, v in program.model.state_dict().items()}
    best = [float("inf")] * program.num_stages
    try:
        for r in range(reps + 1):
            values = program.example_inputs
            for i, stage in enumerate(program.stages):
                ins = tuple(v.detach().requires_grad_(i > 0) if v.is_floating_point() else v for v in values)
                start = time.perf_counter()
                out = stage(*ins)
                leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
                torch.autograd.backward(leaves, [torch.ones_like(t) for t in leaves])
                if r:
                    best[i] = min(best[i], time.perf_counter() - start)
                values = tuple(o.detach() for o in out) if i < program.num_stages - 1 else ()
    finally:
        program.model.load_state_dict(saved)
        for p in program.model.parameters():
            p.grad = None
    return best


def throughput_run(name: str, contender: str, steps: int, data_root: Path, folder: Path) -> dict:
    """One 2-worker CLI run of `name` with the cut of `contender` (hand, flops, time); samples/s after the first
    metrics line."""
    path, base, _ = MODELS[name]
    spec = yaml.safe_load((ROOT / base).read_text())
    if contender == "hand":
        spec["cuts"] = [{"after": HAND_2[name], **THROUGHPUT_KIND}]
    else:
        spec["cuts"] = {"auto": {"stages": 2, "balance": contender, "kind": THROUGHPUT_KIND}}
    spec_file = folder / f"{name}-{contender}.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    metrics = folder / f"{name}-{contender}.jsonl"
    metrics.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "dnicompile", str(ROOT / path), "--spec", str(spec_file), "--train"]
    argv += ["--data", str(data_root / DATA[name]), "--steps", str(steps), "--eval-every", str(10 * steps)]
    argv += ["--log-every", "10", "--workers", "2", "--threads", "1", "--metrics", str(metrics)]
    start = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    wall = time.perf_counter() - start
    if r.returncode:
        raise SystemExit(f"{name} {contender} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    timed = [x for x in lines if "train_s" in x and "test_accuracy" not in x]
    first, last = timed[0], timed[-1]
    batch = spec.get("train", {}).get("batch_size") or next(iter(spec["inputs"].values()))["shape"][0]
    rate = (last["step"] - first["step"]) * batch / (last["train_s"] - first["train_s"])
    cuts = sorted({c for x in timed for c in x.get("synth_loss", {})})  # the local head's loss, by cut name
    cpu = [statistics.median(x["cpu_ms_per_step"][r] for x in timed[1:] or timed) for r in range(2)]
    return {"samples_per_s": rate, "wall_s": wall, "cut": cuts, "cpu_ms_per_step": cpu, "load": os.getloadavg()[0]}


def throughput(args) -> None:
    rows: dict[tuple, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name in [m for m in args.models.split(",") if m in DATA]:
                for contender in ("hand", "flops", "time"):
                    got = throughput_run(name, contender, args.steps, Path(args.data_root), Path(tmp))
                    rows.setdefault((name, contender), []).append(got)
                    print(f"rep {rep + 1} {name} {contender}: {json.dumps(got)}", flush=True)
    table = []
    for (name, contender), runs in rows.items():
        hand = statistics.median(r["samples_per_s"] for r in rows[(name, "hand")])
        median = statistics.median(r["samples_per_s"] for r in runs)
        table.append(
            {
                "model": name,
                "contender": contender,
                "cut": runs[0]["cut"],
                "samples_per_s": [round(r["samples_per_s"], 1) for r in runs],
                "median": round(median, 1),
                "against_hand": round(median / hand, 3),
                "cpu_ms_per_step": [[round(c, 1) for c in r["cpu_ms_per_step"]] for r in runs],
                "load": [round(r["load"], 2) for r in runs],
            }
        )
    print("| model | cuts by | cut | samples/s (median) | against hand | per rep | CPU ms/step of the 2 ranks | load |")
    print("|---|---|---|---:|---:|---|---|---|")
    for t in table:
        cpu = " / ".join(f"{a:.0f}+{b:.0f}" for a, b in t["cpu_ms_per_step"])
        print(
            f"| {t['model']} | {t['contender']} | {', '.join(f'`{c}`' for c in t['cut'])} | {t['median']} | "
            f"{t['against_hand']:.3f} | {' / '.join(map(str, t['samples_per_s']))} | {cpu} | {t['load']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": table}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--throughput", action="store_true", help="2-worker throughput, hand against auto cuts")
    ap.add_argument("--steps", type=int, default=60, help="--throughput: training steps per run")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"), help="--throughput: data folder")
    ap.add_argument("--models", default="wide_mlp,resnet,hf_gpt2")
    ap.add_argument("--stages", default="2,4")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    if args.throughput:
        return throughput(args)
    torch.set_num_threads(1)  # as each worker of `--workers S` on a small machine; steadier under load
    rows = []
    for name in args.models.split(","):
        path, base, hand = MODELS[name]
        data = load_spec(ROOT / base).model_dump(exclude_unset=True)
        for s in map(int, args.stages.split(",")):
            for balance in ("flops", "params", "time"):
                spec = dict(data, cuts={"auto": {"stages": s, "balance": balance}})
                spec.pop("data", None)
                model = build_model(str(ROOT / path), data.get("model"), data.get("model_args", {}))
                start = time.perf_counter()
                program = compile_decoupled(model, spec)
                compile_s = time.perf_counter() - start
                plan = program.cut_plan
                chosen = plan.stage_costs()
                t = measured(program, args.reps)
                row = {
                    "model": name,
                    "stages": s,
                    "balance": balance,
                    "cuts": [c.after for c in program.spec.cuts],
                    "candidates": len(plan.candidates),
                    "by_cost": round(ratio(chosen), 3),
                    "by_time": round(ratio(t), 3),
                    "stage_ms": [round(1e3 * x, 1) for x in t],
                    "compile_s": round(compile_s, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            if s in hand:
                written = load_spec(ROOT / hand[s])  # its cut points, made exact, as the auto ones are
                spec = dict(data, cuts=[{"after": c.after} for c in written.cuts])
                spec.pop("data", None)
                model = build_model(str(ROOT / path), data.get("model"), data.get("model_args", {}))
                program = compile_decoupled(model, spec)
                t = measured(program, args.reps)
                row = {
                    "model": name,
                    "stages": s,
                    "balance": "hand",
                    "cuts": [c.after for c in program.spec.cuts],
                    "by_time": round(ratio(t), 3),
                    "stage_ms": [round(1e3 * x, 1) for x in t],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
