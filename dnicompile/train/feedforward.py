"""`dnicompile model.py --spec S --train` for a feed-forward program in one process: the data set, the one
training loop (train/loop.py) with its task, and the outputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console

from ..errors import DNIError
from ..files import write_atomic
from .data import call_loader, load_dataset
from .loggers import chosen_loggers
from .loop import FitOptions, fit, load_run_checkpoint
from .outputs import (
    check_outputs,
    checkpoint_options,
    cli_schedule,
    cut_kinds,
    exit_code,
    outputs_written,
    plot_curves,
    require_data,
    resolve_device,
)
from .tasks import Classification, DataTask


def train_from_cli(program, args, console: Console) -> int:
    """`dnicompile model.py --spec S --train ...`: returns the exit code (130 after Ctrl-C, 143 after SIGTERM)."""
    spec = program.spec
    opts = FitOptions(**cli_schedule(args, spec), **checkpoint_options(spec), device=args.device)
    opts.log_every = args.log_every or opts.log_every
    opts.command = getattr(args, "argv", None)
    resolve_device(opts.device)
    require_data(spec)
    out_dir, metrics_path = check_outputs(args)
    opts.metrics_path, opts.loggers = metrics_path, chosen_loggers(args)
    opts.out_dir = out_dir
    if args.resume:
        opts.resume = load_run_checkpoint(Path(args.resume), say=lambda t: console.print(t, highlight=False))
    if spec.data.loader is not None:
        task, source = _loader_task(spec, args, opts.batch_size, opts.seed)
        on = f"{opts.steps} steps on {source}"
    else:
        data = load_dataset(spec.data.name, args.data or spec.data.path)
        task = Classification(data)
        on = f"{opts.steps} steps of {opts.batch_size} on {data.source} ({len(data.train_x)} train / {len(data.test_x)} test)"
    console.print(
        f"training {type(program.model).__name__}: {len(program.stages)} stages, {on}, device {opts.device}",
        highlight=False,
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = fit(program, task, opts, console)
    finally:
        torch.set_num_threads(threads)
    if out_dir is not None:
        state = {k: v.detach().cpu() for k, v in program.state_dict().items()}
        write_atomic(out_dir / "model.pt", lambda p: torch.save(state, p))
        ckpt = {"model": state, "runtime": program.runtime.state_dict(), "step": summary["steps_done"]}
        write_atomic(out_dir / "checkpoint.pt", lambda p: torch.save(ckpt, p))
        plot_curves(
            summary["rows"], out_dir / "curves.png", f"{type(program.model).__name__} ({args.spec})", cut_kinds(program)
        )
        final = {k: v for k, v in summary.items() if k != "rows"}
        write_atomic(out_dir / "summary.json", lambda p: p.write_text(json.dumps(final, indent=2) + "\n"))
        console.print(f"wrote {outputs_written(out_dir, metrics_path)}", highlight=False)
    acc = summary["test_accuracy"]
    console.print(
        f"done: {summary['steps_done']} steps in {summary['elapsed_s']:.1f}s"
        + (f", test accuracy {acc:.4f}" if acc is not None else ""),
        highlight=False,
    )
    return exit_code(summary)


def _loader_task(spec, args, batch_size: int, seed: int) -> tuple[DataTask, str]:
    """The spec's `data.loader` function's (train, eval) data as the task of `dnicompile.fit` ([Note: batches]),
    and how the start line names them. The function runs right after torch.manual_seed(seed), so that what it
    draws (a random split) is the same in a run and in its --resume."""
    where = spec.where("data", "loader")
    if args.data:
        raise DNIError(
            f"--data {args.data}: names the files of a built-in data set, but the spec's data come from `data.loader` "
            f"({where}); drop --data, or give your function the path as an argument (--set data.loader_args.NAME=PATH)."
        )
    with torch.random.fork_rng(devices=[]):  # the function's own draws depend on the seed alone
        torch.manual_seed(seed)
        train, evaluation = call_loader(spec, batch_size)
    sizes = []
    for part, name in ((train, "train"), (evaluation, "eval")):
        try:
            sizes.append(f"{len(part)} {name} batches")
        except TypeError:  # a generator, an IterableDataset: no length
            sizes.append(f"no {name} data" if part is None else f"{name} batches")
    task = DataTask(train, evaluation, origin=f"{where}: `data.loader: {spec.data.loader}`")
    return task, f"{spec.data.loader} ({' / '.join(sizes)})"
