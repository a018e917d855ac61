"""Peak resident memory of one-process training for each kind of cut (issue 16, "Memory"; BENCHMARKS.md).

examples/wide_mlp.py (--depth fully connected layers of width 1024, 16 by default as in the race) cut once in the
middle (after layers.{depth/2 - 1}, as benchmarks/throughput.py places it), trained by the dnicompile local
runtime (`program.train_step`, 1 thread) for --steps steps on random batches of 256 (memory does not depend on
the data's values, and loading Fashion-MNIST would add the same 200 MiB to every contender). Contenders:

  plain         plain PyTorch backprop, no dnicompile (the reference)
  exact         specs/wide_mlp_backprop.yaml (an exact cut)
  cdni          specs/wide_mlp_dni.yaml (a conditioned synthesizer at the cut)
  local         specs/wide_mlp_local.yaml (a linear head at the cut)
  delayed-W-dD  specs/wide_mlp_delayed.yaml with `delayed_gradient: {delay: D, weights: W}`, W in stash / current
                / recompute, D in 1, 3; W = predict: stash with `predict: linear` (one more copy of the weights)

Each run is a fresh process. It reports the peak resident set size over its whole life (getrusage ru_maxrss), the
resident size right before the first training step (model, program, optimizers' empty state and the batches
built), and their difference, the training's own peak: gradients, the optimizers' state, activations and, for a
delayed cut, what the pending batches keep. Figures are medians of --reps runs, contenders interleaved.

`--workers 2`: the same program on 2 ranks (gloo, one process each, stage 0 on rank 0 and stage 1 on rank 1, as in
the race), each rank's figures on its own (`plain` is not run): what each machine or GPU of a pipeline would hold.

    python benchmarks/memory.py [--depth 16] [--steps 12] [--reps 3] [--workers 1|2] [--json benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import throughput  # noqa: E402  (spec_for: the same specs and cut positions as the race)

KINDS = {"exact": "backprop", "cdni": "dni", "local": "local"}
CONTENDERS = ["plain", "exact", "cdni", "local"] + [
    f"delayed-{w}-d{d}" for d in (1, 3) for w in ("stash", "current", "recompute", "predict")
]


def rss_mib() -> float:
    """Resident set size now (/proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def spec_path(name: str, depth: int, folder: Path) -> Path:
    throughput.DEPTH = depth
    if name in KINDS:
        return throughput.spec_for(KINDS[name], 2, 10, folder)
    _, weights, d = name.split("-")
    text = throughput.SPECS["delayed"].read_text()
    old = re.search(r"delayed_gradient: \{[^}]*\}", text)
    assert old, "specs/wide_mlp_delayed.yaml changed: update memory.py"
    config = "weights: stash, predict: linear" if weights == "predict" else f"weights: {weights}"
    source = folder / f"src-{name}.yaml"
    source.write_text(text.replace(old.group(0), f"delayed_gradient: {{delay: {d[1:]}, {config}}}"))
    return throughput.spec_for("delayed", 2, 10, folder, source=source)


def _setup(args):
    """The model (seed 0), 4 random batches of 256, and for a dnicompile contender its program (None for plain)."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "examples"))
    from wide_mlp import build_model

    torch.manual_seed(0)
    model = build_model(depth=args.depth)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(256, 784, generator=gen), torch.randint(0, 10, (256,), generator=gen)) for _ in range(4)]
    if args.child == "plain":
        return model, batches, None
    from dnicompile import compile_decoupled
    from dnicompile.spec import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(spec_path(args.child, args.depth, Path(tmp)))
    program = compile_decoupled(model, spec)
    program.train()
    if args.no_measure:  # no cosine(stale, fresh) every 10th step: its extra forward, backward and clones
        for iface in program.runtime.interfaces:
            iface.measure_every = None
    return model, batches, program


def _measure(step, batches, steps: int) -> dict:
    """Run `steps` steps and report the resident sizes before and at the peak."""
    before = rss_mib()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i, *batches[i % len(batches)])
    seconds = time.perf_counter() - t0
    peak = peak_mib()
    return {"peak_mib": peak, "before_mib": before, "training_mib": peak - before, "s_per_step": seconds / steps}


def _rank(rank: int, store: str, args, out: str) -> None:
    """One rank of a 2-worker run: its own resident sizes, written to out/rank<rank>.json."""
    import torch.distributed as dist

    from dnicompile.runtime.distributed import distributed_runtime

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        _, batches, program = _setup(args)
        worker = distributed_runtime(program, placement=[[0], [1]])

        def step(i, x, y):
            worker.train_step(i, x, y)
            if i == args.steps - 1:
                worker.drain()

        result = _measure(step, batches, args.steps)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def child_workers(args) -> dict:
    """A 2-worker run of the contender: {"rank0": {...}, "rank1": {...}}."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(str(Path(tmp) / "store"), args, tmp), nprocs=2, join=True)
        return {f"rank{r}": json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)}


