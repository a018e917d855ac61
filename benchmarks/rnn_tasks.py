"""Recurrent networks with synthetic gradients: Copy / Repeat-Copy, tiny-shakespeare, two timescales.

    python benchmarks/rnn_tasks.py [--jobs 2] [--copy-steps N] [--lm-steps N] [--only copy,repeat_copy,lm,hier]
                                   [--data ../shared/data/tinyshakespeare/input.txt] [--out FILE.json]

1. Copy and Repeat-Copy (Graves et al. 2014) with the curriculum of Jaderberg et al. 2017: for T in
   {2, 3, 4, 5, 8}, plain truncated BPTT, DNI (a linear synthesizer at each truncation boundary) and
   DNI + Aux, each with the same budget of training steps (batches); reported: the longest sequence solved
   (`solved_length`: the curriculum's error, bits per output step over 10 batches, fell below 0.15).
2. Character-level language model on tiny-shakespeare: BPTT and DNI at the same T and the same number of
   steps; reported: held-out bits per character.
3. Two timescales (examples/hierarchical.py): the upper core on an `every: 4` clock, the lower getting a
   synthetic gradient for the state it sends up, against the same model with both cores updated every step
   and the true gradient crossing between them (locked).

Every run starts from seed 0, unless --seeds names others for Copy and Repeat-Copy (the seed draws the initial
weights and the data). Runs go to a pool of `--jobs` processes with one intra-op thread each (small recurrent
steps are fastest single-threaded). Results: printed as Markdown tables and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRUNCATIONS = (2, 3, 4, 5, 8)
METHODS = ("bptt", "dni", "dni_aux")


def copy_spec(
    task: str,
    T: int,
    method: str,
    steps: int,
    hidden: int,
    lr: float,
    synth: dict,
    seed: int = 0,
    discount: float = 1.0,
) -> dict:
    repeat = task == "repeat_copy"
    return {
        "model": "build_model",
        "model_args": {"inputs": 10 if repeat else 9, "outputs": 9 if repeat else 8, "hidden": hidden},
        "recurrent": {"core": "core", "output": "readout"},
        "bptt": {
            "truncation": T,
            "synthetic_gradient": None if method == "bptt" else synth,
            "aux": method == "dni_aux",
            "discount": discount,
        },
        "stages": {"default": {"optimizer": {"name": "Adam", "lr": lr}}},
        "loss": "binary_cross_entropy",
        "data": {"name": task, "bits": 8, "start_length": 1, "threshold": 0.15, "window": 10, "max_repeats": 2},
        "train": {"steps": steps, "batch_size": 32, "eval_every": steps, "seed": seed},
    }


def lm_spec(T: int, method: str, steps: int, data: str, eval_chars: int) -> dict:
    import yaml

    spec = yaml.safe_load((ROOT / "specs" / f"charlm_{'bptt' if method == 'bptt' else 'dni'}.yaml").read_text())
    spec["bptt"]["truncation"] = T
    spec["data"].update(path=data, eval_chars=eval_chars)
    spec["train"].update(steps=steps, eval_every=max(1, steps // 4))
    return spec


def hier_spec(mode: str, steps: int, data: str, eval_chars: int) -> dict:
    import yaml

    spec = yaml.safe_load((ROOT / "specs" / "hierarchical.yaml").read_text())
    spec["data"].update(path=data, eval_chars=eval_chars)
    spec["train"].update(steps=steps, eval_every=max(1, steps // 4))
    if mode == "locked":  # both cores every step, the true gradient crossing between them
        spec["model_args"].update(every=1, offset=0, horizon=spec["recurrent"]["upper"]["horizon"])
        spec["stages"][1] = {"clock": {"every": 1, "offset": 0}}
        spec["recurrent"]["upper"]["synthetic_gradient"] = None
    return spec


def run_job(job: dict) -> dict:
    """Train one configuration in this process; returns its summary (no metric rows)."""
    import torch

    from dnicompile.compile.model_file import build_model
    from dnicompile.recurrent import compile_recurrent
    from dnicompile.spec import load_spec
    from dnicompile.train.loop import FitOptions, fit
    from dnicompile.train.recurrent import recurrent_task

    torch.set_num_threads(1)
    spec = load_spec(job["spec"])
    torch.manual_seed(spec.train.seed)
    model = build_model(ROOT / "examples" / job["example"], spec.model, spec.model_args)
    program = compile_recurrent(model, spec)
    opts = FitOptions(
        steps=spec.train.steps, batch_size=spec.train.batch_size, eval_every=spec.train.eval_every, seed=spec.train.seed
    )
    start = time.perf_counter()
    summary = fit(program, recurrent_task(spec.data, spec.data.path, opts.seed), opts)
    rows = summary.pop("rows")
    cos = [r["cosine"]["bptt"] for r in rows if "bptt" in r.get("cosine", {})]
    if cos:
        tail = cos[-max(1, len(cos) // 5) :]
        summary["cosine_last_fifth"] = sum(tail) / len(tail)
    if job["kind"] == "hier":
        ups = [r["cosine"]["upper"] for r in rows if "upper" in r.get("cosine", {})]
        if ups:
            summary["interface_cosine_last_fifth"] = sum(ups[-max(1, len(ups) // 5) :]) / max(
                1, len(ups[-max(1, len(ups) // 5) :])
            )
    summary.update({k: v for k, v in job.items() if k not in ("spec",)}, wall_s=time.perf_counter() - start)
    print(
        json.dumps(
            {
                k: summary[k]
                for k in summary
                if k in ("kind", "task", "T", "method", "mode", "solved_length", "bpc", "upper_bpc", "wall_s")
            }
        ),
        flush=True,
    )
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--copy-steps", type=int, default=2000)
    p.add_argument("--lm-steps", type=int, default=600)
    p.add_argument("--lm-T", type=int, nargs="+", default=[4, 8])
    p.add_argument("--hier-steps", type=int, default=400)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--synth-lr", type=float, default=1e-3)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument(
        "--discount",
        type=float,
        default=1.0,
        help="Copy / Repeat-Copy: bptt.discount, the weight of the next "
        "boundary's prediction in the synthesizer's target (runs before 2026-11-22, third session: = --scale)",
    )
    p.add_argument("--eval-chars", type=int, default=30000)
    p.add_argument("--only", default="copy,repeat_copy,lm,hier")
    p.add_argument("--truncations", type=int, nargs="+", default=list(TRUNCATIONS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare/input.txt"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="Copy / Repeat-Copy seeds (model and data)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rnn_tasks.json"))
    p.add_argument(
        "--table-from",
        nargs="+",
        metavar="JSON",
        help="print the tables of earlier results files (merged; a later file's run replaces an earlier one's "
        "of the same task, T, method and seed) and exit",
    )
    a = p.parse_args()
    if a.table_from:
        merged: dict = {}
        for f in a.table_from:
            for r in json.loads(Path(f).read_text())["results"]:
                merged[(r["kind"], r["task"], r.get("T"), r.get("method"), r.get("mode"), r.get("seed", 0))] = r
        print(tables(list(merged.values())))
        return 0
    only = set(a.only.split(","))
    synth = {"model": "linear", "scale": a.scale, "optimizer": {"name": "Adam", "lr": a.synth_lr}}
    jobs = []
    for task in ("copy", "repeat_copy"):
        if task in only:
            for T in a.truncations:
                for method in a.methods:
                    for seed in a.seeds:
                        spec = copy_spec(task, T, method, a.copy_steps, a.hidden, a.lr, synth, seed, a.discount)
                        jobs.append(
                            {
                                "kind": "copy",
                                "task": task,
                                "T": T,
                                "method": method,
                                "seed": seed,
                                "example": "copy_rnn.py",
                                "spec": spec,
                            }
                        )
    if "lm" in only:
        for T in a.lm_T:
            for method in ("bptt", "dni"):
                spec = lm_spec(T, method, a.lm_steps, a.data, a.eval_chars)
                jobs.append(
                    {"kind": "lm", "task": "text", "T": T, "method": method, "example": "charlm.py", "spec": spec}
                )
    if "hier" in only:
        for mode in ("dni", "locked"):
            spec = hier_spec(mode, a.hier_steps, a.data, a.eval_chars)
            jobs.append({"kind": "hier", "task": "text", "mode": mode, "example": "hierarchical.py", "spec": spec})
    # the longest jobs first, so the pool ends together
    weight = {"lm": 3, "hier": 4, "copy": 1}
    jobs.sort(key=lambda j: -weight[j["kind"]] * (1 if j["kind"] != "copy" else 10 / j["T"]))
    start = time.perf_counter()
    results: list[dict] = []

    def save() -> None:  # after every finished run, atomically: an interrupted benchmark keeps what it measured
        out = {
            "settings": {k: v for k, v in vars(a).items() if k != "out"},
            "cpu_count": os.cpu_count(),
            "total_wall_s": time.perf_counter() - start,
            "results": results,
        }
        tmp = Path(a.out + ".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        os.replace(tmp, a.out)

    ctx = mp.get_context("spawn")
    with ctx.Pool(a.jobs, maxtasksperchild=1) as pool:
        for result in pool.imap_unordered(run_job, jobs, chunksize=1):
            results.append(result)
            save()
    total = time.perf_counter() - start
    print(tables(results))
    print(f"\ntotal {total / 60:.1f} min with {a.jobs} jobs; results in {a.out}")
    return 0


def tables(results: list[dict]) -> str:
    lines = []
    for task in ("copy", "repeat_copy"):
        rows = [r for r in results if r["kind"] == "copy" and r["task"] == task]
        if not rows:
            continue
        ts = sorted({r["T"] for r in rows})
        lines += [
            f"\n{task}: longest sequence solved (same steps for every run; several seeds: median (each seed))\n",
            "| method | " + " | ".join(f"T={t}" for t in ts) + " |",
            "|---|" + "---|" * len(ts),
        ]
        for m in METHODS:
            cells = []
            for t in ts:
                got = sorted((r.get("seed", 0), r["solved_length"]) for r in rows if r["T"] == t and r["method"] == m)
                if not got:
                    cells.append("-")
                elif len(got) == 1:
                    cells.append(str(got[0][1]))
                else:
                    each = "/".join(str(s) for _, s in got)
                    cells.append(f"{statistics.median(s for _, s in got):g} ({each})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lm = [r for r in results if r["kind"] == "lm"]
    if lm:
        lines += [
            "\ntiny-shakespeare, held-out bits per character\n",
            "| T | method | bpc | wall s |",
            "|---|---|---|---|",
        ]
        for r in sorted(lm, key=lambda r: (r["T"], r["method"])):
            lines.append(f"| {r['T']} | {r['method']} | {r['bpc']:.4f} | {r['wall_s']:.0f} |")
    hier = [r for r in results if r["kind"] == "hier"]
    if hier:
        lines += ["\ntwo timescales\n", "| model | lower bpc | upper bpc | wall s |", "|---|---|---|---|"]
        for r in hier:
            lines.append(f"| {r['mode']} | {r['bpc']:.4f} | {r['upper_bpc']:.4f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
