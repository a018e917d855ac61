"""What a training run writes: plots, final weights and summaries (its metrics: train/loggers.py), and the checks
of --out / --metrics / --logger before a run starts; plus the CLI's device and schedule options shared by every loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import DNIError
from ..files import checkpoints, remove_checkpoint, write_atomic
from .loggers import CSV_FILE, TENSORBOARD_DIR, check_loggers, chosen_loggers, log_folder


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


# how the cosine of each cut kind reads in a plot's legend (metrics: `cosine` per cut)
COSINE_OF = {"synthetic": "synthetic vs true", "delayed": "stale vs fresh"}


def cut_kinds(program) -> dict[str, str]:
    """{cut name: kind} (exact, synthetic, delayed, local) of a feed-forward program, for plot_curves."""
    return {cut.name: cut.kind for cut in getattr(program, "cuts", [])}


def plot_curves(rows: list[dict], path: Path, title: str, kinds: dict[str, str] | None = None) -> None:
    """Loss (training, and test at each evaluation), accuracy (training and local heads as running means, test at
    each evaluation) and the gradient cosine per cut against step, as a PNG. `kinds`: {cut name: kind}, for the
    legends (cut_kinds)."""
    plt = _pyplot()
    kinds = kinds or {}
    train = [r for r in rows if "samples_per_s" in r]
    evals = [r for r in rows if "samples_per_s" not in r and ("test_loss" in r or "test_accuracy" in r)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))

    ax = axes[0]
    _noisy_line(ax, [r["step"] for r in train], [r["loss"] for r in train], "C0", "training")
    test = [r for r in evals if _finite(r.get("test_loss"))]
    if test:
        ax.plot([r["step"] for r in test], [r["test_loss"] for r in test], "o", ms=5, color="C3", label="test")
    ax.set(title="loss", xlabel="step")
    _loss_scale(ax, [r["loss"] for r in train] + [r["test_loss"] for r in test])
    _legend(ax)

    ax = axes[1]
    acc = [r for r in train if "train_accuracy" in r]
    _noisy_line(ax, [r["step"] for r in acc], [r["train_accuracy"] for r in acc], "C0", "training")
    for k, cut in enumerate(sorted({c for r in train for c in r.get("head_accuracy", {})})):
        pts = [r for r in train if cut in r.get("head_accuracy", {})]
        heads = [r["head_accuracy"][cut] for r in pts]
        ax.plot([r["step"] for r in pts], _running_mean(heads), lw=1, ls="--", color=f"C{k + 4}", label=f"{cut} head")
    test = [r for r in evals if _finite(r.get("test_accuracy"))]
    if test:
        steps, values = [r["step"] for r in test], [r["test_accuracy"] for r in test]
        ax.plot(steps, values, "-o", ms=5, color="C3", label="test")
    ax.set(title="accuracy", xlabel="step")
    if ax.lines:
        _legend(ax)
    else:
        _empty(ax, "no accuracy: the output is not class scores")

    ax = axes[2]
    cuts = sorted({c for r in train for c in r.get("cosine", {})})
    for c in cuts:
        pts = [r for r in train if _finite(r["cosine"].get(c))]
        label = f"{c}: {COSINE_OF[kinds[c]]}" if kinds.get(c) in COSINE_OF else c
        ax.plot([r["step"] for r in pts], [r["cosine"][c] for r in pts], lw=1, label=label)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set(title="gradient cosine per cut", xlabel="step", ylim=(-0.2, 1.0))
    if cuts:
        _legend(ax)
    else:
        _empty(ax, "no synthetic or delayed cuts")
    _finish(fig, title, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _running_mean(values: list[float]) -> list[float]:
    """A centred running mean over about a twentieth of the points (at least 1), shorter at the ends."""
    half = len(values) // 40
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - half) : i + half + 1] if _finite(v)]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out


def _noisy_line(ax, steps: list[int], values: list[float], color: str, label: str) -> None:
    """A per-batch quantity: the logged values faint, their running mean over them (one line where they are few)."""
    if len(values) >= 40:
        ax.plot(steps, values, lw=0.8, alpha=0.3, color=color)
        ax.plot(steps, _running_mean(values), lw=1.5, color=color, label=f"{label} (running mean)")
    elif values:
        ax.plot(steps, values, lw=1, color=color, label=label)


def _loss_scale(ax, values: list[float]) -> None:
    """A log axis where every loss is positive and they span more than a factor of 3, with ticks at round numbers
    written as numbers (0.3, 0.5, 1, 2) rather than powers of ten; else linear."""
    positive = [v for v in values if _finite(v)]
    if not positive or min(positive) <= 0 or max(positive) < 3 * min(positive):
        return
    ax.set_yscale("log")
    log_ticks(ax.yaxis, *ax.get_ylim())


def log_ticks(axis, lo: float, hi: float) -> list[float]:
    """Put 3 to about 10 major ticks at round numbers between lo and hi on a log `axis` (1, 2, 5 per decade where
    powers of ten alone are too few), labelled as plain numbers, minor ticks unlabelled; returns the ticks."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    ticks: list[float] = []
    for subs in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9), tuple(m / 4 for m in range(4, 40))):
        ticks = [m * 10.0**e for e in range(first, last + 1) for m in subs if lo <= m * 10.0**e <= hi]
        if len(ticks) >= 3:
            break
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
    axis.set_minor_formatter(NullFormatter())
    return ticks