def child(args) -> dict:
    if args.workers == 2:
        return child_workers(args)
    import torch
    import torch.nn.functional as F

    model, batches, program = _setup(args)
    if program is None:  # plain PyTorch
        opt = torch.optim.Adam(model.parameters(), lr=3e-4, fused=True)

        def step(i, x, y):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    else:

        def step(i, x, y):
            program.train_step(x, y)

    return _measure(step, batches, args.steps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", nargs="*", help="contenders (default: all)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    p.add_argument(
        "--no-measure",
        action="store_true",
        help="delayed cuts: no stale-fresh cosine (delayed_gradient.measure_every = null)",
    )
    p.add_argument("--workers", type=int, choices=(1, 2), default=1, help="one process, or 2 ranks (per-rank figures)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    names = args.only or [n for n in CONTENDERS if not (args.workers == 2 and n == "plain")]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs: dict[str, list] = {}
    loads = [os.getloadavg()[0]]
    began = time.perf_counter()
    for rep in range(args.reps):
        for name in names:
            argv = [sys.executable, __file__, "--child", name, "--depth", str(args.depth), "--steps", str(args.steps)]
            argv += ["--no-measure"] if args.no_measure else []
            argv += ["--workers", str(args.workers)]
            r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            if r.returncode or not lines:
                raise SystemExit(f"{name} failed ({r.returncode}):\n{r.stderr[-3000:]}")
            got = json.loads(lines[-1][len("RESULT ") :])
            loads.append(os.getloadavg()[0])
            for key, out in got.items() if args.workers == 2 else [(name, got)]:
                key = f"{name} {key}" if args.workers == 2 else name
                runs.setdefault(key, []).append(out)
                print(
                    f"rep {rep + 1}/{args.reps} {key}: peak {out['peak_mib']:.0f} MiB, before training "
                    f"{out['before_mib']:.0f}, training {out['training_mib']:.0f} ({out['s_per_step']:.2f} s/step)",
                    flush=True,
                )
    # the weights of the stage before the cut: what one stashed copy costs
    half = args.depth // 2
    stage0 = (784 * 1024 + 1024 + (half - 1) * (1024 * 1024 + 1024)) * 4 / 2**20
    table = {
        n: {k: statistics.median(r[k] for r in rs) for k in ("peak_mib", "before_mib", "training_mib", "s_per_step")}
        for n, rs in runs.items()
    }
    result = {
        "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "depth": args.depth,
        "steps": args.steps,
        "reps": args.reps,
        "no_measure": args.no_measure,
        "workers": args.workers,
        "stage0_weights_mib": stage0,
        "load_min": min(loads),
        "load_max": max(loads),
        "total_s": time.perf_counter() - began,
        "median": table,
        "runs": runs,
    }
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nstage 0's weights: {stage0:.1f} MiB; load {min(loads):.1f}-{max(loads):.1f}")
    print("| contender | peak RSS (MiB) | before training | training peak | - exact | s/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for n, t in table.items():
        rank = n.split(" ")[1] if args.workers == 2 else None
        ref = table.get(f"exact {rank}" if rank else "exact", t)
        print(
            f"| {n} | {t['peak_mib']:.0f} | {t['before_mib']:.0f} | {t['training_mib']:.0f} | "
            f"{t['peak_mib'] - ref['peak_mib']:+.0f} | {t['s_per_step']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
