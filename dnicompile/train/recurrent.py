"""`dnicompile model.py --spec S [--train]` for recurrent programs: Copy / Repeat-Copy with the curriculum,
and character-level language models (with an optional upper core) on a text file."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import DataError, DNIError, SpecError
from ..recurrent import compile_recurrent
from .outputs import MetricsWriter, check_outputs, cli_schedule, resolve_device, write_outputs
from .tasks import LN2, CopyTask, Curriculum, TextStreams, evaluate_text, load_text

RECURRENT_DATA = ("copy", "repeat_copy", "text")


@dataclass
class RecurrentOptions:
    steps: int
    batch_size: int
    eval_every: int
    seed: int
    device: str = "cpu"
    log_every: int = 10
    metrics_path: Path | None = None
    out_dir: Path | None = None
    data: str | None = None


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
    if getattr(args, "resume", None):
        raise DNIError("--resume is not available for recurrent programs: start the run again.")
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
    from .hierarchical import HierarchicalRunConfig, check_distributed, launch
    from .launch import run_fields

    if args.workers != 2:
        raise DNIError(
            f"--workers {args.workers}: a hierarchical program has two cores, one per worker: use --workers 2."
        )
    check_distributed(program)
    spec = program.spec
    resolve_device(args.device)
    if torch.device(args.device).type != "cpu":
        raise DNIError("--workers 2 runs a hierarchical program on CPU processes (gloo); drop --device.")
    data = args.data or spec.data.path
    _check_sizes(program, None, load_text(data, spec.data.split).vocab_size, "text")  # here, not in the workers
    out_dir, metrics_path = _outputs(args)
    cfg = HierarchicalRunConfig(
        **run_fields(args, spec),
        data=str(Path(data).resolve()),
        threads=args.threads or 1,
        out_dir=str(out_dir) if out_dir else None,
        metrics_path=str(metrics_path) if metrics_path else None,
        title=f"{type(program.model).__name__} ({args.spec}), 2 workers",
    )
    console.print("starting 2 workers: the lower core on rank 0, the upper core on rank 1", highlight=False)
    code, summary = launch(cfg)
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
    opts = RecurrentOptions(**cli_schedule(args, spec), device=args.device, data=args.data or spec.data.path)
    resolve_device(opts.device)
    out_dir, metrics_path = _outputs(args)
    opts.metrics_path, opts.out_dir = metrics_path, out_dir
    # a recurrent step is many small ops: one intra-op thread is fastest unless asked (and much faster than
    # several threads fighting other processes for the cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)
    try:
        summary = fit_recurrent(program, opts, console)
    finally:
        torch.set_num_threads(threads)
    if out_dir is not None:
        write_outputs(program, summary, out_dir, f"{type(program.model).__name__} ({args.spec})")
        console.print(f"wrote model.pt, checkpoint.pt, curves.png, summary.json, metrics.jsonl to {out_dir}")
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
    return 130 if summary["interrupted"] else 0


def fit_recurrent(program, opts: RecurrentOptions, console: Console | None = None) -> dict:
    """Train on the spec's data set; returns a summary with the metric rows."""
    console = console or Console(quiet=True)
    name = program.spec.data.name
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    program.to(device)
    program.train()
    if name in ("copy", "repeat_copy"):
        if program.upper is not None:
            raise SpecError(
                f"{program.spec.where('recurrent', 'upper')}: the upper core predicts the next characters of a text; "
                "train a hierarchical program on `data: text`."
            )
        return _fit_copy(program, opts, console, device)
    return _fit_text(program, opts, console, device)


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


def _row(step: int, result, start: float, window_t: float, window_n: int) -> dict:
    row = {
        "step": step,
        "loss": result.loss,
        "samples_per_s": window_n / window_t if window_t > 0 else 0.0,
        "elapsed_s": time.perf_counter() - start,
        "cosine": result.cosine,
        "synth_loss": result.synth_loss,
    }
    if result.aux_loss is not None:
        row["aux_loss"] = result.aux_loss
    return row


def _fit_copy(program, opts: RecurrentOptions, console: Console, device) -> dict:
    d = program.spec.data
    task = CopyTask(d.bits, repeat=d.name == "repeat_copy", max_repeats=d.max_repeats, seed=opts.seed)
    _check_sizes(program, task.input_size, task.output_size, d.name)
    curriculum = Curriculum(d.start_length, d.max_length, d.threshold, d.window)
    metrics = MetricsWriter(opts.metrics_path)
    summary = {"task": d.name, "steps_done": 0, "interrupted": False, "solved_length": curriculum.solved_length}
    start = time.perf_counter()
    window_t, window_n, err_avg = 0.0, 0, None
    progress = _progress(console)
    try:
        with progress:
            bar = progress.add_task("train", total=opts.steps, status="")
            for step in range(1, opts.steps + 1):
                batch = task.batch(opts.batch_size, curriculum.length)
                x, y, mask = batch.x.to(device), batch.y.to(device), batch.mask.to(device)
                t0 = time.perf_counter()
                result = program.train_step(x, y, mask)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                window_t += time.perf_counter() - t0
                window_n += len(x)
                error = task.error_bits(result.output, y, mask)
                err_avg = error if err_avg is None else 0.9 * err_avg + 0.1 * error
                length = curriculum.length
                grew = curriculum.update(error)
                summary["steps_done"] = step
                summary["solved_length"] = curriculum.solved_length
                if step % opts.log_every == 0 or step == opts.steps or grew:
                    row = _row(step, result, start, window_t, window_n)
                    row.update(error_bits=error, length=length, solved_length=curriculum.solved_length)
                    metrics.write(row)
                    status = f"length {curriculum.length} solved {curriculum.solved_length} error {err_avg:.3f} bits"
                    progress.update(bar, status=status)
                    window_t, window_n = 0.0, 0
                if grew:
                    progress.console.print(
                        f"step {step:>6}: solved length {curriculum.solved_length}, now {curriculum.length}",
                        highlight=False,
                    )
                if step % opts.eval_every == 0 or step == opts.steps:
                    metrics.write(
                        {
                            "step": step,
                            "solved_length": curriculum.solved_length,
                            "length": curriculum.length,
                            "error_bits": curriculum.average,
                            "elapsed_s": time.perf_counter() - start,
                        }
                    )
                progress.update(bar, advance=1)
    except KeyboardInterrupt:
        summary["interrupted"] = True
        console.print(f"interrupted at step {summary['steps_done']}; keeping what was written.", highlight=False)
    finally:
        metrics.close()
    summary["length"] = curriculum.length
    summary["error_bits"] = curriculum.average  # at `length`, over the last `window` batches
    summary["elapsed_s"] = time.perf_counter() - start
    summary["rows"] = metrics.rows
    return summary


