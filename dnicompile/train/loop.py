"""The training loop: one for every program and task.

[Note: one loop] `fit(program, task, options)` trains any program (feed-forward or recurrent) on any task; what
differs between data sets is a `Task` plug-in: where batches come from, what one step is given, what a log
line and an evaluation add. The built-in tasks (Fashion-MNIST classification, Copy / Repeat-Copy with their
curriculum, text streams) live in `train/tasks.py`; the GPT example brings its own. The loop owns the rest:
seeding and building the runtime ([Note: seeds]), timing, the progress bar, metrics lines, evaluation every
`eval_every` steps and at the end, checkpoints ([Note: run checkpoints]), and a clean stop on Ctrl-C or
SIGTERM that keeps what was written.

[Note: run checkpoints] With an output folder and `checkpoint_every`, the loop writes `ckpt-<step>/` every
`checkpoint_every` steps, at the end, and when Ctrl-C or SIGTERM stops it (at the end of the step under way,
so a checkpoint never holds half a step): the model's tensors, the runtime's state (optimizers, schedulers,
clocks, synthesizers: [Note: checkpoint format]), the task's (`Task.state_dict`: data position, curriculum,
running averages), torch's random state and the step, in torch.distributed.checkpoint's format, the same for
one process and several workers ([Note: dcp checkpoints]). It keeps the newest `keep_checkpoints` ([Note:
checkpoint files]). Resuming (`FitOptions.resume`, from `load_run_checkpoint`) builds everything as a fresh
run does, loads those states (from a run on any number of workers), cuts the metrics file back to the
checkpoint's step and goes on from the next step: the run ends with the parameters of one that never stopped.
Every file holds tensors and plain values only and is read without running code.

[Note: runners] Where the steps run is a `Runner`: the default runs them in this process, on the program's
local runtime. A rank of a multi-process run brings its own (train/distributed.py: the feed-forward ranks;
train/hierarchical.py: the two cores of a hierarchical program), so every rank runs this same loop. Some hooks
are collective (the statistics of a log line, evaluation, checkpoints, agreeing to stop): fit calls them on every
rank at the same steps, which depend on the options alone. Only the driver (the rank that computes the loss)
measures, checks the loss, writes metrics and prints; a stop asked by a signal is agreed by every rank before
any acts on it, so that they all checkpoint the same step.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..checkpoint import Checkpoint, find_checkpoint, program_entries, restore_program, write_checkpoint
from ..errors import DNIError
from ..files import remove_stale_tmp
from .loggers import MetricsWriter, log_folder, open_loggers, read_metrics
from .outputs import resolve_device


@dataclass
class FitOptions:
    """How long and how to train; where the metrics go ([Note: loggers])."""

    steps: int = 1000
    batch_size: int = 128
    eval_every: int = 200
    seed: int = 0
    device: str = "cpu"
    log_every: int = 10
    metrics_path: Path | None = None  # the jsonl logger's file
    out_dir: Path | None = None
    # names in train/loggers.py (jsonl, csv, tensorboard; csv and tensorboard write into out_dir, else next to
    # metrics_path) or Logger objects
    loggers: list = field(default_factory=lambda: ["jsonl"])
    checkpoint_every: int | None = None  # with out_dir: ckpt-<step>/ every N steps, at the end, on a stop
    keep_checkpoints: int = 2
    resume: RunCheckpoint | None = None  # continue after this checkpoint's step (see load_run_checkpoint)
    command: list[str] | None = None  # the command line that started the run (default: sys.argv), for the summary


class Task:
    """A plug-in of the training loop. Subclasses set `name` and implement `next` and `step`; the rest has
    defaults. `setup` runs once, after the program is on its device and its runtime is built."""

    name = "task"
    rate_key = "samples_per_s"  # what `count` counts per second in the log lines

    def setup(self, program, device: torch.device, options: FitOptions, console: Console) -> None:
        self.program, self.device, self.options = program, device, options

    def next(self) -> Any:
        """The next training batch, on the device."""
        raise NotImplementedError

    def step(self, program, batch):
        """One training step on `batch`; returns the runtime's step result (loss, cosine, synth_loss, ...)."""
        raise NotImplementedError

    def count(self, batch) -> int:
        """How many samples (or characters) `batch` holds, for the rate in the log lines."""
        return len(batch[0])

    def measure(self, result, batch) -> dict:
        """Called after every step: the task's own fields for a log line (training accuracy, ...)."""
        return {}

    def log_now(self) -> bool:
        """Whether this step must be logged even off the `log_every` grid (e.g. the curriculum moved on)."""
        return False

    def note(self, step: int) -> str | None:
        """A line to print after this step, if something happened."""
        return None

    def status(self, rate: float) -> str:
        """The progress bar's status text."""
        return ""

    def evaluate(self, program, step: int) -> tuple[dict, str | None] | None:
        """Held-out scores: (fields of the evaluation line, a line to print or None); None for none."""
        return None

    def summary(self) -> dict:
        """What the run's summary records of this task, at any point of the run."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint keeps of this task (data position, curriculum, running averages), as tensors and
        plain values; called after `setup`. A task whose batches depend on nothing but the step keeps {}."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s result; called after `setup`, before the first step of a resumed run."""


