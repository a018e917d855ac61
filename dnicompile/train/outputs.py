"""What a training run writes: metrics (JSON lines), plots, final weights and summaries, and the checks of
--out / --metrics before a run starts; plus the CLI's device and schedule options shared by every loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import DNIError
from ..files import checkpoints, remove_checkpoint, write_atomic, write_text_atomic


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


def run_files(out_dir: Path) -> list[str]:
    """The files of a run already in `out_dir`: outputs, checkpoints (one process or several) and LATEST."""
    found = [n for n in (*OUT_FILES, "LATEST") if (out_dir / n).exists()]
    return found + [p.name for kind in ("file", "dir") for _, p in checkpoints(out_dir, kind)]


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_outputs(args) -> tuple[Path | None, Path | None]:
    """--out and --metrics, checked before training starts: never overwrite a run without --overwrite. With
    --resume DIR, --out defaults to DIR and the run goes on there; --overwrite replaces a run in another --out
    (its checkpoints are removed first, so that resuming it later never finds the old run's)."""
    resume = Path(args.resume) if getattr(args, "resume", None) else None
    out_dir = Path(args.out) if args.out else resume
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise DNIError(f"--out {out_dir}: exists and is not a directory.")
        continuing = resume is not None and out_dir.is_dir() and _same_dir(out_dir, resume)
        existing = run_files(out_dir) if out_dir.is_dir() else []
        if existing and not continuing:
            if not args.overwrite:
                shown = existing if len(existing) <= 6 else [*existing[:6], "..."]
                raise DNIError(
                    f"--out {out_dir}: already holds a run ({', '.join(shown)}); choose another directory, pass "
                    "--resume to continue it, or --overwrite to replace it."
                )
            for kind in ("file", "dir"):
                for _, path in checkpoints(out_dir, kind):
                    remove_checkpoint(path)
            (out_dir / "LATEST").unlink(missing_ok=True)
    metrics_path = Path(args.metrics) if args.metrics else (out_dir / "metrics.jsonl" if out_dir else None)
    if metrics_path is not None:
        own = out_dir is not None and metrics_path.parent == out_dir
        if metrics_path.exists() and not args.overwrite and not own and resume is None:
            raise DNIError(f"--metrics {metrics_path}: file exists; choose another path or pass --overwrite.")
        if not metrics_path.parent.is_dir() and metrics_path.parent != out_dir:
            raise DNIError(f"--metrics {metrics_path}: folder {metrics_path.parent} does not exist.")
    return out_dir, metrics_path


def resume_metrics(path: Path, step: int, source: Path | None = None) -> list[dict]:
    """The metrics of a resumed run, cut back to its checkpoint's `step`: the lines of `source` (the resumed
    run's metrics.jsonl; `path` where it has none) up to that step are written to `path` (atomically) and
    returned; lines written after the checkpoint, and a line torn by a crash, are dropped."""
    src = source if source is not None and source.is_file() else path
    rows = []
    if src.is_file():
        for line in src.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                rows.append(row)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def cli_schedule(args, spec) -> dict:
    """Steps, batch size, evaluation interval and seed: the command line's where given, else the spec's `train:`."""
    cfg = spec.train
    return {
        "steps": args.steps or cfg.steps,
        "batch_size": args.batch_size or cfg.batch_size,
        "eval_every": args.eval_every or cfg.eval_every,
        "seed": cfg.seed if args.seed is None else args.seed,
    }


def checkpoint_options(spec) -> dict:
    """How often a run in one process checkpoints, and how many it keeps: the spec's `train:`."""
    return {"checkpoint_every": spec.train.checkpoint_every, "keep_checkpoints": spec.train.keep_checkpoints}


def exit_code(summary: dict) -> int:
    """A finished run's exit code: 0, or 128 + the signal that stopped it (130 Ctrl-C, 143 SIGTERM)."""
    if not summary.get("interrupted"):
        return 0
    return 143 if summary.get("stopped_by") == "SIGTERM" else 130


def write_outputs(program, summary: dict, out_dir: Path, title: str) -> None:
    """model.pt, checkpoint.pt (model, runtime state and step), curves.png and summary.json of a recurrent run."""
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


def require_data(spec) -> None:
    """`--train` of a feed-forward program needs `data:` in the spec; say what the command line can train on and
    where other data go."""
    if spec.data is None:
        raise DNIError(
            f"{spec.where('cuts')}: --train needs a data set, and the spec has no `data:`. The command line trains "
            "feed-forward programs on `data: fashion-mnist` (with --data DIR), or on data of your own with "
            "`data: {loader: my_data.py:make_loaders}` (a function returning (train, eval) iterables of batches; "
            "with --allow-imports); from Python, dnicompile.fit(program, loader, ...) (README, 'Train on your own "
            "data'), or run the example's own script where it has one (python examples/gpt.py --data ...)."
        )


def outputs_written(out_dir: Path, metrics_path: Path | None) -> str:
    """What a run wrote, for its last line: the files in --out, and the metrics file where it is elsewhere."""
    names = [
        n
        for n in ("model.pt", "checkpoint.pt", "curves.png", "summary.json", "metrics.jsonl")
        if (out_dir / n).exists()
    ]
    text = f"{', '.join(names)} to {out_dir}"
    if metrics_path is not None and metrics_path.parent.resolve() != out_dir.resolve():
        text += f", and the metrics to {metrics_path}"
    return text
