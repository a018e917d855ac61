"""The training loop of one rank of the distributed runtime: data, steps, evaluation, checkpoints, metrics.

Every rank draws the same batches (same seed); the last rank (the driver, which computes the loss)
drives the progress bar and writes the metrics file, the final weights and the plots.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console

from ..files import remove_stale_tmp, write_atomic
from ..runtime.distributed import RankWorker, load_checkpoint, save_checkpoint
from .data import Batches, load_dataset
from .outputs import MetricsWriter, plot_curves, resume_metrics
from .tasks import shape_batch


def train_rank(program, rank: int, world: int, placement, device, cfg) -> dict:
    spec = program.spec
    dcfg = spec.distributed
    data = load_dataset(spec.data.name, cfg.data_dir or spec.data.path)
    program.to(device)
    program.train()
    torch.manual_seed(cfg.seed)  # as fit() does, right before the interfaces are built [Note: seeds]
    program.build_runtime().to(device)
    worker = RankWorker(program, rank, world, placement, device, dcfg.timeout_s)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    start = 0
    if cfg.resume:  # the folder the launcher chose (find_checkpoint)
        start = load_checkpoint(worker, Path(cfg.resume))
    batches = Batches(data.train_x, data.train_y, cfg.batch_size, cfg.seed)
    batches.skip(start)
    console = Console(quiet=not (worker.is_driver and cfg.progress), highlight=False)
    metrics_path = Path(cfg.metrics_path) if worker.is_driver and cfg.metrics_path else None
    history = []
    if worker.is_driver and out_dir is not None:
        remove_stale_tmp(out_dir)
    if start and metrics_path is not None:  # cut back to the checkpoint's step
        history = resume_metrics(metrics_path, start, Path(cfg.resume).parent / "metrics.jsonl")
    metrics = MetricsWriter(metrics_path, append=start > 0)
    metrics.rows = history
    if start:
        console.print(f"resumed from step {start}")
    console.print(
        f"rank {rank}/{world}: {worker.stage_names}"
        if not worker.is_driver
        else f"{world} workers; driver rank {rank} runs {worker.stage_names}"
    )
    summary = {"steps_done": start, "test_accuracy": None, "workers": world, "placement": placement}
    log_every = dcfg.log_every
    window_start, window_samples, begin = time.perf_counter(), 0, time.perf_counter()
    worker.stats.cpu_mark = time.process_time()
    paused = 0.0  # seconds spent in evaluation and checkpoints: `train_s` is elapsed_s without them
    for step in range(start, cfg.steps):
        x, y = batches.next()
        x, y = shape_batch(program, x).to(device), y.to(device)
        done = step + 1
        evaluating = done % cfg.eval_every == 0 or done == cfg.steps
        checkpointing = out_dir is not None and bool(dcfg.checkpoint_every) and done % dcfg.checkpoint_every == 0
        # cosine and synthesizer loss of the outgoing cut: measured over the last steps before a log line
        stats = (-done) % log_every <= worker.depth + 1 or done == cfg.steps
        result = worker.train_step(step, x, y, stats=stats, prefetch=not (evaluating or checkpointing))
        window_samples += len(x)
        summary["steps_done"] = done
        if done % log_every == 0 or done == cfg.steps:
            gathered = worker.gather_stats(result)
            if worker.is_driver:
                now = time.perf_counter()
                row = {
                    "step": done,
                    "loss": result.loss,
                    "train_accuracy": float((result.output.argmax(-1) == y).float().mean()),
                    "samples_per_s": window_samples / (now - window_start),
                    "elapsed_s": now - begin,
                    "train_s": now - begin - paused,
                    **gathered,
                }
                metrics.write(row)
                console.print(
                    f"step {done:>6}: loss {row['loss']:.4f}, {row['samples_per_s']:.0f} samples/s, "
                    f"staleness {row['staleness']:.2f}"
                )
                window_start, window_samples = now, 0
        if evaluating or checkpointing:
            worker.mark_pause()
        if evaluating:
            pause = time.perf_counter()
            worker.drain()
            train_s = pause - begin - paused  # the pipeline is drained inside the evaluation's time
            evaluated = worker.evaluate(data.test_x, data.test_y)
            if worker.is_driver:
                acc, test_loss = evaluated
                summary["test_accuracy"] = acc
                metrics.write(
                    {
                        "step": done,
                        "loss": result.loss,
                        "test_accuracy": acc,
                        "test_loss": test_loss,
                        "elapsed_s": time.perf_counter() - begin,
                        "train_s": train_s,
                    }
                )
                console.print(f"step {done:>6}: test accuracy {acc:.4f}")
            window_start = time.perf_counter()
            paused += window_start - pause
        if checkpointing:
            pause = time.perf_counter()
            worker.drain()
            save_checkpoint(worker, out_dir, done, getattr(cfg, "keep_checkpoints", 2))
            window_start = time.perf_counter()
            paused += window_start - pause
        if evaluating or checkpointing:
            worker.pause_stats()
    worker.drain()
    summary["elapsed_s"] = time.perf_counter() - begin
    full = gather_weights(worker)
    if worker.is_driver:
        metrics.close()
        if out_dir is not None:
            write_atomic(out_dir / "model.pt", lambda p: torch.save(full, p))
            write_atomic(out_dir / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
            plot_curves(metrics.rows, out_dir / "curves.png", f"{type(program.model).__name__}, {world} workers")
        acc = summary["test_accuracy"]
        console.print(
            f"done: {summary['steps_done']} steps in {summary['elapsed_s']:.1f}s"
            + (f", test accuracy {acc:.4f}" if acc is not None else "")
        )
    dist.barrier()
    return summary


WEIGHTS_TAG = 11  # p2p tag of the final weights sent to the driver


def _stage_state(program, first: int, last: int) -> dict:
    """The parameters and buffers of stages first..last, by the model's state_dict keys, where they live."""
    state = {}
    for s in range(first, last + 1):
        for k, v in program.stages[s].graph_module.state_dict().items():
            state[k] = v.detach()
    return state


def gather_weights(worker) -> dict | None:
    """Every rank's stages' parameters and buffers on the driver (None elsewhere), for model.pt. Tensors only
    travel: every rank built the same program, so the driver knows each rank's keys, shapes and dtypes and
    receives into buffers of its own making (no pickled objects between ranks)."""
    if not worker.is_driver:
        worker.p2p.send(
            list(_stage_state(worker.program, worker.first, worker.last).values()), worker.world - 1, WEIGHTS_TAG
        )
        worker.p2p.flush()
        return None
    full = {}
    for r in range(worker.world - 1):
        first, last = worker.placement[r]
        for k, v in _stage_state(worker.program, first, last).items():
            buf = torch.empty(v.shape, dtype=v.dtype, device=worker.device)
            worker.p2p.recv(buf, r, f"the final weights of rank {r} (`{k}`)", tag=WEIGHTS_TAG)
            full[k] = buf.cpu()
    full.update(worker.owned_state())
    return full
