"""Throughput of decoupled training against backprop and pipeline schedules (BENCHMARKS.md, "Throughput").

One model (examples/wide_mlp.py: 8 layers of width 1024, Fashion-MNIST), one batch size, one optimizer
(fused Adam, lr 3e-4, for every contender), S workers for each S in 2, 4, 8 that this machine has cores
for (2 is always run). Every figure is the median of --reps runs, interleaved (rep 1 of every contender,
then rep 2, ...) so that a change in the machine's load hits all of them alike. Each run is a fresh
process; its figure is steady-state samples/s: --warmup steps, then --steps timed steps (drawing the batch
included; start-up, data decoding and compilation excluded).

  (a) plain PyTorch backprop, one process, 1 thread
  (b) plain PyTorch backprop, one process, S threads
  (c) torch.distributed.pipelining ScheduleGPipe and Schedule1F1B: S ranks of 1 thread (gloo, localhost),
      manual split at the same cuts, --microbatches microbatches
  (d) dnicompile local runtime: program.train_step in one process, 1 thread (cDNI spec, and exact spec)
  (e) dnicompile distributed runtime: `python -m dnicompile ... --train --workers S --threads 1` (the
      public CLI), from the metrics file: samples between the log line after warm-up and the last one,
      over the time between them (cDNI spec, and the exact spec, which is pipeline parallelism without
      microbatches)

Then time to 85% test accuracy on S = 2, one run per seed and contender, interleaved per seed
(--race-contenders): (a), (b) with 2 threads, (c) Schedule1F1B on 2 ranks, and (e) with cDNI (or --race-kind
local: a local-loss cut; delayed: the shipped delayed-gradient spec; --race-spec: a variant of the kind's spec).
Training wall-clock up to the first evaluation at or above 85%, evaluation (every --eval-every steps) excluded.
(a) and (b) stop their clock while they evaluate, the 1F1B ranks stop theirs together (a barrier) while rank 0's
part runs the test set forward and the last rank scores it; (e) reports `train_s` in its metrics (elapsed time
less evaluation). Start-up (spawning workers, loading data, compiling) is excluded from all, and reported apart
for (e). Each run also gives its samples/s over the training time, each process's CPU ms per training step, and
for (e) the staleness and stale-fresh cosine of its metrics lines.

Run from the repository root:  python benchmarks/throughput.py [--reps 3] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "wide_mlp.py"
SPECS = {
    "dni": ROOT / "specs" / "wide_mlp_dni.yaml",
    "backprop": ROOT / "specs" / "wide_mlp_backprop.yaml",
    "local": ROOT / "specs" / "wide_mlp_local.yaml",
    "delayed": ROOT / "specs" / "wide_mlp_delayed.yaml",
}
CUT_KEYS = {"dni": "synthetic_gradient", "local": "local_loss", "delayed": "delayed_gradient"}
KIND_LABELS = {"dni": "cDNI", "local": "local loss", "delayed": "delayed gradient"}
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "fashion-mnist"
LR = 3.0e-4  # the specs' stage learning rate; plain PyTorch and the pipeline schedules use the same
DEPTH = 8  # hidden layers of the model (--depth)
QUEUE_DEPTH = 4  # the distributed runtime's queue of batches awaiting their true gradient (--queue-depth)


# =========================================================================== machine
def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {
        "cpu": cpu,
        "cores": cores,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# =========================================================================== specs for S stages
def cut_layers(stages: int) -> list[int]:
    """Layer indices to cut after, for `stages` stages of (nearly) equal layer count: 2 -> [3]."""
    return [round(DEPTH * i / stages) - 1 for i in range(1, stages)]


def spec_for(kind: str, stages: int, log_every: int, folder: Path, source: Path | None = None) -> Path:
    """The shipped spec (2 stages), or the same settings with a cut between every DEPTH/S layers, plus a
    `distributed: {log_every}` for fine-grained samples/s. `source` replaces the shipped spec of `kind`
    (--race-spec: a variant written elsewhere, same layout)."""
    text = (source or SPECS[kind]).read_text()
    if DEPTH != 8:
        text = text.replace("model: build_model\n", f"model: build_model\nmodel_args: {{depth: {DEPTH}}}\n", 1)
    if stages != 2 or DEPTH != 8:
        head, _, rest = text.partition("cuts:\n")
        cut_lines, _, tail = rest.partition("stages:\n")
        if kind in CUT_KEYS:
            key = CUT_KEYS[kind]
            setting = cut_lines.split(f"{key}:", 1)[1].strip()
            cuts = "".join(f"  - after: layers.{i}\n    {key}: {setting}\n" for i in cut_layers(stages))
        else:
            cuts = "".join(f"  - after: layers.{i}\n" for i in cut_layers(stages))
        text = head + "cuts:\n" + cuts + "stages:\n" + tail
    text += f"distributed: {{log_every: {log_every}, queue_depth: {QUEUE_DEPTH}}}\n"
    path = folder / f"wide_mlp_{kind}_{stages}.yaml"
    path.write_text(text)
    return path


# =========================================================================== children (one per run)
def _data(data_dir: str, batch: int, seed: int):
    from dnicompile.train.data import Batches, load_fashion_mnist

    d = load_fashion_mnist(data_dir)
    return d, Batches(d.train_x, d.train_y, batch, seed)


def _model(seed: int):
    import torch

    sys.path.insert(0, str(MODEL.parent))
    from wide_mlp import build_model

    torch.manual_seed(seed)
    return build_model(depth=DEPTH)


def _adam(params):
    import torch

    return torch.optim.Adam(params, lr=LR, fused=True)


def child_plain(args) -> dict:
    """(a)/(b): the model trained by plain backprop, args.threads threads."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    model = _model(args.seed)
    opt = _adam(model.parameters())
    _, batches = _data(args.data, args.batch_size, args.seed)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start, cpu = time.perf_counter(), time.process_time()
        x, y = batches.next()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.flatten(1)), y).backward()
        opt.step()
    return _rates(args, start, cpu)


