"""A hierarchical recurrent program on two processes (the runtime is dnicompile.runtime.bptt_distributed), trained by
the one training loop ([Note: runners]): rank 0 trains the lower core and is the driver (it measures, evaluates
and writes the metrics and outputs), rank 1 trains the upper core. Launched by train/launch.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console

from ..errors import DNIError, SpecError
from ..runtime.bptt_distributed import TAG_STATS, LowerRuntime, UpperWorker, recv_upper, send_upper
from .distributed import RankRunner
from .loop import FitOptions, fit
from .outputs import write_outputs
from .tasks import LN2, TextTask


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


# --------------------------------------------------------------------------- the two ranks
class LowerCore(RankRunner):
    """Rank 0, the driver: the lower core on the local runtime's schedule, the upper core behind messages."""

    is_driver = True

    def __init__(self, timeout: timedelta) -> None:
        super().__init__(0, torch.device("cpu"))
        self.timeout = timeout

    def build(self, program, device, options) -> None:
        self.runtime = LowerRuntime(program, self.timeout)  # [Note: seeds]: as the local runtime is built
        program._runtime = self.runtime

    def step(self, task, program, batch, step: int):
        self.agree(step)
        return task.step(program, batch)

    def log_fields(self, result) -> dict:
        stats = torch.zeros(3)  # rank 1's upper loss sum and count since the last line, and its updates
        dist.recv(stats, 1, tag=TAG_STATS)
        upper = self.runtime.iface.stats  # the upper interface's learning since the last log line
        fields = {
            "cosine": {**result.cosine, **({"upper": upper.cosine} if upper.count else {})},
            "upper_updates": int(stats[2]),
            "queued": len(self.runtime.awaiting),
        }
        if stats[1] > 0:
            fields["upper_train_bpc"] = float(stats[0] / stats[1]) / LN2
        upper.reset()
        return fields

    def evaluate(self, task, program, step: int):
        recv_upper(program)  # the upper core's parameters as rank 1 has trained them
        return task.evaluate(program, step)

    def finish(self) -> None:
        super().finish()
        self.runtime.drain()


@dataclass
class UpperStep:
    """What a step of rank 1 gives the loop (it measures nothing itself: rank 0 reports its statistics)."""

    loss: float = math.nan
    cosine: dict = field(default_factory=dict)
    synth_loss: dict = field(default_factory=dict)


class UpperCore(RankRunner):
    """Rank 1: the upper core on the lower's messages (runtime/bptt_distributed.UpperWorker)."""

    is_driver = False

    def __init__(self, timeout: timedelta) -> None:
        super().__init__(1, torch.device("cpu"))
        self.timeout = timeout

    def build(self, program, device, options) -> None:
        self.worker = UpperWorker(program, self.timeout)

    def step(self, task, program, batch, step: int):
        self.agree(step)
        x, y, first = batch
        self.worker.step(y, x.shape[1], x.shape[0], first)
        return UpperStep()

    def log_fields(self, result) -> dict:
        w = self.worker
        dist.send(torch.tensor([w.loss_sum, float(w.loss_n), float(len(w.updates))]), 0, tag=TAG_STATS)
        w.loss_sum, w.loss_n = 0.0, 0
        return {}

    def evaluate(self, task, program, step: int):
        send_upper(program)
        return None

    def finish(self) -> None:
        super().finish()
        self.worker.drain()


def train_core(program, rank: int, cfg) -> dict:
    """Train this rank's core with the one training loop; rank 0 writes the outputs. Returns the summary."""
    spec = program.spec
    check_distributed(program)
    timeout = timedelta(seconds=spec.distributed.timeout_s)
    runner = LowerCore(timeout) if rank == 0 else UpperCore(timeout)
    options = FitOptions(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        eval_every=cfg.eval_every,
        seed=cfg.seed,
        log_every=cfg.log_every,
        metrics_path=Path(cfg.metrics_path) if rank == 0 and cfg.metrics_path else None,
        out_dir=Path(cfg.out_dir) if rank == 0 and cfg.out_dir else None,  # for metrics.csv and tensorboard/
        loggers=cfg.loggers,
        checkpoint_every=None,  # a hierarchical run on two workers does not resume (yet)
        command=cfg.command,
    )
    console = Console(quiet=True)
    summary = fit(program, TextTask(spec.data, cfg.data_dir), options, console, runner)
    runner.finish()
    dist.barrier()
    summary["workers"] = 2
    if rank == 0 and cfg.out_dir:
        write_outputs(program, summary, Path(cfg.out_dir), cfg.title)
    if rank == 1:
        summary["updates"] = runner.worker.updates
    return summary
