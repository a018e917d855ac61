"""A hierarchical recurrent program on two processes (the runtime is dnicompile.runtime.bptt_distributed), trained by
the one training loop ([Note: runners]): rank 0 trains the lower core and is the driver (it measures, evaluates
and writes the metrics and outputs), rank 1 trains the upper core. Launched by train/launch.py. Both ranks write
each checkpoint and resume from one ([Note: hierarchical checkpoints]), through the same functions as a run in
one process (checkpoint.program_entries / restore_program, with this rank's `Share`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console

from ..checkpoint import Share, program_entries, restore_program, write_checkpoint
from ..errors import DNIError, SpecError
from ..runtime.bptt_distributed import PLACEMENT, TAG_STATS, LowerRuntime, UpperWorker, recv_upper, send_upper
from .distributed import RankRunner
from .loop import FitOptions, RunCheckpoint, fit
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


def stage_keys(program, index: int) -> list[str]:
    """The model's state_dict names of the tensors stage `index` trains (parameters and buffers of its modules)."""
    own = {id(t) for m in program.stage_modules(index) for t in (*m.parameters(), *m.buffers())}
    others = {
        id(t) for i in range(program.num_stages) if i != index for m in program.stage_modules(i) for t in m.parameters()
    }
    return [k for k, v in program.model.state_dict(keep_vars=True).items() if id(v) in own - others]


# --------------------------------------------------------------------------- the two ranks
class CoreRank(RankRunner):
    """A rank of the two: its checkpoints hold its share of the run's ([Note: hierarchical checkpoints])."""

    def share(self, program) -> Share:
        keys = stage_keys(program, 1)
        mine = keys if self.rank == 1 else [k for k in program.model.state_dict() if k not in set(keys)]
        return Share(self.rank, PLACEMENT, self.state, mine)

    def save_checkpoint(self, out_dir: Path, step: int, program, task, keep: int) -> str:
        self.state.share_segment()  # collective: rank 0 gets the upper's open segment
        task_state = task.state_dict() if self.is_driver else None
        entries = program_entries(program, task_state, step, self.share(program))
        return write_checkpoint(out_dir, step, entries, keep, self.rank, len(PLACEMENT)).name

    def restore(self, program, task, resume: RunCheckpoint, device) -> tuple[int, Path]:
        return restore_program(program, task, resume.open(), device, self.share(program)), resume.path.parent


class LowerCore(CoreRank):
    """Rank 0, the driver: the lower core on the local runtime's schedule, the upper core behind messages."""

    is_driver = True

    def __init__(self, timeout: timedelta) -> None:
        super().__init__(0, torch.device("cpu"))
        self.timeout = timeout

    def build(self, program, device, options) -> None:
        self.runtime = LowerRuntime(program, self.timeout)  # [Note: seeds]: as the local runtime is built
        program._runtime = self.state = self.runtime

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


class UpperCore(CoreRank):
    """Rank 1: the upper core on the lower's messages (runtime/bptt_distributed.UpperWorker)."""

    is_driver = False

    def __init__(self, timeout: timedelta) -> None:
        super().__init__(1, torch.device("cpu"))
        self.timeout = timeout

    def build(self, program, device, options) -> None:
        self.worker = self.state = UpperWorker(program, self.timeout)

    def step(self, task, program, batch, step: int):
        self.agree(step)
        x, y, first = batch
        self.worker.step(y, x.shape[1], x.shape[0], first)
        return UpperStep()

    def log_fields(self, result) -> dict:
        seg = self.worker.segment
        dist.send(torch.tensor([seg.loss_sum, float(seg.loss_n), float(seg.updates)]), 0, tag=TAG_STATS)
        seg.loss_sum, seg.loss_n = 0.0, 0
        return {}

    def evaluate(self, task, program, step: int):
        send_upper(program)
        return None

    def finish(self) -> None:
        super().finish()
        self.worker.drain()


def train_core(program, rank: int, cfg) -> dict:
    """Train this rank's core with the one training loop, checkpointing where asked and resuming from
    `cfg.resume` ([Note: hierarchical checkpoints]); rank 0 writes the outputs. Returns the summary."""
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
        out_dir=Path(cfg.out_dir) if cfg.out_dir else None,  # checkpoints (both ranks), metrics.csv, tensorboard/
        loggers=cfg.loggers,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints,
        resume=RunCheckpoint(Path(cfg.resume)) if cfg.resume else None,  # the folder the launcher chose
        command=cfg.command,
    )
    console = Console(quiet=True)
    summary = fit(program, TextTask(spec.data, cfg.data_dir), options, console, runner)
    runner.finish()
    done = summary["steps_done"]
    if summary.get("stopped_by", "SIGINT") != "SIGINT" and done % cfg.eval_every:
        # stopped at an agreed step between evaluations: rank 0's copy of the upper core is the last evaluation's
        recv_upper(program) if rank == 0 else send_upper(program)
    dist.barrier()
    summary["workers"] = 2
    if rank == 0 and cfg.out_dir:
        write_outputs(program, summary, Path(cfg.out_dir), cfg.title)
    if rank == 1:
        summary["updates"] = runner.worker.segment.updates
    return summary
