"""How even are the stages `cuts: {auto: ...}` makes? (BENCHMARKS.md, "Automatic cuts".)

For each model, each number of stages S and each `balance`, compile with automatic exact cuts and report the
slowest stage against the mean: by the cost the cuts were chosen by (what the DP optimised), and by time
measured afterwards on the compiled program's stages (forward + backward of each on the example batch, the
fastest of --reps runs; the program's own stages, not the pieces the cuts were chosen from).
Hand-placed cuts from specs/ (made exact) are measured the same way where a spec has that many stages.

Run from the repository root:  python benchmarks/auto_cuts.py [--reps 5] [--models wide_mlp,resnet,hf_gpt2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from dnicompile import compile_decoupled  # noqa: E402
from dnicompile.compile.model_file import build_model  # noqa: E402
from dnicompile.spec import load_spec  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--models", default="wide_mlp,resnet,hf_gpt2")
    ap.add_argument("--stages", default="2,4")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
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
