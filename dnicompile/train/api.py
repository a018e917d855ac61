"""`dnicompile.fit`: the one training loop (train/loop.py) on a user's own data.

    program = compile_decoupled(model, "cuts.yaml")
    summary = dnicompile.fit(program, train_loader, test_loader, epochs=3, eval_every=500, out="runs/mine")

The data are any iterables of batches (a DataLoader, a list, a generator); how a batch's parts reach the
program's inputs and labels is [Note: batches] in train/tasks.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from rich.console import Console

from ..errors import DNIError
from ..files import write_atomic
from .loggers import check_loggers
from .loop import FitOptions, load_run_checkpoint
from .loop import fit as run_loop
from .outputs import check_outputs, cut_kinds, plot_curves
from .tasks import DataTask


def fit(
    program,
    train_data,
    eval_data=None,
    *,
    steps: int | None = None,
    epochs: int | None = None,
    eval_every: int | None = None,
    log_every: int = 10,
    out: str | Path | None = None,
    loggers: list | None = None,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_every: int | None = None,
    keep_checkpoints: int | None = None,
    target: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> dict:
    """Train `program` on `train_data` for `steps` steps (or `epochs` passes, where the data have a length),
    scoring it on `eval_data` every `eval_every` steps and at the end (loss, and accuracy where the output is class
    scores). Returns the summary, with every metrics line under `rows`.

    `loggers`: where the metrics go, names or objects ([Note: loggers] in train/loggers.py): "jsonl"
    (metrics.jsonl, the default), "csv" (metrics.csv), "tensorboard" (tensorboard/; the tb extra), all into
    `out`, and objects with write(record, kind) and close(), given every record (kind "train" or "eval").

    `out`: a folder for the metrics, checkpoints (every `checkpoint_every` steps, default the spec's
    `train.checkpoint_every`, and at the end), model.pt, curves.png and summary.json; an existing run there is
    refused unless `resume=True` (go on from its newest checkpoint, drawing the same batches as a run that never
    stopped) or `overwrite=True`. `target`: the key of the labels in dict batches. `seed` seeds torch before
    the runtime's models (synthesizers, heads) are drawn. Ctrl-C stops after the step under way, keeping what
    was written."""
    if (steps is None) == (epochs is None):
        raise DNIError("fit: give either steps= or epochs= (one of them).")
    if epochs is not None:
        try:
            per_epoch = len(train_data)
        except TypeError:
            raise DNIError(
                f"fit: epochs= needs data with a length, and {type(train_data).__name__} has none; give steps=."
            ) from None
        steps = epochs * per_epoch
    if steps < 1:
        raise DNIError(f"fit: {steps} steps; train for at least one.")
    train_cfg = program.spec.train
    options = FitOptions(
        steps=steps,
        eval_every=eval_every or steps,
        seed=seed,
        device=device,
        log_every=log_every,
        checkpoint_every=checkpoint_every if checkpoint_every is not None else train_cfg.checkpoint_every,
        keep_checkpoints=keep_checkpoints or train_cfg.keep_checkpoints,
    )
    if resume and out is None:
        raise DNIError("fit: resume=True goes on with the run in out=; give out=.")
    options.loggers = ["jsonl"] if loggers is None else [loggers] if isinstance(loggers, str) else list(loggers)
    check_loggers(options.loggers, out is not None, "fit: loggers=", "into out=", "give out=")
    names = [n for n in options.loggers if isinstance(n, str)]
    # the command line's checks of --out, --resume and --overwrite: never overwrite a run unless told to
    flags = SimpleNamespace(out=out, resume=out if resume else None, metrics=None, overwrite=overwrite, logger=names)
    out_dir, options.metrics_path = check_outputs(flags)
    if out_dir is not None:
        if resume:
            options.resume = load_run_checkpoint(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        options.out_dir = out_dir
    console = Console(highlight=False) if progress else None
    summary = run_loop(program, DataTask(train_data, eval_data, target), options, console)
    if out_dir is not None:
        state = {k: v.detach().cpu() for k, v in program.state_dict().items()}
        write_atomic(out_dir / "model.pt", lambda p: torch.save(state, p))
        plot_curves(summary["rows"], out_dir / "curves.png", type(program.model).__name__, cut_kinds(program))
        final = {k: v for k, v in summary.items() if k != "rows"}
        write_atomic(out_dir / "summary.json", lambda p: p.write_text(json.dumps(final, indent=2) + "\n"))
    return summary