class Runner:
    """Where fit's steps run ([Note: runners]): in this process, on the program's local runtime. Subclasses run
    one rank of several; their collective hooks are called by every rank at the same steps."""

    is_driver = True  # measures, checks the loss, writes the metrics and prints

    def build(self, program, device: torch.device, options: FitOptions) -> None:
        """Right after the run's seed is set ([Note: seeds]): the runtime, on its device."""
        program.runtime.to(device)

    def setup(self, program, task: Task, options: FitOptions, stop) -> None:
        """After the task's setup; `stop.signum` is set once a signal asks the run to stop."""
        self.stop = stop

    def step(self, task: Task, program, batch, step: int):
        """Training step `step` (1-based) on `batch`."""
        return task.step(program, batch)

    def log_fields(self, result) -> dict:
        """Collective, on each log line's step: fields of the line beyond the task's (every rank's statistics)."""
        return {}

    def evaluate(self, task: Task, program, step: int):
        """Collective: the task's evaluation, as Task.evaluate (None on ranks that do not score)."""
        return task.evaluate(program, step)

    def stopping(self, step: int) -> bool:
        """Collective: whether every rank stops after this step (a signal asked for it)."""
        return self.stop.signum is not None

    def save_checkpoint(self, out_dir: Path, step: int, program, task: Task, keep: int) -> str:
        """Collective: write this run's checkpoint after `step`; returns its name."""
        return save_run_checkpoint(out_dir, step, program, task, keep).name

    def restore(self, program, task: Task, resume, device: torch.device) -> tuple[int, Path]:
        """Load `resume` (options.resume) into the freshly built run: (its step, the folder of its metrics)."""
        return _restore(program, task, resume, device), resume.path.parent

    def pause(self) -> None:
        """Evaluation or a checkpoint begins: their time is not training time."""

    def unpause(self) -> None:
        """Evaluation and checkpoints are over."""


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
        disable=console.quiet or not console.is_terminal,
    )


# --------------------------------------------------------------------------- checkpoints
@dataclass
class RunCheckpoint:
    """A checkpoint chosen for --resume: its folder, opened (and read) on first use ([Note: dcp checkpoints])."""

    path: Path
    checkpoint: Checkpoint | None = None

    def open(self) -> Checkpoint:
        if self.checkpoint is None:
            self.checkpoint = Checkpoint(self.path)
        return self.checkpoint

    @property
    def step(self) -> int:
        return self.open().step


def save_run_checkpoint(out_dir: Path, step: int, program, task: Task, keep: int) -> Path:
    """Write ckpt-<step>/ into `out_dir` (torch.distributed.checkpoint, fsynced, renamed into place), point LATEST
    at it and keep the newest `keep` checkpoints."""
    return write_checkpoint(out_dir, step, program_entries(program, task.state_dict(), step), keep)


