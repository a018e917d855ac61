"""What a training run writes: metrics (JSON lines), plots, final weights and summaries, and the checks of
--out / --metrics before a run starts; plus the CLI's device and schedule options shared by every loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import DNIError
from ..files import write_atomic


def resolve_device(name: str) -> torch.device:
    """torch.device from a --device value, with a clear error when it is malformed or absent."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DNIError(f"--device {name!r}: expected cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DNIError(f"--device {name}: no CUDA device is available here (torch.cuda.is_available() is False).")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DNIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
    elif device.type != "cpu":
        raise DNIError(f"--device {name!r}: expected cpu, cuda or cuda:N.")
    return device


class MetricsWriter:
    """One JSON object per line, flushed as written, so an interrupted run keeps what it logged."""

    def __init__(self, path: Path | None, append: bool = False):
        self.path = path
        self.rows: list[dict] = []
        self._f = open(path, "a" if append else "w") if path else None  # noqa: SIM115 - held open for the run

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self._f:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    """Loss, test accuracy and per-cut gradient cosine similarity against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "samples_per_s" in r]
    evals = [r for r in rows if "test_accuracy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    axes[1].plot([r["step"] for r in evals], [r["test_accuracy"] for r in evals], marker="o")
    axes[1].set(title="test accuracy", xlabel="step")
    cuts = sorted({c for r in train for c in r.get("cosine", {})})
    for c in cuts:
        axes[2].plot(
            [r["step"] for r in train if c in r["cosine"]],
            [r["cosine"][c] for r in train if c in r["cosine"]],
            lw=1,
            label=c,
        )
    axes[2].set(title="cos(synthetic, true gradient)", xlabel="step", ylim=(-0.2, 1.0))
    if cuts:
        axes[2].legend(fontsize=8)
    else:
        axes[2].text(0.5, 0.5, "no synthetic cuts", ha="center", va="center", transform=axes[2].transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


OUT_FILES = ("model.pt", "checkpoint.pt", "curves.png", "summary.json", "metrics.jsonl")


def check_outputs(args) -> tuple[Path | None, Path | None]:
    """--out and --metrics, checked before training starts: never overwrite a run without --overwrite."""
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise DNIError(f"--out {out_dir}: exists and is not a directory.")
        existing = [n for n in OUT_FILES if (out_dir / n).exists()]
        if existing and not args.overwrite:
            raise DNIError(
                f"--out {out_dir}: already holds a run ({', '.join(existing)}); choose another directory or "
                "pass --overwrite to replace it."
            )
    metrics_path = Path(args.metrics) if args.metrics else (out_dir / "metrics.jsonl" if out_dir else None)
    if metrics_path is not None:
        if metrics_path.exists() and not args.overwrite and not (out_dir and metrics_path.parent == out_dir):
            raise DNIError(f"--metrics {metrics_path}: file exists; choose another path or pass --overwrite.")
        if not metrics_path.parent.is_dir() and metrics_path.parent != out_dir:
            raise DNIError(f"--metrics {metrics_path}: folder {metrics_path.parent} does not exist.")
    return out_dir, metrics_path


def cli_schedule(args, spec) -> dict:
    """Steps, batch size, evaluation interval and seed: the command line's where given, else the spec's `train:`."""
    cfg = spec.train
    return {
        "steps": args.steps or cfg.steps,
        "batch_size": args.batch_size or cfg.batch_size,
        "eval_every": args.eval_every or cfg.eval_every,
        "seed": cfg.seed if args.seed is None else args.seed,
    }


def write_outputs(program, summary: dict, out_dir: Path, title: str) -> None:
    state = {k: v.detach().cpu() for k, v in program.state_dict().items()}
    write_atomic(out_dir / "model.pt", lambda p: torch.save(state, p))
    ckpt = {"model": state, "runtime": program.runtime.state_dict(), "step": summary["steps_done"]}
    write_atomic(out_dir / "checkpoint.pt", lambda p: torch.save(ckpt, p))
    synthetic = program.spec.bptt.synthetic_gradient is not None or (
        program.upper is not None and program.upper.config.synthetic_gradient is not None
    )
    plot_recurrent(summary["rows"], out_dir / "curves.png", title, synthetic)
    final = {k: v for k, v in summary.items() if k != "rows"}
    write_atomic(out_dir / "summary.json", lambda p: p.write_text(json.dumps(final, indent=2) + "\n"))


def plot_recurrent(rows: list[dict], path: Path, title: str, synthetic: bool = True) -> None:
    """Loss, then solved length (copy) or held-out BPC (text), then the synthesizers' cosine, against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "elapsed_s" in r and "cosine" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    axes[0].set(title="training loss per step", xlabel="step", yscale="log")
    evals = [r for r in rows if "bpc" in r]
    if evals:
        axes[1].plot([r["step"] for r in evals], [r["bpc"] for r in evals], marker="o", label="held-out")
        if any("upper_bpc" in r for r in evals):
            axes[1].plot([r["step"] for r in evals], [r["upper_bpc"] for r in evals], marker="s", label="upper")
        axes[1].legend(fontsize=8)
        axes[1].set(title="bits per character", xlabel="step")
    else:
        pts = [r for r in rows if "solved_length" in r]
        axes[1].step([r["step"] for r in pts], [r["solved_length"] for r in pts], where="post")
        axes[1].set(title="solved length (curriculum)", xlabel="step")
    names = sorted({c for r in train for c in r.get("cosine", {})})
    for c in names:
        pts = [r for r in train if c in r["cosine"] and math.isfinite(r["cosine"][c])]
        axes[2].plot([r["step"] for r in pts], [r["cosine"][c] for r in pts], lw=1, label=c)
    axes[2].set(title="cos(synthetic gradient, its target)", xlabel="step", ylim=(-0.2, 1.0))
    if names:
        axes[2].legend(fontsize=8)
    else:
        text = "no synthetic gradient used yet" if synthetic else "plain truncated BPTT"
        axes[2].text(0.5, 0.5, text, ha="center", va="center", transform=axes[2].transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
