"""Training loop for the local runtime: batches, progress, evaluation, metrics, plots, final weights."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import DNIError
from ..files import write_atomic
from .data import Batches, Dataset, load_dataset
from .outputs import MetricsWriter, check_outputs, cli_schedule, plot_curves, resolve_device


@dataclass
class TrainOptions:
    steps: int = 1000
    batch_size: int = 128
    eval_every: int = 200
    seed: int = 0
    device: str = "cpu"
    log_every: int = 10
    metrics_path: Path | None = None
    out_dir: Path | None = None


def _shape_batch(program, x: torch.Tensor) -> torch.Tensor:
    """Reshape a batch of images to the program's first input, e.g. (B, 1, 28, 28) -> (B, 784)."""
    info = program.stages[0].inputs[0]
    per_sample = tuple(info.shape[1:])
    if math.prod(per_sample) != math.prod(x.shape[1:]):
        raise DNIError(
            f"the data's samples have shape {tuple(x.shape[1:])} but the model's input `{info.name}` expects "
            f"{per_sample} per sample; fix `inputs:` in the spec."
        )
    return x.reshape(x.shape[0], *per_sample).to(info.dtype)


@torch.no_grad()
def evaluate(program, x: torch.Tensor, y: torch.Tensor, device, batch_size: int = 1000) -> tuple[float, float]:
    """Test accuracy and mean cross-entropy, with every stage in eval mode."""
    program.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, len(x), batch_size):
        xb = _shape_batch(program, x[i : i + batch_size]).to(device)
        yb = y[i : i + batch_size].to(device)
        out = program(xb)
        correct += int((out.argmax(-1) == yb).sum())
        loss_sum += float(torch.nn.functional.cross_entropy(out, yb, reduction="sum"))
    program.train()
    return correct / len(x), loss_sum / len(x)


def fit(program, data: Dataset, opts: TrainOptions, console: Console | None = None) -> dict:
    """Train `program` for opts.steps steps; returns a summary. Ctrl-C stops early, keeping what was written."""
    console = console or Console(quiet=True)
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    program.to(device)
    program.train()
    runtime = program.runtime
    runtime.to(device)
    batches = Batches(data.train_x, data.train_y, opts.batch_size, opts.seed)
    metrics = MetricsWriter(opts.metrics_path)
    summary = {"steps_done": 0, "interrupted": False, "test_accuracy": None}
    window_t, window_n, start = 0.0, 0, time.perf_counter()
    loss_avg = acc_avg = None
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    try:
        with progress:
            task = progress.add_task("train", total=opts.steps, status="")
            for step in range(1, opts.steps + 1):
                x, y = batches.next()
                x, y = _shape_batch(program, x).to(device), y.to(device)
                t0 = time.perf_counter()
                result = program.train_step(x, y)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                window_t += time.perf_counter() - t0
                window_n += len(x)
                acc = float((result.output.argmax(-1) == y).float().mean())
                loss_avg = result.loss if loss_avg is None else 0.9 * loss_avg + 0.1 * result.loss
                acc_avg = acc if acc_avg is None else 0.9 * acc_avg + 0.1 * acc
                summary["steps_done"] = step
                if step % opts.log_every == 0 or step == opts.steps:
                    rate = window_n / window_t if window_t > 0 else 0.0
                    row = {
                        "step": step,
                        "loss": result.loss,
                        "train_accuracy": acc,
                        "samples_per_s": rate,
                        "elapsed_s": time.perf_counter() - start,
                        "cosine": result.cosine,
                        "synth_loss": result.synth_loss,
                    }
                    if result.input_loss:
                        row["input_loss"] = result.input_loss
                    metrics.write(row)
                    status = f"loss {loss_avg:.3f} acc {acc_avg:.3f} {rate / len(x):.1f} steps/s"
                    progress.update(task, status=status)
                    window_t, window_n = 0.0, 0
                progress.update(task, advance=1)
                if step % opts.eval_every == 0 or step == opts.steps:
                    test_acc, test_loss = evaluate(program, data.test_x, data.test_y, device)
                    summary["test_accuracy"] = test_acc
                    metrics.write(
                        {
                            "step": step,
                            "loss": loss_avg,
                            "test_accuracy": test_acc,
                            "test_loss": test_loss,
                            "elapsed_s": time.perf_counter() - start,
                        }
                    )
                    progress.console.print(
                        f"step {step:>6}: train loss {loss_avg:.4f}, test accuracy {test_acc:.4f}", highlight=False
                    )
    except KeyboardInterrupt:
        summary["interrupted"] = True
        console.print(f"interrupted at step {summary['steps_done']}; keeping what was written.", highlight=False)
    finally:
        metrics.close()
    summary["elapsed_s"] = time.perf_counter() - start
    summary["rows"] = metrics.rows
    return summary


# --------------------------------------------------------------------------- outputs


def train_from_cli(program, args, console: Console) -> int:
    """`dnicompile model.py --spec S --train ...`: returns the exit code."""
    spec = program.spec
    opts = TrainOptions(**cli_schedule(args, spec), device=args.device)
    resolve_device(opts.device)
    if spec.data is None:
        raise DNIError(f"{spec.where('cuts')}: --train needs a data set: add `data: fashion-mnist` to the spec.")
    out_dir, metrics_path = check_outputs(args)
    opts.metrics_path = metrics_path
    opts.out_dir = out_dir
    data = load_dataset(spec.data.name, args.data or spec.data.path)
    console.print(
        f"training {type(program.model).__name__}: {len(program.stages)} stages, {opts.steps} steps of "
        f"{opts.batch_size} on {data.source} ({len(data.train_x)} train / {len(data.test_x)} test), "
        f"device {opts.device}",
        highlight=False,
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    summary = fit(program, data, opts, console)
    if out_dir is not None:
        state = {k: v.detach().cpu() for k, v in program.state_dict().items()}
        write_atomic(out_dir / "model.pt", lambda p: torch.save(state, p))
        ckpt = {"model": state, "runtime": program.runtime.state_dict(), "step": summary["steps_done"]}
        write_atomic(out_dir / "checkpoint.pt", lambda p: torch.save(ckpt, p))
        plot_curves(summary["rows"], out_dir / "curves.png", f"{type(program.model).__name__} ({args.spec})")
        final = {k: v for k, v in summary.items() if k != "rows"}
        write_atomic(out_dir / "summary.json", lambda p: p.write_text(json.dumps(final, indent=2) + "\n"))
        console.print(f"wrote model.pt, checkpoint.pt, curves.png, summary.json, metrics.jsonl to {out_dir}")
    acc = summary["test_accuracy"]
    console.print(
        f"done: {summary['steps_done']} steps in {summary['elapsed_s']:.1f}s"
        + (f", test accuracy {acc:.4f}" if acc is not None else ""),
        highlight=False,
    )
    return 130 if summary["interrupted"] else 0
