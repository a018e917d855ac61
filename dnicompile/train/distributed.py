"""One rank of a multi-process run, trained by the one training loop (train/loop.py, [Note: runners]).

`RankRunner` is what every rank's runner shares: agreeing with the other ranks to stop ([Note: agreed stop]).
`PipelineRank` runs a feed-forward program's stages on one rank (runtime/distributed.RankWorker); the two cores of
a hierarchical program have theirs in train/hierarchical.py. Every rank draws the same batches (same seed); the
last rank (the driver, which computes the loss) measures, writes the metrics file, the final weights and the
plots.

[Note: agreed stop] A signal reaches each rank at its own moment, but a checkpoint must hold the same step on
every rank. So a rank never acts on its own signal: every `log_every` steps each rank contributes "a signal asked
me to stop" to an all-reduce (MAX), started without waiting and read `log_every` steps later, before that step
runs; when any rank asked, every rank stops after that same step (checkpointing it where checkpoints are on).
A stop takes effect within two log intervals; the all-reduce never makes a rank wait for a slower one, since it
was started a whole interval before it is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console

from ..checkpoint import restore_worker
from ..files import write_atomic
from ..runtime.distributed import RankWorker, save_checkpoint
from .data import load_dataset
from .loop import FitOptions, RunCheckpoint, Runner, fit
from .outputs import cut_kinds, plot_curves
from .tasks import Classification


class RankRunner(Runner):
    """A rank of several: the stop is agreed by every rank ([Note: agreed stop])."""

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank, self.device = rank, device
        self._vote: tuple[torch.Tensor, object] | None = None
        self._agreed = False

    def setup(self, program, task, options: FitOptions, stop) -> None:
        super().setup(program, task, options, stop)
        self.options = options

    def agree(self, step: int) -> None:
        """Before step `step`: on the grid, read the vote started one interval ago and start the next one."""
        if self._agreed or step % self.options.log_every:
            return
        if self._vote is not None:
            flag, work = self._vote
            work.wait()
            self._vote = None
            if float(flag.max()) > 0:
                self._agreed = True
                return
        flag = torch.tensor([1.0 if self.stop.signum is not None else 0.0], device=self.device)
        self._vote = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True))

    def stopping(self, step: int) -> bool:
        return self._agreed

    def finish(self) -> None:
        """After the loop: wait for the vote still under way (every rank started it)."""
        if self._vote is not None:
            self._vote[1].wait()
            self._vote = None


class PipelineRank(RankRunner):
    """The stages a placement gives this rank, in the one training loop: its steps, every rank's statistics at
    each log line, evaluation through the pipeline, and a checkpoint to which each rank writes the keys of its
    stages (runtime/distributed.save_checkpoint, [Note: dcp checkpoints])."""

    def __init__(self, rank: int, world: int, placement, device: torch.device, timeout_s: float) -> None:
        super().__init__(rank, device)
        self.world, self.placement, self.timeout_s = world, placement, timeout_s
        self.is_driver = rank == world - 1

    def build(self, program, device, options) -> None:
        program.build_runtime().to(device)  # [Note: seeds]: as in one process
        self.worker = RankWorker(program, self.rank, self.world, self.placement, device, self.timeout_s)

    def setup(self, program, task, options, stop) -> None:
        super().setup(program, task, options, stop)
        self.saving = options.out_dir is not None and bool(options.checkpoint_every)
        self.worker.mark_pause()
        self.worker.pause_stats()  # CPU time per step counts from here

    def step(self, task, program, batch, step: int):
        self.agree(step)
        o, x, y = self.options, *batch
        last = step == o.steps
        evaluating = step % o.eval_every == 0 or last
        checkpointing = self.saving and step % o.checkpoint_every == 0
        # cosine and synthesizer loss of the outgoing cut: measured over the last steps before a log line
        stats = (-step) % o.log_every <= self.worker.depth + 1 or last
        # the next step's activations may be received during this one, if it is a training step like this
        prefetch = not (evaluating or checkpointing or self._agreed or last)
        return self.worker.train_step(step - 1, x, y, stats=stats, prefetch=prefetch)

    def log_fields(self, result) -> dict:
        return self.worker.gather_stats(result) or {}

    def pause(self) -> None:
        self.worker.mark_pause()
        self.worker.drain()

    def unpause(self) -> None:
        self.worker.pause_stats()

    def evaluate(self, task, program, step: int):
        scored = self.worker.evaluate(task.data.test_x, task.data.test_y)
        return None if scored is None else task.scored(step, *scored)

    def save_checkpoint(self, out_dir: Path, step: int, program, task, keep: int) -> str:
        return save_checkpoint(self.worker, out_dir, step, keep, task.state_dict()).name

    def restore(self, program, task, resume: RunCheckpoint, device) -> tuple[int, Path]:
        # the keys of this rank's stages, from a checkpoint of any number of workers ([Note: resuming on other
        # workers]); the launcher chose it and read it whole
        return restore_worker(self.worker, task, resume.open(), device), resume.path.parent

    def finish(self) -> None:
        super().finish()
        self.worker.drain()


def train_rank(program, rank: int, world: int, placement, device, cfg) -> dict:
    """Train this rank's stages with the one training loop; the driver writes the outputs. Returns the summary."""
    spec = program.spec
    runner = PipelineRank(rank, world, placement, device, spec.distributed.timeout_s)
    driver = runner.is_driver
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    options = FitOptions(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        eval_every=cfg.eval_every,
        seed=cfg.seed,
        device=str(device),
        log_every=cfg.log_every,
        metrics_path=Path(cfg.metrics_path) if driver and cfg.metrics_path else None,
        loggers=cfg.loggers,
        out_dir=out_dir,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints,
        resume=RunCheckpoint(Path(cfg.resume)) if cfg.resume else None,  # the folder find_checkpoint chose
        command=cfg.command,
    )
    console = Console(quiet=not (driver and cfg.progress), highlight=False)
    data = load_dataset(spec.data.name, cfg.data_dir or spec.data.path)
    summary = fit(program, Classification(data), options, console, runner)
    runner.finish()
    summary.update(workers=world, placement=placement)
    full = gather_weights(runner.worker)
    if driver:
        if out_dir is not None:
            write_atomic(out_dir / "model.pt", lambda p: torch.save(full, p))
            final = {k: v for k, v in summary.items() if k != "rows"}
            write_atomic(out_dir / "summary.json", lambda p: p.write_text(json.dumps(final, indent=2) + "\n"))
            title = f"{type(program.model).__name__}, {world} workers"
            plot_curves(summary["rows"], out_dir / "curves.png", title, cut_kinds(program))
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
