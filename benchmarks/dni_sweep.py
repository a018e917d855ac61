"""Variants of the feed-forward table's runs, for tuning: one JSON line per finished run.

A plan is a JSON list of variants; each names a run of benchmarks/feedforward_table.py (its `build_spec` and
defaults) and what to change in it:

    {"name": "b512_inner3e-3", "depth": 4, "method": "dni", "batch": 512,
     "stage_opt": {"name": "Adam", "lr": 3e-4, "scheduler": {"name": "CosineAnnealingLR", "T_max": null}},
     "inner_synth": {"model": "mlp", "hidden": 1024, "layers": 1, "optimizer": {"name": "Adam", "lr": 3e-3}}}

Keys: name, depth, method (backprop / dni / cdni), steps (6000), batch (the table's, 512), seed (0),
stage_opt (every stage's optimizer; T_max null is filled in), last_opt (the output layer's optimizer only),
inner_synth (the inner cuts' synthesizer: DNI's or cDNI's), last_synth (DNI's last cut's), offset (a clock
offset for the hidden stages), exact (indices of cuts made exact: true gradient, no synthesizer). The synthesizers go through build_spec's own arguments.

    python benchmarks/dni_sweep.py plan.json results.jsonl [--jobs 2]

The plans and records of BENCHMARKS.md's sweeps are in benchmarks/results/dni_sweep/.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import feedforward_table as ft  # noqa: E402

RECORD_KEYS = ("name", "row", "method", "seed", "test_error", "final_train_loss", "cosine_last", "elapsed_s", "curve")


def variant(
    name,
    depth,
    method,
    steps=6000,
    batch=ft.BATCH_SIZE,
    stage_opt=None,
    offset=None,
    seed=0,
    last_opt=None,
    last_synth=None,
    inner_synth=None,
    exact=(),
) -> dict:
    """One job of feedforward_table.run_one: the table's spec with the variant's changes."""
    if last_synth is not None and method != "dni":
        raise ValueError(f"{name}: last_synth is DNI's own setting (feedforward_table's --dni-last-synth)")
    synth = (
        {"dni_mlp_synth": inner_synth, "dni_last_synth": last_synth} if method == "dni" else {"mlp_synth": inner_synth}
    )
    spec = ft.build_spec("mlp", depth, method, steps, batch, optimizer=stage_opt, **synth)
    for i in exact:
        spec["cuts"][i].pop("synthetic_gradient", None)
    if offset:
        for i in range(depth):
            spec["stages"][i] = {"clock": {"offset": offset}}
    if last_opt:
        spec["stages"][depth] = {"optimizer": ft.stage_optimizer(steps, last_opt)}
    return {
        "name": name,
        "row": f"mlp{depth}",
        "arch": "mlp",
        "depth": depth,
        "method": method,
        "seed": seed,
        "steps": steps,
        "batch_size": batch,
        "spec": spec,
        "eval_every": 1000,
    }


def _run(job: dict) -> dict:
    return {**ft.run_one(job), "name": job["name"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plan", help="JSON list of variants")
    p.add_argument("out", help="JSON-lines file the records are appended to")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--data", default=str(ft.DEFAULT_DATA))
    args = p.parse_args(argv)
    jobs = [variant(**v) for v in json.loads(Path(args.plan).read_text())]
    pool = mp.get_context("spawn").Pool(args.jobs, initializer=ft._init_worker, initargs=(args.data,))
    start = time.time()
    for rec in pool.imap_unordered(_run, jobs):
        with open(args.out, "a") as f:
            f.write(json.dumps({k: rec.get(k) for k in RECORD_KEYS}) + "\n")
        print(
            f"[{time.time() - start:6.0f}s] {rec['name']} {rec['row']}/{rec['method']}: "
            f"{100 * rec['test_error']:.2f}% ({rec['elapsed_s']:.0f}s)",
            flush=True,
        )
    pool.close()
    pool.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