def _legend(ax) -> None:
    if any(not line.get_label().startswith("_") for line in ax.get_lines()):
        ax.legend(fontsize=8)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _finish(fig, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


OUT_FILES = ("model.pt", "checkpoint.pt", "curves.png", "summary.json", "metrics.jsonl", CSV_FILE, TENSORBOARD_DIR)


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
    """--out, --metrics and --logger, checked before training starts: never overwrite a run without --overwrite. With
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
    chosen = chosen_loggers(args)
    check_loggers(
        chosen, metrics_path is not None, "--logger ", "into --out DIR, or next to --metrics", "give --out or --metrics"
    )
    folder = log_folder(out_dir, metrics_path)
    if folder is not None and out_dir is None and not args.overwrite and resume is None:
        for name, file in (("csv", CSV_FILE), ("tensorboard", TENSORBOARD_DIR)):
            if name in chosen and (folder / file).exists():
                raise DNIError(
                    f"--logger {name}: {folder / file} exists (the {name} logger writes next to --metrics "
                    f"{metrics_path}); choose --metrics in another folder, or pass --overwrite."
                )
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
    """Loss, then solved length (copy) or held-out BPC (text), then the synthesizers' cosine, against step;
    evaluations are marked."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    train = [r for r in rows if "elapsed_s" in r and "cosine" in r]
    evals = [r for r in rows if "elapsed_s" in r and "cosine" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    _noisy_line(axes[0], [r["step"] for r in train], [r["loss"] for r in train], "C0", "training")
    axes[0].set(title="training loss per step", xlabel="step")
    _loss_scale(axes[0], [r["loss"] for r in train])
    _legend(axes[0])
    if any("bpc" in r for r in evals):
        pts = [r for r in evals if "bpc" in r]
        axes[1].plot([r["step"] for r in pts], [r["bpc"] for r in pts], marker="o", label="held-out")
        if any("upper_bpc" in r for r in pts):
            axes[1].plot([r["step"] for r in pts], [r["upper_bpc"] for r in pts], marker="s", label="upper")
        axes[1].legend(fontsize=8)
        axes[1].set(title="bits per character (evaluations)", xlabel="step")
    else:
        pts = [r for r in rows if "solved_length" in r]
        axes[1].step([r["step"] for r in pts], [r["solved_length"] for r in pts], where="post", label="solved length")
        marks = [r for r in evals if "solved_length" in r]
        axes[1].plot([r["step"] for r in marks], [r["solved_length"] for r in marks], "o", ms=4, label="evaluations")
        axes[1].yaxis.set_major_locator(MaxNLocator(integer=True))
        axes[1].legend(fontsize=8)
        axes[1].set(title="solved length (curriculum)", xlabel="step")
    names = sorted({c for r in train for c in r.get("cosine", {})})
    for c in names:
        pts = [r for r in train if c in r["cosine"] and math.isfinite(r["cosine"][c])]
        axes[2].plot([r["step"] for r in pts], [r["cosine"][c] for r in pts], lw=1, label=c)
    axes[2].axhline(0, color="0.6", lw=0.8)
    axes[2].set(title="cos(synthetic gradient, its target)", xlabel="step", ylim=(-0.2, 1.0))
    if names:
        axes[2].legend(fontsize=8)
    else:
        text = "no synthetic gradient used yet" if synthetic else "plain truncated BPTT"
        _empty(axes[2], text)
    _finish(fig, title, path)


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
        for n in ("model.pt", "checkpoint.pt", "curves.png", "summary.json", "metrics.jsonl", CSV_FILE)
        if (out_dir / n).exists()
    ]
    if (out_dir / TENSORBOARD_DIR).is_dir():
        names.append(TENSORBOARD_DIR + "/")
    text = f"{', '.join(names)} to {out_dir}"
    if metrics_path is not None and metrics_path.is_file() and metrics_path.parent.resolve() != out_dir.resolve():
        text += f", and the metrics to {metrics_path}"
    return text
