"""Launching a hierarchical recurrent program on two processes (the runtime is dnicompile.runtime.bptt_distributed):
rank 0 trains the lower core, rank 1 the upper; rank 0 writes the metrics and outputs."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import DNIError, SpecError
from ..runtime.bptt_distributed import TAG_STATS, LowerRuntime, UpperWorker, recv_upper, send_upper
from .launch import LoopbackStore, join_group, leave_group, report_failure, run_workers, write_report, write_started


@dataclass
class HierarchicalRunConfig:
    model_path: str
    spec_path: str
    steps: int
    batch_size: int
    eval_every: int
    seed: int
    data: str | None
    threads: int = 1
    log_every: int = 10
    out_dir: str | None = None
    metrics_path: str | None = None
    title: str = ""
    error_dir: str = ""
    store_port: int = 0  # the launcher's loopback TCPStore ([Note: loopback] in train/launch.py)


def check_distributed(program) -> None:
    """Raise a DNIError unless the program can be split over two ranks."""
    spec = program.spec
    if program.upper is None:
        raise DNIError(
            "--workers 2 puts the two cores of a hierarchical program on two processes, but this recurrent program "
            f"has one core ({spec.where('recurrent')}); train it in one process (without --workers)."
        )
    if program.upper.config.synthetic_gradient is None:
        raise SpecError(
            f"{spec.where('recurrent', 'upper')}: with --workers 2 the lower core must not wait for the upper's "
            "gradient: give `upper` a `synthetic_gradient` (an exact interface locks the two ranks step by step)."
        )
    if spec.data is None or spec.data.name != "text":
        raise DNIError(f"{spec.where('data')}: a hierarchical program trains on `data: text`.")


# --------------------------------------------------------------------------- the two loops
def train_rank(rank: int, cfg: HierarchicalRunConfig) -> dict | None:
    """Train this rank's core; rank 0 returns the summary (and writes metrics and outputs)."""
    from ..compile.model_file import build_model
    from ..recurrent import compile_recurrent
    from ..spec import load_spec
    from .outputs import MetricsWriter
    from .tasks import LN2, TextStreams, evaluate_text, load_text

    torch.set_num_threads(cfg.threads)
    spec = load_spec(Path(cfg.spec_path))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model_path, spec.model, spec.model_args)
    program = compile_recurrent(model, spec)
    check_distributed(program)
    timeout = timedelta(seconds=spec.distributed.timeout_s)
    data = load_text(cfg.data, spec.data.split)
    streams = TextStreams(data.train, cfg.batch_size, spec.data.seq_len, program.upper.horizon - 1)
    valid = data.valid[: spec.data.eval_chars] if spec.data.eval_chars else data.valid
    if rank == 1:
        worker = UpperWorker(program, timeout)
        for step in range(1, cfg.steps + 1):
            x, y, first = streams.next()
            worker.step(y, x.shape[1], x.shape[0], first)
            if step % cfg.log_every == 0 or step == cfg.steps:
                stats = torch.tensor([worker.loss_sum, float(worker.loss_n), float(len(worker.updates))])
                dist.send(stats, 0, tag=TAG_STATS)
                worker.loss_sum, worker.loss_n = 0.0, 0
            if step % cfg.eval_every == 0 or step == cfg.steps:
                send_upper(program)
        worker.drain()
        dist.barrier()
        return {"updates": worker.updates}
    runtime = LowerRuntime(program, timeout)
    program._runtime = runtime
    metrics = MetricsWriter(Path(cfg.metrics_path) if cfg.metrics_path else None)
    summary = {"task": "text", "steps_done": 0, "interrupted": False, "bpc": None, "workers": 2}
    start = time.perf_counter()
    upper = runtime.iface.stats  # the upper interface's learning since the last log line
    try:
        for step in range(1, cfg.steps + 1):
            x, y, first = streams.next()
            t0 = time.perf_counter()
            result = program.train_step(x, y, start=first, end=False)
            train_s = time.perf_counter() - t0
            summary["steps_done"] = step
            if step % cfg.log_every == 0 or step == cfg.steps:
                stats = torch.zeros(3)
                dist.recv(stats, 1, tag=TAG_STATS)
                row = {
                    "step": step,
                    "loss": result.loss,
                    "train_bpc": result.loss / LN2,
                    "chars_per_s": x.numel() / train_s if train_s > 0 else 0.0,
                    "elapsed_s": time.perf_counter() - start,
                    "cosine": {**result.cosine, **({"upper": upper.cosine} if upper.count else {})},
                    "synth_loss": result.synth_loss,
                    "upper_updates": int(stats[2]),
                    "queued": len(runtime.awaiting),
                }
                if stats[1] > 0:
                    row["upper_train_bpc"] = float(stats[0] / stats[1]) / LN2
                upper.reset()
                metrics.write(row)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                recv_upper(program)
                scores = evaluate_text(program, valid)
                summary.update(scores)
                metrics.write({"step": step, **scores, "elapsed_s": time.perf_counter() - start})
                print(f"step {step:>6}: held-out bpc {scores['bpc']:.4f}, upper {scores['upper_bpc']:.4f}", flush=True)
        runtime.drain()
        dist.barrier()
    finally:
        metrics.close()
    summary["elapsed_s"] = time.perf_counter() - start
    summary["rows"] = metrics.rows
    if cfg.out_dir:
        from .outputs import write_outputs

        write_outputs(program, summary, Path(cfg.out_dir), cfg.title)
    return summary


def _entry(rank: int, cfg: HierarchicalRunConfig) -> None:
    try:
        from ..spec import load_spec

        timeout = timedelta(seconds=load_spec(Path(cfg.spec_path)).distributed.timeout_s)
        if cfg.error_dir:
            write_started(Path(cfg.error_dir), rank, "lower core" if rank == 0 else "upper core")
        join_group("gloo", rank, 2, timeout, cfg.store_port)
        summary = train_rank(rank, cfg)
        if rank == 0 and cfg.error_dir and summary is not None:
            final = {k: v for k, v in summary.items() if k != "rows"}
            (Path(cfg.error_dir) / "summary.json").write_text(json.dumps(final))
    except BaseException as e:
        if cfg.error_dir:
            write_report(Path(cfg.error_dir), rank, "lower core" if rank == 0 else "upper core", e)
        raise
    finally:
        leave_group()


def launch(cfg: HierarchicalRunConfig) -> tuple[int, dict | None]:
    """Start the two ranks on this host and wait: (exit code, rank 0's summary)."""
    from ..spec import load_spec

    store = LoopbackStore(load_spec(Path(cfg.spec_path)).distributed.timeout_s)
    try:
        cfg.store_port = store.port
        with tempfile.TemporaryDirectory(prefix="dnicompile-hier-") as box:
            cfg.error_dir = box
            result = run_workers(_entry, (cfg,), 2)
            if result.stop_code is not None:
                return result.stop_code, None
            if not result.failed:
                path = Path(box) / "summary.json"
                return 0, json.loads(path.read_text()) if path.exists() else None
            return report_failure(Path(box), result.exits), None
    finally:
        store.close()