def load_run_checkpoint(folder: Path, say=None) -> RunCheckpoint:
    """The newest checkpoint in `folder` that reads whole, for --resume; `say(text)` hears which one it is and
    which newer ones were skipped as damaged. A file that asks to run code is refused (UnsafeFileError), not
    skipped; no readable checkpoint at all is a DNIError. A checkpoint written by several workers resumes here."""
    ckpt = find_checkpoint(Path(folder), say)
    return RunCheckpoint(ckpt.path, ckpt)


def _restore(program, task: Task, ckpt: RunCheckpoint, device: torch.device) -> int:
    """Load a run checkpoint into a freshly built program, runtime and task; returns its step."""
    return restore_program(program, task, ckpt.open(), device)


class _StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM ask the loop to stop after the step under way (and checkpoint); a second one
    stops at once (KeyboardInterrupt). Only in the main thread, and a signal ignored before stays ignored."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                before = signal.getsignal(sig)
                if before is signal.SIG_IGN or before is None:
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, before in self._previous.items():
            signal.signal(sig, before)

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name


def run_record(program, options: FitOptions) -> dict:
    """What a summary records of how the run was made: the spec as validated, seed, device, versions, command."""
    import platform
    import sys
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("dnicompile")
    except PackageNotFoundError:
        own = None
    return {
        "seed": options.seed,
        "device": str(options.device),
        "steps": options.steps,
        "batch_size": options.batch_size,
        "command": list(options.command or sys.argv),
        "versions": {"dnicompile": own, "torch": torch.__version__, "python": platform.python_version()},
        "spec": program.spec.model_dump(mode="json"),
    }


def _non_finite(program, step: int, loss: float, saved_at: int | None) -> DNIError:
    """The run stops at a NaN or infinite loss (exit 2): which step, which stage first holds non-finite
    parameters, what to try, and which checkpoint is the last good one."""
    bad = next(
        (
            i
            for i in range(program.num_stages)
            if any(not bool(torch.isfinite(p).all()) for p in program.stage_parameters(i))
        ),
        None,
    )
    where = (
        f"stage{bad}'s parameters are the first that are not finite"
        if bad is not None
        else "every parameter is still finite (the loss itself overflowed)"
    )
    kept = f"; the last good checkpoint is step {saved_at}'s (--resume from --out)" if saved_at else ""
    return DNIError(
        f"the training loss is {loss} at step {step}: {where}. Lower the learning rate (of that stage or its "
        f"synthesizer / head), check the inputs for NaN or huge values, or clip gradients{kept}."
    )


