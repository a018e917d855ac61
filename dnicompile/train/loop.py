"""The training loop: one for every program and task.

[Note: one loop] `fit(program, task, options)` trains any program (feed-forward or recurrent) on any task; what
differs between data sets is a `Task` plug-in: where batches come from, what one step is given, what a log
line and an evaluation add. The built-in tasks (Fashion-MNIST classification, Copy / Repeat-Copy with their
curriculum, text streams) live in `train/tasks.py`; the GPT example brings its own. The loop owns the rest:
seeding and building the runtime ([Note: seeds]), timing, the progress bar, metrics lines, evaluation every
`eval_every` steps and at the end, and a clean stop on Ctrl-C that keeps what was written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .outputs import MetricsWriter, resolve_device


@dataclass
class FitOptions:
    """How long and how to train; where the metrics go."""

    steps: int = 1000
    batch_size: int = 128
    eval_every: int = 200
    seed: int = 0
    device: str = "cpu"
    log_every: int = 10
    metrics_path: Path | None = None
    out_dir: Path | None = None


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


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def fit(program, task: Task, options: FitOptions, console: Console | None = None) -> dict:
    """Train `program` on `task` for options.steps steps; returns a summary with every metrics line (`rows`).
    Ctrl-C stops early, keeping what was written (`interrupted` in the summary)."""
    console = console or Console(quiet=True)
    device = resolve_device(options.device)
    torch.manual_seed(options.seed)  # [Note: seeds]: right before the runtime's models are drawn
    program.to(device)
    program.train()
    program.runtime.to(device)
    task.setup(program, device, options, console)
    metrics = MetricsWriter(options.metrics_path)
    summary: dict = {**task.summary(), "steps_done": 0, "interrupted": False}
    window_t, window_n, start = 0.0, 0, time.perf_counter()
    progress = _progress(console)
    try:
        with progress:
            bar = progress.add_task("train", total=options.steps, status="")
            for step in range(1, options.steps + 1):
                batch = task.next()
                t0 = time.perf_counter()
                result = task.step(program, batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                window_t += time.perf_counter() - t0
                window_n += task.count(batch)
                fields = task.measure(result, batch)
                summary.update(task.summary(), steps_done=step)
                if step % options.log_every == 0 or step == options.steps or task.log_now():
                    rate = window_n / window_t if window_t > 0 else 0.0
                    row = {
                        "step": step,
                        "loss": result.loss,
                        task.rate_key: rate,
                        "elapsed_s": time.perf_counter() - start,
                        "cosine": result.cosine,
                        "synth_loss": result.synth_loss,
                        **fields,
                    }
                    metrics.write(row)
                    progress.update(bar, status=task.status(rate))
                    window_t, window_n = 0.0, 0
                note = task.note(step)
                if note:
                    progress.console.print(note, highlight=False)
                if step % options.eval_every == 0 or step == options.steps:
                    evaluated = task.evaluate(program, step)
                    if evaluated is not None:
                        scores, line = evaluated
                        metrics.write({"step": step, **scores, "elapsed_s": time.perf_counter() - start})
                        summary.update(task.summary())
                        if line:
                            progress.console.print(line, highlight=False)
                progress.update(bar, advance=1)
    except KeyboardInterrupt:
        summary["interrupted"] = True
        console.print(f"interrupted at step {summary['steps_done']}; keeping what was written.", highlight=False)
    finally:
        metrics.close()
    summary.update(task.summary())
    summary["elapsed_s"] = time.perf_counter() - start
    summary["rows"] = metrics.rows
    return summary