def _rates(args, start: float, cpu: float) -> dict:
    """samples/s over the timed steps, and the process's CPU time per step (all its threads)."""
    elapsed, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    return {"samples_per_s": args.steps * args.batch_size / elapsed, "cpu_ms": [1e3 * cpu_s / args.steps]}


def child_local(args) -> dict:
    """(d): the dnicompile local runtime, program.train_step, 1 thread."""
    import torch

    from dnicompile import compile_decoupled
    from dnicompile.spec import load_spec

    torch.set_num_threads(args.threads)
    spec = load_spec(Path(args.spec))
    program = compile_decoupled(_model(args.seed), spec)
    program.train()
    _, batches = _data(args.data, args.batch_size, args.seed)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start, cpu = time.perf_counter(), time.process_time()
        x, y = batches.next()
        program.train_step(x.flatten(1), y)
    return _rates(args, start, cpu)


def _pipe_rank(rank: int, world: int, args, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    global DEPTH
    DEPTH = args.depth  # a spawned rank imports this file afresh: DEPTH would be the default 8
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if args.latency_ms:
        _emulate_link_in_pipelining(args.latency_ms)
    model = _model(args.seed)
    bounds = [0, *(i + 1 for i in cut_layers(world)), DEPTH]
    part = list(model.layers)[bounds[rank] : bounds[rank + 1]]
    if rank == world - 1:
        part.append(model.head)
    sub = nn.Sequential(*part)
    micro = args.batch_size // args.microbatches
    width = 784 if rank == 0 else 1024
    stage = PipelineStage(sub, rank, world, torch.device("cpu"), input_args=(torch.empty(micro, width),))
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[args.schedule]
    schedule = cls(stage, n_microbatches=args.microbatches, loss_fn=F.cross_entropy)
    opt = _adam(sub.parameters())
    _, batches = _data(args.data, args.batch_size, args.seed)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            dist.barrier()
            start, cpu = time.perf_counter(), time.process_time()
        x, y = batches.next()
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            schedule.step(x.flatten(1))
        elif rank == world - 1:
            schedule.step(target=y, losses=[])
        else:
            schedule.step()
        opt.step()
    cpu_ms = 1e3 * (time.process_time() - cpu) / args.steps
    dist.barrier()
    elapsed = time.perf_counter() - start
    Path(f"{out}.{rank}").write_text(
        json.dumps({"samples_per_s": args.steps * args.batch_size / elapsed, "cpu_ms": cpu_ms})
    )
    dist.destroy_process_group()


def _emulate_link_in_pipelining(latency_ms: float) -> None:
    """Route the sends of torch.distributed.pipelining's schedules through dnicompile's EmulatedLink, the same
    emulation as `distributed: {link: {latency_ms}}` ([Note: link emulation]): its p2p helper `_batch_p2p` posts
    the receives at once and hands each send to the link, which posts it at its delivery time."""
    import torch.distributed as dist
    import torch.distributed.pipelining.schedules as schedules

    from dnicompile.runtime.transport import EmulatedLink

    link = EmulatedLink(latency_ms / 1e3, None)

    def batch_p2p(p2p_ops, desc=None):
        works = []
        for op in p2p_ops:
            if op.op is dist.isend:
                works.append(link.send(op.tensor.detach().clone(), op.peer, op.tag))  # one group: the default
            else:
                works.append(op.op(op.tensor, group=op.group, tag=op.tag, group_src=op.group_peer))
        return works

    schedules._batch_p2p = batch_p2p


def child_pipe(args) -> dict:
    """(c): torch.distributed.pipelining, args.workers ranks of 1 thread over gloo on localhost."""
    import torch.multiprocessing as mp

    world = int(args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(_pipe_rank, args=(world, args, _free_port(), out), nprocs=world, start_method="spawn")
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
        return {"samples_per_s": ranks[-1]["samples_per_s"], "cpu_ms": [r["cpu_ms"] for r in ranks]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_time_to_acc(args) -> dict:
    """(a) / (b) until --target test accuracy, args.threads threads: training seconds (clock stopped while
    evaluating), and the CPU time per training step of the process (all its threads)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    model = _model(args.seed)
    opt = _adam(model.parameters())
    data, batches = _data(args.data, args.batch_size, args.seed)
    test_x, test_y = data.test_x.flatten(1), data.test_y
    trained, cpu, evals = 0.0, 0.0, []
    for step in range(1, args.steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        x, y = batches.next()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.flatten(1)), y).backward()
        opt.step()
        trained += time.perf_counter() - t0
        cpu += time.process_time() - c0
        if step % args.eval_every == 0:
            model.eval()
            with torch.no_grad():
                acc = float(
                    sum(
                        (model(test_x[i : i + 1000]).argmax(-1) == test_y[i : i + 1000]).sum()
                        for i in range(0, len(test_x), 1000)
                    )
                    / len(test_x)
                )
            model.train()
            evals.append({"step": step, "train_s": trained, "test_accuracy": acc})
            if acc >= args.target:
                return _acc_result(True, step, trained, evals, args, [1e3 * cpu / step])
    return _acc_result(False, args.steps, trained, evals, args, [1e3 * cpu / args.steps])


def _acc_result(reached: bool, step: int, trained: float, evals: list, args, cpu_ms: list) -> dict:
    rate = step * args.batch_size / trained if trained else float("nan")
    return {
        "reached": reached,
        "step": step,
        "train_s": trained,
        "evals": evals,
        "samples_per_s": rate,
        "cpu_ms": cpu_ms,
    }


def _pipe_acc_rank(rank: int, world: int, args, port: int, out: str) -> None:
    """One rank of (c) Schedule1F1B until --target: the ranks stop their clock together (a barrier) every
    --eval-every steps, rank 0's part runs the test set forward and sends it on, the last rank scores it and
    tells every rank whether to stop."""
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    global DEPTH
    DEPTH = args.depth  # a spawned rank imports this file afresh: DEPTH would be the default 8
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = _model(args.seed)
    bounds = [0, *(i + 1 for i in cut_layers(world)), DEPTH]
    part = list(model.layers)[bounds[rank] : bounds[rank + 1]]
    last = rank == world - 1
    if last:
        part.append(model.head)
    sub = nn.Sequential(*part)
    micro = args.batch_size // args.microbatches
    width = 784 if rank == 0 else 1024
    stage = PipelineStage(sub, rank, world, torch.device("cpu"), input_args=(torch.empty(micro, width),))
    schedule = Schedule1F1B(stage, n_microbatches=args.microbatches, loss_fn=F.cross_entropy)
    opt = _adam(sub.parameters())
    data, batches = _data(args.data, args.batch_size, args.seed)
    test_x, test_y = data.test_x.flatten(1), data.test_y
    trained, cpu, evals, reached, step = 0.0, 0.0, [], False, 0
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    while step < args.steps and not reached:
        step += 1
        x, y = batches.next()
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            schedule.step(x.flatten(1))
        elif last:
            schedule.step(target=y, losses=[])
        else:
            schedule.step()
        opt.step()
        if step % args.eval_every and step < args.steps:
            continue
        dist.barrier()
        trained += time.perf_counter() - t0
        cpu += time.process_time() - c0
        sub.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(test_x), 1000):
                n = min(1000, len(test_x) - i)
                if rank == 0:
                    h = test_x[i : i + n]
                else:
                    h = torch.empty(n, 1024)
                    dist.recv(h, rank - 1)
                h = sub(h)
                if last:
                    correct += int((h.argmax(-1) == test_y[i : i + n]).sum())
                else:
                    dist.send(h.contiguous(), rank + 1)
        sub.train()
        acc = correct / len(test_x)
        flag = torch.tensor([1.0 if acc >= args.target else 0.0])
        dist.broadcast(flag, world - 1)
        reached = bool(flag.item())
        if last:
            evals.append({"step": step, "train_s": trained, "test_accuracy": acc})
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
    Path(f"{out}.{rank}").write_text(json.dumps({"cpu_ms": 1e3 * cpu / step, "evals": evals, "step": step}))
    if last:
        Path(out).write_text(json.dumps(_acc_result(reached, step, trained, evals, args, [])))
    dist.destroy_process_group()


def child_pipe_acc(args) -> dict:
    """(c) Schedule1F1B to --target accuracy: args.workers ranks of 1 thread over gloo on localhost."""
    import torch.multiprocessing as mp

    world = int(args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(_pipe_acc_rank, args=(world, args, _free_port(), out), nprocs=world, start_method="spawn")
        result = json.loads(Path(out).read_text())
        result["cpu_ms"] = [json.loads(Path(f"{out}.{r}").read_text())["cpu_ms"] for r in range(world)]
        return result


CHILDREN = {
    "plain": child_plain,
    "local": child_local,
    "pipe": child_pipe,
    "acc": child_time_to_acc,
    "pipeacc": child_pipe_acc,
}


# =========================================================================== parent: running children
def env() -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def run_child(kind: str, args, timeout: float = 600, **extra) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--data", args.data, "--depth", str(DEPTH)]
    argv += ["--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} {extra} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def cli_command(
    spec: Path, workers: int, steps: int, eval_every: int, metrics: Path, args, seed: int = 0, sets: tuple = ()
) -> list:
    return [
        sys.executable, "-m", "dnicompile", str(MODEL), "--spec", str(spec), "--train", "--workers", str(workers),
        "--threads", "1", "--data", args.data, "--steps", str(steps), "--batch-size", str(args.batch_size),
        "--eval-every", str(eval_every), "--seed", str(seed), "--metrics", str(metrics),
        *(a for kv in sets for a in ("--set", kv)),
    ]  # fmt: skip


def run_distributed(spec: Path, workers: int, args, tmp: Path, sets: tuple = ()) -> dict:
    """(e): the CLI, steady-state samples/s from the metrics file's training rows after warm-up; `sets`: --set
    overrides (KEY=VALUE)."""
    metrics = tmp / f"metrics-{time.monotonic_ns()}.jsonl"
    total = args.warmup + args.steps
    cmd = cli_command(spec, workers, total, 10**9, metrics, args, sets=sets)  # evaluation only after the last step
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env(), cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"dnicompile --workers {workers} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    train = [row for row in rows if "samples_per_s" in row]
    first = next((row for row in train if row["step"] >= args.warmup), None)
    last = train[-1] if train else None
    if first is None or last["step"] <= first["step"]:
        raise SystemExit(
            f"(e) logged too few steps to time ({len(train)} metrics lines, every 5 steps): "
            "give --steps at least 10 beyond --warmup."
        )
    rate = (last["step"] - first["step"]) * args.batch_size / (last["elapsed_s"] - first["elapsed_s"])
    steady = [row["cpu_ms_per_step"] for row in train if row["step"] > first["step"]]
    cpu_ms = [median([row[r] for row in steady if row[r] is not None]) for r in range(workers)]
    return {"samples_per_s": rate, "cpu_ms": cpu_ms, "staleness": last.get("staleness")}


def time_to_acc_distributed(spec: Path, args, tmp: Path, seed: int) -> dict:
    """(e) until --target: `train_s` of the first evaluation at or above it. The run is stopped with Ctrl-C
    (SIGINT to the launcher, which stops its workers) once that line is written. Also from the metrics lines
    up to that step: each rank's median `cpu_ms_per_step`, the `staleness` and the cut's `cosine` values."""
    metrics = tmp / f"acc-{seed}-{time.monotonic_ns()}.jsonl"
    cmd = cli_command(spec, 2, args.acc_steps, args.eval_every, metrics, args, seed=seed)
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=ROOT,
        # a benchmark started in the background (`... &`) ignores SIGINT, and so would its children: restore it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    found, evals = None, []
    try:
        while proc.poll() is None and found is None:
            time.sleep(0.5)
            if metrics.exists():
                rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.endswith("}")]
                evals = [row for row in rows if "test_accuracy" in row]
                found = next((row for row in evals if row["test_accuracy"] >= args.target), None)
        wall = time.perf_counter() - started
        if found is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.endswith("}")]
    evals = [row for row in rows if "test_accuracy" in row]
    found = found or next((row for row in evals if row["test_accuracy"] >= args.target), None)
    first_row = next((row for row in rows if "train_s" in row), None)
    startup = wall - found["elapsed_s"] if found else None  # spawning, compiling, data: before train_rank's clock
    summary = [{"step": r["step"], "train_s": r["train_s"], "test_accuracy": r["test_accuracy"]} for r in evals]
    end = found["step"] if found else args.acc_steps
    train = [r for r in rows if "samples_per_s" in r and r["step"] <= end]
    per_rank = [[r["cpu_ms_per_step"][i] for r in train if (r.get("cpu_ms_per_step") or [None] * 2)[i] is not None]
                for i in range(2)]  # fmt: skip
    stats = {
        "cpu_ms": [median(v) for v in per_rank],
        "staleness": [r["staleness"] for r in train if r.get("staleness") is not None],
        "cosine": [next(iter(r["cosine"].values())) for r in train if r.get("cosine")],
    }
    if found is None:
        last = evals[-1] if evals else first_row or {"step": 0, "train_s": float("nan")}
        rate = last["step"] * args.batch_size / last["train_s"] if last["train_s"] else float("nan")
        return {"reached": False, "step": last["step"], "train_s": last["train_s"], "evals": summary,
                "samples_per_s": rate, **stats}  # fmt: skip
    rate = found["step"] * args.batch_size / found["train_s"]
    return {"reached": True, "step": found["step"], "train_s": found["train_s"], "startup_s": startup,
            "evals": summary, "samples_per_s": rate, **stats}  # fmt: skip


# =========================================================================== report
def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cpu_medians(runs: list[list[float]]) -> list[float]:
    """Per-process medians of the runs' CPU ms per step."""
    return [median([r[i] for r in runs]) for i in range(len(runs[0]))] if runs else []


def fmt_runs(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def markdown(results: dict) -> str:
    m = results["machine"]
    a = results["args"]
    lines = [
        "## Throughput",
        "",
        f"`benchmarks/throughput.py`: examples/wide_mlp.py ({a.get('depth', 8)} fully connected layers of width "
        f"1024 + head, Fashion-MNIST), batch {a['batch_size']}, fused Adam at lr 3e-4 for every contender (the cDNI "
        "spec trains stage 0 at 1e-4 and the synthesizer at 1e-3); "
        + (
            "cut after `layers.3` for S = 2 (specs/wide_mlp_*.yaml), every 8/S layers for larger S. "
            if a.get("depth", 8) == 8
            else f"the specs/wide_mlp_*.yaml settings with `model_args: {{depth: {a['depth']}}}` and a cut every "
            f"{a['depth']}/S layers. "
        )
        + "Each figure is steady-state samples/s, the "
        f"median of {a['reps']} runs (all runs in the `runs` column), {a['warmup']} warm-up steps then "
        f"{a['steps']} timed steps per run, runs interleaved across contenders, each run a fresh process; "
        "start-up and data decoding are excluded, drawing each batch is included. (e) is the public CLI, "
        "`python -m dnicompile examples/wide_mlp.py --spec SPEC --train --workers S --threads 1 --steps "
        f"{a['warmup'] + a['steps']} --eval-every 1000000000 --metrics FILE`, with `distributed: {{log_every: 5, queue_depth: {a.get('queue_depth', 4)}}}` "
        "added to the spec; its rate is (samples between the first log line at or after the warm-up and the "
        "last one) / (the time between them), from the metrics file. CPU ms per step is the process's CPU time "
        "(all its threads) over the timed steps: for (e) the median of the `cpu_ms_per_step` of the metrics "
        "lines.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}. "
        f"Load average (1 min) during the runs: {results['load_min']:.1f} to {results['load_max']:.1f}"
        + (
            " -- **the machine was shared** with other jobs while this ran, so every figure is lower "
            "and noisier than on an idle machine, and S processes did not get S whole cores."
            if results["load_max"] > m["cores"] + 0.5
            else " (the benchmark's own processes count in it: up to S of them run at once)."
        ),
        "",
        f"Command: `{results['command']}` (total {results['total_s'] / 60:.1f} min).",
        "",
    ]
    for s, block in results["throughput"].items():
        a1 = median(block["a_plain_1thread"])
        lines += [
            f"### S = {s}",
            "",
            "| contender | samples/s (median) | x (a) | runs | CPU ms per step, per process (median) |",
            "|---|---:|---:|---|---|",
        ]
        for key, label in LABELS:
            runs = block.get(key)
            if not runs:
                continue
            med = median(runs)
            cpu = " / ".join(f"{c:.0f}" for c in cpu_medians(block.get(f"{key}_cpu_ms", [])))
            lines.append(f"| {label.format(s=s)} | {med:.0f} | {med / a1:.2f} | {fmt_runs(runs)} | {cpu} |")
        e = median(block["e_distributed_dni"])
        best_c = max(median(block.get("c_gpipe", [])), median(block.get("c_1f1b", [])))
        goal1, goal2 = 0.85 * int(s) * a1, 1.5 * best_c
        cpu_a = cpu_medians(block["a_plain_1thread_cpu_ms"])[0]
        cpu_e = max(cpu_medians(block["e_distributed_dni_cpu_ms"]))
        lines += [
            "",
            f"CPU time: (a) spends {cpu_a:.0f} ms of CPU per step; the busiest of the {s} cDNI workers (e) "
            f"{cpu_e:.0f} ms. With a whole core per worker and no waiting, (e) could reach at most "
            f"{cpu_a / cpu_e:.2f} x (a): a bound from the work split (computed, not measured as throughput).",
            "",
            f"Goals for (e) cDNI: >= 0.85 x S x (a) = {goal1:.0f} samples/s: **{'met' if e >= goal1 else 'missed'}** "
            f"({e:.0f}, {e / a1:.2f} x (a)); >= 1.5 x best (c) = {goal2:.0f}: **{'met' if e >= goal2 else 'missed'}** "
            f"({e / best_c:.2f} x best (c)).",
            "",
        ]
    acc = results.get("accuracy")
    if acc:
        lines += race_markdown(acc)
    return "\n".join(lines) + "\n"


def _acc_cell(r: dict) -> str:
    if not r["reached"]:
        return f"not reached in {r['step']} steps ({r['train_s']:.1f} s)"
    return f"{r['train_s']:.1f} s (step {r['step']})"


def _acc_extra(r: dict) -> str:
    """samples/s over the training time, CPU ms per step of each process, staleness."""
    parts = []
    if r.get("samples_per_s"):
        parts.append(f"{r['samples_per_s']:.0f} samples/s")
    if r.get("cpu_ms"):
        parts.append("CPU ms/step " + " / ".join("-" if c is None else f"{c:.0f}" for c in r["cpu_ms"]))
    if r.get("staleness"):
        parts.append(f"staleness {median(r['staleness']):.1f}")
    if r.get("startup_s") is not None:
        parts.append(f"start-up {r['startup_s']:.1f} s")
    return "; ".join(parts)


RACERS = {
    "a": "(a) backprop, 1 process, 1 thread",
    "b": "(b) backprop, 1 process, 2 threads",
    "c": "(c) Schedule1F1B, 2 ranks of 1 thread",
    "e": "(e) {kind}, 2 workers of 1 thread",
}


def race_markdown(acc: dict) -> list[str]:
    chosen = acc.get("contenders", ["a", "e"])
    label = {k: RACERS[k].format(kind=acc.get("kind_label", "cDNI")) for k in chosen}
    lines = [
        f"### Time to {acc['target']:.0%} test accuracy (S = 2)",
        "",
        f"Training wall-clock until the first evaluation at or above {acc['target']:.0%} (every "
        f"{acc['eval_every']} steps, full test set); evaluation time excluded (plain PyTorch and the 1F1B ranks "
        "stop their clock while evaluating, the distributed runtime reports `train_s` = elapsed time less "
        "evaluation); start-up excluded (for (e) it is listed apart: spawning 2 workers, compiling, decoding "
        "the data). Contenders interleaved per seed, in the order of the columns; each cell: seconds (step), "
        "then samples/s over the training time and CPU ms per step of each process.",
        "",
        "| seed | " + " | ".join(label[k] for k in chosen) + " |",
        "|---|" + "---|" * len(chosen),
    ]
    for row in acc["runs"]:
        lines.append(
            f"| {row['seed']} | " + " | ".join(f"{_acc_cell(row[k])}; {_acc_extra(row[k])}" for k in chosen) + " |"
        )
    times = {k: [r[k]["train_s"] for r in acc["runs"] if r[k]["reached"]] for k in chosen}
    steps = {k: [r[k]["step"] for r in acc["runs"] if r[k]["reached"]] for k in chosen}
    lines.append("")
    if "a" in chosen and times["a"]:
        ma = median(times["a"])
        for k in chosen:
            if k == "a" or not times[k]:
                continue
            mk = median(times[k])
            lines.append(
                f"- {label[k]}: median {mk:.1f} s against (a) {ma:.1f} s = **{ma / mk:.2f}x** (a)'s speed to the "
                f"target ({len(times[k])} of {len(acc['runs'])} runs reached it; median step {median(steps[k]):.0f} "
                f"against (a)'s {median(steps['a']):.0f})"
            )
    lines.append("")
    return lines


LABELS = [
    ("a_plain_1thread", "(a) plain PyTorch backprop, 1 process, 1 thread"),
    ("b_plain_sthreads", "(b) plain PyTorch backprop, 1 process, {s} threads"),
    ("c_gpipe", "(c) pipelining ScheduleGPipe, {s} ranks x 1 thread"),
    ("c_1f1b", "(c) pipelining Schedule1F1B, {s} ranks x 1 thread"),
    ("d_local_dni", "(d) dnicompile local runtime, cDNI, 1 thread"),
    ("d_local_backprop", "(d) dnicompile local runtime, exact cuts, 1 thread"),
    ("e_distributed_dni", "(e) dnicompile distributed, cDNI, {s} workers x 1 thread"),
    ("e_distributed_backprop", "(e) dnicompile distributed, exact cuts, {s} workers x 1 thread"),
]


NOTES = "<!-- throughput notes: kept when the tables above are regenerated -->"


def write_section(path: Path, section: str, heading: str = "## Throughput") -> None:
    """Replace the `heading` section of `path` (up to the next "## " heading), or append it; the
    rest of the file, which others edit, is left as it is (read right before writing). Whatever follows
    the NOTES marker inside the old section (written by hand) is kept."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == heading), None)
    if start is None:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    old = lines[start:end]
    mark = next((i for i, ln in enumerate(old) if ln.strip() == NOTES), None)
    notes = "".join(old[mark:]).rstrip("\n") + "\n" if mark is not None else ""
    body = section + ("\n" + notes if notes else "")
    path.write_text("".join(lines[:start]) + body + ("\n" if end < len(lines) else "") + "".join(lines[end:]))


# =========================================================================== issue 17: schedules and slow links
PIPELINE_HEADING = "## Pipeline schedules and slow links"
PIPELINE_LABELS = {
    "a": "(a) plain PyTorch backprop, 1 process, 1 thread (no link)",
    "c_gpipe": "(c) pipelining ScheduleGPipe, M microbatches",
    "c_1f1b": "(c) pipelining Schedule1F1B, M microbatches",
    "e_mb_gpipe": "(e) dnicompile exact cuts, `microbatches: M, schedule: gpipe`",
    "e_mb_1f1b": "(e) dnicompile exact cuts, `microbatches: M, schedule: 1f1b`",
    "e_exact": "(e) dnicompile exact cuts, no microbatches",
    "e_dni": "(e) dnicompile cDNI cut",
    "e_local": "(e) dnicompile local-loss cut",
    "e_delayed": "(e) dnicompile delayed-gradient cut (delay 1)",
}


def pipeline_main(args) -> int:
    """Every contender at S = 2 and each latency, interleaved rep by rep; the median samples/s."""
    began = time.perf_counter()
    info = machine()
    latencies = [float(v) for v in args.latencies.split(",")]
    m = args.microbatches
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}; latencies {latencies} ms; load {load():.2f}")
    runs: dict[str, list] = {}
    loads = [load()]
    with tempfile.TemporaryDirectory(prefix="dni-pipeline-") as tmp_name:
        tmp = Path(tmp_name)
        specs = {kind: spec_for(kind, 2, 5, tmp) for kind in SPECS}

        def link(lat):
            return (f"distributed.link.latency_ms={lat:g}",) if lat else ()

        contenders = [("a", 0.0, lambda: run_child("plain", args, threads=1))]
        for lat in latencies:
            contenders += [
                ("c_gpipe", lat, lambda lat=lat: run_child("pipe", args, workers=2, schedule="gpipe", microbatches=m, latency_ms=lat)),
                ("c_1f1b", lat, lambda lat=lat: run_child("pipe", args, workers=2, schedule="1f1b", microbatches=m, latency_ms=lat)),
                ("e_mb_gpipe", lat, lambda lat=lat: run_distributed(specs["backprop"], 2, args, tmp, (f"distributed.microbatches={m}", "distributed.schedule=gpipe", *link(lat)))),
                ("e_mb_1f1b", lat, lambda lat=lat: run_distributed(specs["backprop"], 2, args, tmp, (f"distributed.microbatches={m}", "distributed.schedule=1f1b", *link(lat)))),
                ("e_exact", lat, lambda lat=lat: run_distributed(specs["backprop"], 2, args, tmp, link(lat))),
                ("e_dni", lat, lambda lat=lat: run_distributed(specs["dni"], 2, args, tmp, link(lat))),
                ("e_local", lat, lambda lat=lat: run_distributed(specs["local"], 2, args, tmp, link(lat))),
                ("e_delayed", lat, lambda lat=lat: run_distributed(specs["delayed"], 2, args, tmp, link(lat))),
            ]  # fmt: skip
        for rep in range(args.reps):
            for key, lat, fn in contenders:
                before = load()
                out = fn()
                runs.setdefault(f"{key}@{lat:g}", []).append(
                    {"samples_per_s": out["samples_per_s"], "cpu_ms": out["cpu_ms"], "load": before}
                )
                loads.append(before)
                cpu = "/".join(f"{c:.0f}" for c in out["cpu_ms"])
                print(f"rep {rep + 1}/{args.reps} {key} latency {lat:g} ms: {out['samples_per_s']:.0f} samples/s, "
                      f"CPU ms/step {cpu} (load {before:.2f})", flush=True)  # fmt: skip
    loads.append(load())
    results = {
        "machine": info, "args": vars(args), "command": command.strip(), "latencies": latencies, "runs": runs,
        "load_min": min(loads), "load_max": max(loads), "total_s": time.perf_counter() - began,
    }  # fmt: skip
    path = (
        Path(args.json).with_name("pipeline_links.json") if args.json.endswith("throughput.json") else Path(args.json)
    )
    path.write_text(json.dumps(results, indent=1) + "\n")
    section = pipeline_markdown(results)
    print(section)
    if args.write:
        write_section(Path(args.write), section, PIPELINE_HEADING)
        print(f"wrote the '{PIPELINE_HEADING[3:]}' section of {args.write}")
    return 0


def pipeline_markdown(results: dict) -> str:
    m, a = results["machine"], results["args"]
    runs = results["runs"]

    def med(key):
        return median([r["samples_per_s"] for r in runs.get(key, [])])

    base = med("a@0")
    lines = [
        PIPELINE_HEADING,
        "",
        f"`benchmarks/throughput.py --pipeline` (issue 17): examples/wide_mlp.py at depth {a['depth']}, batch "
        f"{a['batch_size']}, fused Adam at lr 3e-4, S = 2 ranks of 1 thread, M = {a['microbatches']} microbatches for "
        "the pipeline schedules, the shipped specs/wide_mlp_*.yaml settings (cut in the middle). Steady-state "
        f"samples/s, median of {a['reps']} runs interleaved across contenders ({a['warmup']} warm-up then "
        f"{a['steps']} timed steps). Latency: every point-to-point message delayed by an emulated link "
        "([Note: link emulation]: `distributed: {link: {latency_ms: L}}` for dnicompile; for torch's schedules the "
        "same EmulatedLink wraps the sends of `torch.distributed.pipelining.schedules._batch_p2p`). Unlimited "
        "bandwidth.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}. Load average (1 min) during the runs: "
        f"{results['load_min']:.1f} to {results['load_max']:.1f}. Command: `{results['command']}` "
        f"({results['total_s'] / 60:.1f} min).",
        "",
        "| contender | " + " | ".join(f"{lat:g} ms: samples/s (x best (c))" for lat in results["latencies"]) + " |",
        "|---|" + "---:|" * len(results["latencies"]),
    ]
    for key, label in PIPELINE_LABELS.items():
        if key == "a":
            lines.append(f"| {label} | {base:.0f} |" + " |" * (len(results["latencies"]) - 1))
            continue
        cells = []
        for lat in results["latencies"]:
            best_c = max(med(f"c_gpipe@{lat:g}"), med(f"c_1f1b@{lat:g}"))
            v = med(f"{key}@{lat:g}")
            cells.append(f"{v:.0f} ({v / best_c:.2f}x)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for lat in results["latencies"]:
        best_c = max(med(f"c_gpipe@{lat:g}"), med(f"c_1f1b@{lat:g}"))
        mb = max(med(f"e_mb_gpipe@{lat:g}"), med(f"e_mb_1f1b@{lat:g}"))
        dec = {k: med(f"{k}@{lat:g}") for k in ("e_dni", "e_local", "e_delayed")}
        best = max(dec, key=dec.get)
        goal = 1.0 if lat == 0 else 2.0
        lines.append(
            f"- {lat:g} ms: microbatched exact cuts {mb / best_c:.2f}x the better pipeline schedule (goal 0.95x: "
            f"**{'met' if mb >= 0.95 * best_c else 'missed'}**); the best decoupled kind ({PIPELINE_LABELS[best][15:]}) "
            f"{dec[best] / best_c:.2f}x" + (f" (goal {goal:g}x: **{'met' if dec[best] >= goal * best_c else 'missed'}**)" if lat in (0, 10) else "")
        )  # fmt: skip
    return "\n".join(lines) + "\n"


# =========================================================================== main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Fashion-MNIST folder")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--depth", type=int, default=8, help="hidden layers of examples/wide_mlp.py (default: %(default)s)")
    p.add_argument("--queue-depth", type=int, default=4, help="(e)'s distributed.queue_depth (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per run")
    p.add_argument("--steps", type=int, default=40, help="timed steps per run")
    p.add_argument("--reps", type=int, default=3, help="runs per contender (the median is reported)")
    p.add_argument("--workers", help="S values, e.g. 2,4 (default: 2, 4, 8 as far as the cores allow)")
    p.add_argument("--microbatches", type=int, default=4, help="microbatches of the pipeline schedules (c)")
    p.add_argument("--seeds", type=int, default=2, help="runs of the time-to-accuracy race (0 skips it)")
    p.add_argument("--target", type=float, default=0.85)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--acc-steps", type=int, default=1000, help="give up the race after this many steps")
    p.add_argument(
        "--race-kind",
        choices=("dni", "local", "delayed"),
        default="dni",
        help="the cut of (e) in the race: cDNI, a local loss or a delayed gradient (the shipped wide_mlp spec's settings)",
    )
    p.add_argument(
        "--race-spec",
        help="a variant of the race kind's shipped spec (same layout; its cut's settings and stage optimizers are used)",
    )
    p.add_argument(
        "--race-contenders",
        default="a,b,c,e",
        help="which contenders race, interleaved per seed: a (backprop 1 thread), b (backprop 2 threads), "
        "c (Schedule1F1B, 2 ranks), e (dnicompile, 2 workers); default: %(default)s",
    )
    p.add_argument("--race-only", action="store_true", help="run the time-to-accuracy race alone (no throughput)")
    p.add_argument(
        "--json", default=str(ROOT / "benchmarks" / "results" / "throughput.json"), help="write all figures here"
    )
    p.add_argument("--write", metavar="BENCHMARKS.md", help="replace its Throughput section with the results")
    # one run, in its own process
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--schedule", help=argparse.SUPPRESS)
    p.add_argument("--latency-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="issue 17's table instead: at S = 2, the pipeline schedules against dnicompile's microbatched exact cuts "
        "and its decoupled kinds, for each --latencies (emulated links), into the 'Pipeline schedules and slow "
        "links' section",
    )
    p.add_argument(
        "--latencies", default="0,10", help="--pipeline: emulated one-way latencies in ms (default: %(default)s)"
    )
    args = p.parse_args()
    global DEPTH, QUEUE_DEPTH
    DEPTH, QUEUE_DEPTH = args.depth, args.queue_depth
    if args.child:
        print("RESULT " + json.dumps(CHILDREN[args.child](args)), flush=True)
        return 0

    if args.pipeline:
        return pipeline_main(args)
    began = time.perf_counter()
    info = machine()
    if args.workers:
        sizes = [int(s) for s in args.workers.split(",")]
    else:
        sizes = [2] + [s for s in (4, 8) if s <= info["cores"]]
    if args.race_only:
        sizes = []
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}; S = {sizes}; load {load():.2f}", flush=True)
    loads = [load()]
    results = {"machine": info, "args": vars(args), "command": command.strip(), "throughput": {}}
    with tempfile.TemporaryDirectory(prefix="dni-throughput-") as tmp_name:
        tmp = Path(tmp_name)
        for s in sizes:
            specs = {kind: spec_for(kind, s, 5, tmp) for kind in SPECS}
            runs: dict[str, list] = {key: [] for key, _ in LABELS}
            runs.update({f"{key}_cpu_ms": [] for key, _ in LABELS})
            runs["load"] = []
            contenders = [
                ("a_plain_1thread", lambda: run_child("plain", args, threads=1)),
                ("b_plain_sthreads", lambda s=s: run_child("plain", args, threads=s)),
                ("c_gpipe", lambda s=s: run_child("pipe", args, workers=s, schedule="gpipe", microbatches=args.microbatches)),
                ("c_1f1b", lambda s=s: run_child("pipe", args, workers=s, schedule="1f1b", microbatches=args.microbatches)),
                ("d_local_dni", lambda sp=specs: run_child("local", args, spec=sp["dni"])),
                ("d_local_backprop", lambda sp=specs: run_child("local", args, spec=sp["backprop"])),
                ("e_distributed_dni", lambda s=s, sp=specs: run_distributed(sp["dni"], s, args, tmp)),
                ("e_distributed_backprop", lambda s=s, sp=specs: run_distributed(sp["backprop"], s, args, tmp)),
            ]  # fmt: skip
            for rep in range(args.reps):
                for key, fn in contenders:
                    before = load()
                    out = fn()
                    value = out["samples_per_s"]
                    runs[key].append(value)
                    runs[f"{key}_cpu_ms"].append(out["cpu_ms"])
                    runs["load"].append(before)
                    loads.append(before)
                    cpu = "/".join(f"{c:.0f}" for c in out["cpu_ms"])
                    print(
                        f"S={s} rep {rep + 1}/{args.reps} {key}: {value:.0f} samples/s, CPU ms/step {cpu} "
                        f"(load {before:.2f})",
                        flush=True,
                    )
            results["throughput"][str(s)] = runs
        if args.seeds:
            source = Path(args.race_spec).resolve() if args.race_spec else None
            spec = spec_for(args.race_kind, 2, 25, tmp, source=source)
            racers = {
                "a": lambda seed: _run_acc_child("acc", args, seed, threads=1),
                "b": lambda seed: _run_acc_child("acc", args, seed, threads=2),
                "c": lambda seed: _run_acc_child("pipeacc", args, seed, workers=2, microbatches=args.microbatches),
                "e": lambda seed: time_to_acc_distributed(spec, args, tmp, seed),
            }
            chosen = [c.strip() for c in args.race_contenders.split(",") if c.strip()]
            acc_runs = []
            for seed in range(args.seeds):
                row = {"seed": seed, "load": {}}
                for key in chosen:
                    row["load"][key] = load()
                    loads.append(row["load"][key])
                    row[key] = racers[key](seed)
                    print(f"seed {seed}: ({key}) {_acc_cell(row[key])} {_acc_extra(row[key])} "
                          f"(load {row['load'][key]:.2f})", flush=True)  # fmt: skip
                acc_runs.append(row)
            results["accuracy"] = {
                "target": args.target,
                "eval_every": args.eval_every,
                "runs": acc_runs,
                "contenders": chosen,
                "kind": args.race_kind,
                "kind_label": KIND_LABELS[args.race_kind],
                "spec": spec.read_text(),
            }
    loads.append(load())
    results["load_min"], results["load_max"] = min(loads), max(loads)
    results["total_s"] = time.perf_counter() - began
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    section = markdown(results)
    print(section)
    if args.write:
        write_section(Path(args.write), section)
        print(f"wrote the Throughput section of {args.write}")
    return 0


def _run_acc_child(child: str, args, seed: int, **extra) -> dict:
    """(a), (b) or (c) to the target, in a fresh process."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--data", args.data, "--seed", str(seed)]
    argv += ["--depth", str(DEPTH)]
    argv += ["--batch-size", str(args.batch_size), "--steps", str(args.acc_steps), "--eval-every", str(args.eval_every)]
    argv += ["--target", str(args.target)]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    started = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=3600, env=env(), cwd=ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"time to accuracy ({child} {extra}) failed ({r.returncode}):\n{r.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["wall_s"] = time.perf_counter() - started
    return result


if __name__ == "__main__":
    sys.exit(main())
