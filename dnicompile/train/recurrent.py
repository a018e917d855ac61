"""`dnicompile model.py --spec S [--train]` for recurrent programs: Copy / Repeat-Copy with the curriculum,
and character-level language models (with an optional upper core) on a text file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from rich.console import Console

from ..errors import DNIError
from ..recurrent import compile_recurrent
from .loggers import chosen_loggers
from .loop import FitOptions, fit, load_run_checkpoint
from .outputs import (
    check_outputs,
    checkpoint_options,
    cli_schedule,
    exit_code,
    outputs_written,
    resolve_device,
    write_outputs,
)
from .tasks import CopyCurriculum, TextTask, check_recurrent_sizes, load_text

RECURRENT_DATA = ("copy", "repeat_copy", "text")


def run_recurrent_cli(model, spec, args, console: Console | None = None) -> int:
    """The recurrent branch of the command line: the program's summary, or training with --train."""
    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    program = compile_recurrent(model, spec)
    for flag in ("code", "emit", "nodes"):
        if getattr(args, flag, None):
            raise DNIError(
                f"--{flag} shows the stages of a graph cut by `cuts:`; a recurrent program is cut in time, so it has "
                "no stage graphs to show. Run without it to see the program's summary."
            )
    if not args.train:
        console.print(program.summary(), markup=False)
        return 0
    if "WORLD_SIZE" in os.environ:
        raise DNIError(
            "recurrent programs are not launched with torchrun: train in one process, or a hierarchical program on "
            "this host with --workers 2."
        )
    if args.workers > 1:
        return train_hierarchical_distributed(program, args, console)
    return train_recurrent_from_cli(program, args, console)


def _outputs(args) -> tuple[Path | None, Path | None]:
    """--out and --metrics, checked (never overwrite a run without --overwrite); --out is created."""
    out_dir, metrics_path = check_outputs(args)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir, metrics_path


def train_hierarchical_distributed(program, args, console: Console) -> int:
    """`--workers 2`: the lower core on one process, the upper core on another (runtime/bptt_distributed)."""
    from .hierarchical import check_distributed
    from .launch import RunConfig, launch, run_fields

    if args.workers != 2:
        raise DNIError(
            f"--workers {args.workers}: a hierarchical program has two cores, one per worker: use --workers 2."
        )
    check_distributed(program)
    spec = program.spec
    resolve_device(args.device)
    if torch.device(args.device).type != "cpu":
        raise DNIError("--workers 2 runs a hierarchical program on CPU processes (gloo); drop --device.")
    text = load_text(args.data or spec.data.path, spec.data.split)  # here (and any download), not in the workers
    check_recurrent_sizes(program, None, text.vocab_size, "text")
    resume = None
    if getattr(args, "resume", None):  # chosen here, before --out (DIR by default) is made and the workers start
        resume = str(load_run_checkpoint(Path(args.resume), say=lambda t: console.print(t, highlight=False)).path)
    out_dir, metrics_path = _outputs(args)
    if spec.distributed.checkpoint_every and out_dir is None:
        raise DNIError("distributed.checkpoint_every is set in the spec but no --out DIR was given to write to.")
    cfg = RunConfig(
        **run_fields(args, spec),
        data_dir=text.source,
        threads=args.threads or 1,
        log_every=args.log_every or 10,
        out_dir=str(out_dir) if out_dir else None,
        metrics_path=str(metrics_path) if metrics_path else None,
        title=f"{type(program.model).__name__} ({args.spec}), 2 workers",
        # distributed.checkpoint_every, the older spelling, still wins where a spec sets it (as on feed-forward)
        checkpoint_every=spec.distributed.checkpoint_every or spec.train.checkpoint_every,
        keep_checkpoints=spec.train.keep_checkpoints,
        resume=resume,
    )
    console.print("starting 2 workers: the lower core on rank 0, the upper core on rank 1", highlight=False)
    code, summary = launch(cfg, 2)
    if code == 0 and summary is not None:
        console.print(
            f"done: {summary['steps_done']} steps in {summary['elapsed_s']:.1f}s, held-out bpc {summary['bpc']:.4f}, "
            f"upper bpc {summary['upper_bpc']:.4f}",
            highlight=False,
        )
    return code


def train_recurrent_from_cli(program, args, console: Console) -> int:
    spec = program.spec
    if spec.data is None or spec.data.name not in RECURRENT_DATA:
        got = "no `data:`" if spec.data is None else f"`data: {spec.data.name}`"
        raise DNIError(
            f"{spec.where('data') if spec.data is not None else spec.where('recurrent')}: a recurrent program trains "
            f"on copy, repeat_copy or text, but the spec has {got}; add e.g. `data: copy` or "
            "`data: {name: text, path: input.txt}`."
        )
    opts = FitOptions(**cli_schedule(args, spec), **checkpoint_options(spec), device=args.device)
    opts.log_every = args.log_every or opts.log_every
    opts.command = getattr(args, "argv", None)
    resolve_device(opts.device)
    if getattr(args, "resume", None):  # before --out (DIR by default) is made
        opts.resume = load_run_checkpoint(Path(args.resume), say=lambda t: console.print(t, highlight=False))
    out_dir, metrics_path = _outputs(args)
    opts.metrics_path, opts.out_dir, opts.loggers = metrics_path, out_dir, chosen_loggers(args)
    # a recurrent step is many small ops: one intra-op thread is fastest unless asked (and much faster than
    # several threads fighting other processes for the cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)
    try:
        summary = fit(program, recurrent_task(program.spec.data, args.data, opts.seed), opts, console)
    finally:
        torch.set_num_threads(threads)
    if out_dir is not None:
        write_outputs(program, summary, out_dir, f"{type(program.model).__name__} ({args.spec})")
        console.print(f"wrote {outputs_written(out_dir, metrics_path)}", highlight=False)
    tail = []
    if summary.get("solved_length") is not None:
        tail.append(f"solved length {summary['solved_length']}")
    if summary.get("bpc") is not None:
        tail.append(f"held-out bpc {summary['bpc']:.4f}")
    if summary.get("upper_bpc") is not None:
        tail.append(f"upper bpc {summary['upper_bpc']:.4f}")
    console.print(
        f"done: {summary['steps_done']} steps in {summary['elapsed_s']:.1f}s"
        + (", " + ", ".join(tail) if tail else ""),
        highlight=False,
    )
    return exit_code(summary)


def recurrent_task(data, path: str | None, seed: int):
    """The loop's task for a recurrent program's `data:` (copy, repeat_copy or text)."""
    if data.name in ("copy", "repeat_copy"):
        return CopyCurriculum(data, seed)
    return TextTask(data, path or data.path)