def _fit_text(program, opts: RecurrentOptions, console: Console, device) -> dict:
    d = program.spec.data
    data = load_text(opts.data, d.split)
    _check_sizes(program, None, data.vocab_size, "text")
    lookahead = program.upper.horizon - 1 if program.upper is not None else 0
    streams = TextStreams(data.train, opts.batch_size, d.seq_len, lookahead)
    valid = data.valid[: d.eval_chars] if d.eval_chars else data.valid
    console.print(
        f"text {data.source}: {len(data.train)} training / {len(data.valid)} held-out characters, "
        f"{data.vocab_size} symbols; {opts.batch_size} streams of {d.seq_len} characters per step",
        highlight=False,
    )
    metrics = MetricsWriter(opts.metrics_path)
    summary = {"task": "text", "steps_done": 0, "interrupted": False, "bpc": None}
    start = time.perf_counter()
    window_t, window_n, bpc_avg = 0.0, 0, None
    progress = _progress(console)
    try:
        with progress:
            bar = progress.add_task("train", total=opts.steps, status="")
            for step in range(1, opts.steps + 1):
                x, y, first = streams.next()
                x, y = x.to(device), y.to(device)
                t0 = time.perf_counter()
                result = program.train_step(x, y, start=first, end=False)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                window_t += time.perf_counter() - t0
                window_n += x.numel()
                train_bpc = result.loss / LN2
                bpc_avg = train_bpc if bpc_avg is None else 0.95 * bpc_avg + 0.05 * train_bpc
                summary["steps_done"] = step
                if step % opts.log_every == 0 or step == opts.steps:
                    row = _row(step, result, start, window_t, window_n)
                    row["chars_per_s"] = row.pop("samples_per_s")
                    row["train_bpc"] = train_bpc
                    if result.upper_loss is not None:
                        row["upper_train_bpc"] = result.upper_loss / LN2
                    metrics.write(row)
                    progress.update(bar, status=f"train bpc {bpc_avg:.3f}")
                    window_t, window_n = 0.0, 0
                if step % opts.eval_every == 0 or step == opts.steps:
                    scores = evaluate_text(program, valid, device=device)
                    summary.update(scores)
                    metrics.write(
                        {"step": step, **scores, "train_bpc_avg": bpc_avg, "elapsed_s": time.perf_counter() - start}
                    )
                    up = f", upper {scores['upper_bpc']:.4f}" if "upper_bpc" in scores else ""
                    progress.console.print(
                        f"step {step:>6}: train bpc {bpc_avg:.4f}, held-out bpc {scores['bpc']:.4f}{up}",
                        highlight=False,
                    )
                progress.update(bar, advance=1)
    except KeyboardInterrupt:
        summary["interrupted"] = True
        console.print(f"interrupted at step {summary['steps_done']}; keeping what was written.", highlight=False)
    finally:
        metrics.close()
    summary["elapsed_s"] = time.perf_counter() - start
    summary["rows"] = metrics.rows
    return summary


def _check_sizes(program, inputs: int | None, outputs: int, what: str) -> None:
    """The model's input and output sizes must fit the data set; say which model_args to change."""
    where = program.spec.where("model_args")
    x_size = None
    core = program.core.module
    if program.input is None:
        x_size = getattr(core, "input_size", None)
    elif isinstance(program.input, torch.nn.Embedding):
        if program.input.num_embeddings < outputs and what == "text":
            raise DataError(
                f"{where}: the text has {outputs} distinct characters but the model's embedding "
                f"`{program.spec.recurrent.input}` has {program.input.num_embeddings} rows; set the vocabulary size "
                f"in `model_args` to {outputs}."
            )
    if inputs is not None and x_size is not None and x_size != inputs:
        raise DataError(
            f"{where}: {what} feeds {inputs} channels per step but the core `{program.spec.recurrent.core}` takes "
            f"{x_size}; set the model's input size to {inputs} in `model_args`."
        )
    with torch.no_grad():
        h = program.core.step_output(program.core.init_state(1))
        y = program.output(h[:, None])
    if y.shape[-1] != outputs:
        unit = "characters" if what == "text" else "output channels"
        raise DataError(
            f"{where}: {what} has {outputs} {unit} but the model's readout `{program.spec.recurrent.output}` gives "
            f"{y.shape[-1]}; set its output size to {outputs} in `model_args`."
        )


# --------------------------------------------------------------------------- outputs