def fit(program, task: Task, options: FitOptions, console: Console | None = None, runner: Runner | None = None) -> dict:
    """Train `program` on `task` for options.steps steps; returns a summary with every metrics line (`rows`).
    Ctrl-C or SIGTERM stops after the step under way, writing a checkpoint where checkpoints are on
    (`interrupted` and `stopped_by` in the summary); a second one stops at once. With `options.resume` the run
    goes on from that checkpoint's step ([Note: run checkpoints]). `runner`: where the steps run (default: this
    process; [Note: runners])."""
    console = console or Console(quiet=True)
    runner = runner or Runner()
    device = resolve_device(options.device)
    torch.manual_seed(options.seed)  # [Note: seeds]: right before the runtime's models are drawn
    program.to(device)
    program.train()
    runner.build(program, device, options)
    task.setup(program, device, options, console)
    out_dir = options.out_dir
    saving = out_dir is not None and bool(options.checkpoint_every)
    if out_dir is not None and runner.is_driver:
        remove_stale_tmp(out_dir)
    start = 0
    history, previous = [], None
    if options.resume is not None:
        start, previous = runner.restore(program, task, options.resume, device)
        console.print(f"resumed from step {start} ({options.resume.path.name})", highlight=False)
    if start and options.metrics_path is not None:  # the resumed run's records, for the summary and metrics.jsonl
        source = previous / "metrics.jsonl"
        history = read_metrics(source if source.is_file() else options.metrics_path, start)
    loggers = []
    if runner.is_driver:
        folder = log_folder(options.out_dir, options.metrics_path)
        loggers = open_loggers(options.loggers, options.metrics_path, folder, start, history, previous)
    metrics = MetricsWriter(loggers, history)
    summary: dict = {**task.summary(), "steps_done": start, "interrupted": False, "run": run_record(program, options)}
    saved_at = start if options.resume is not None else None
    window_t, window_n, begin, paused = 0.0, 0, time.perf_counter(), 0.0
    progress = _progress(console)
    # where no progress bar can be drawn (a log file, a pipe), a plain line about 20 times a run, on log steps
    plain = runner.is_driver and not console.quiet and not console.is_terminal
    line_every = options.log_every * max(1, options.steps // (20 * options.log_every))
    stop = _StopSignals()
    stopped, saved_name = False, None

    def pause() -> float:
        runner.pause()
        return time.perf_counter()

    def unpause(since: float) -> None:
        nonlocal paused
        paused += time.perf_counter() - since
        runner.unpause()

    try:
        with stop, progress:
            runner.setup(program, task, options, stop)
            bar = progress.add_task("train", total=options.steps, completed=start, status="")
            for step in range(start + 1, options.steps + 1):
                batch = task.next()
                t0 = time.perf_counter()
                result = runner.step(task, program, batch, step)
                if runner.is_driver and not math.isfinite(result.loss):
                    raise _non_finite(program, step, result.loss, saved_at)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                window_t += time.perf_counter() - t0
                window_n += task.count(batch)
                fields = task.measure(result, batch) if runner.is_driver else {}
                summary.update(task.summary(), steps_done=step)
                if step % options.log_every == 0 or step == options.steps or task.log_now():
                    extra = runner.log_fields(result)
                    rate = window_n / window_t if window_t > 0 else 0.0
                    now = time.perf_counter()
                    row = {
                        "step": step,
                        "loss": result.loss,
                        task.rate_key: rate,
                        "elapsed_s": now - begin,
                        "train_s": now - begin - paused,
                        "cosine": result.cosine,
                        "synth_loss": result.synth_loss,
                        **fields,
                        **extra,
                    }
                    if runner.is_driver:
                        metrics.write(row)
                        progress.update(bar, status=task.status(rate))
                        if plain and (step % line_every == 0 or step == options.steps):
                            console.print(f"step {step:>6}/{options.steps}: {task.status(rate)}", highlight=False)
                    window_t, window_n = 0.0, 0
                note = task.note(step) if runner.is_driver else None
                if note:
                    progress.console.print(note, highlight=False)
                if step % options.eval_every == 0 or step == options.steps:
                    since = pause()
                    train_s = since - begin - paused
                    evaluated = runner.evaluate(task, program, step)
                    if evaluated is not None:
                        scores, line = evaluated
                        now = time.perf_counter()
                        row = {"step": step, **scores, "elapsed_s": now - begin, "train_s": train_s}
                        metrics.write(row, "eval")
                        summary.update(task.summary())
                        if line:
                            progress.console.print(line, highlight=False)
                    unpause(since)
                stopped = runner.stopping(step)
                if saving and (step % options.checkpoint_every == 0 or stopped):
                    since = pause()
                    saved_name = runner.save_checkpoint(out_dir, step, program, task, options.keep_checkpoints)
                    saved_at = step
                    unpause(since)
                progress.update(bar, advance=1)
                if stopped:
                    break
        if stopped:
            summary.update(interrupted=True, stopped_by=stop.name or "another worker's signal")
            wrote = f"; wrote {saved_name}" if saving and saved_at == summary["steps_done"] else ""
            how = "interrupted" if stop.signum == signal.SIGINT else "stopped by " + summary["stopped_by"]
            console.print(f"{how} at step {summary['steps_done']}{wrote}; keeping what was written.", highlight=False)
        elif saving and summary["steps_done"] != saved_at:
            since = pause()
            runner.save_checkpoint(out_dir, summary["steps_done"], program, task, options.keep_checkpoints)
            unpause(since)
    except KeyboardInterrupt:
        summary.update(interrupted=True, stopped_by="SIGINT")
        console.print(f"interrupted at step {summary['steps_done']}; keeping what was written.", highlight=False)
    finally:
        metrics.close()
    summary.update(task.summary())
    summary["elapsed_s"] = time.perf_counter() - begin
    summary["train_s"] = summary["elapsed_s"] - paused
    summary["rows"] = metrics.rows
    return summary
