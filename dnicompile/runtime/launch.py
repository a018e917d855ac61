"""`--train --workers N` and torchrun: check the inputs here, then start (or join) the workers."""

from __future__ import annotations

import os
from pathlib import Path

from ..data import find_fashion_mnist
from ..errors import DNIError
from ..train import OUT_FILES, cli_schedule, resolve_device
from .distributed import RunConfig, find_checkpoint, launch, plan_placement, run_rank


def run_fields(args, spec) -> dict:
    """What every multi-process run takes from the command line and the spec: files, steps, batches, seed."""
    return {
        "model_path": str(Path(args.model).resolve()),
        "spec_path": str(Path(args.spec).resolve()),
        **cli_schedule(args, spec),
    }


def train_distributed_from_cli(program, args, console) -> int:
    spec = program.spec
    if spec.data is None:
        raise DNIError(f"{spec.where('cuts')}: --train needs a data set: add `data: fashion-mnist` to the spec.")
    find_fashion_mnist(args.data or spec.data.path)  # fail here, not in every worker
    resolve_device(args.device)
    under_torchrun = "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun else args.workers
    plan_placement(program, world, spec.distributed)  # validates the placement against the stages
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // (int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        existing = [n for n in (*OUT_FILES, "LATEST") if (out_dir / n).exists()]
        if existing and not args.overwrite and not args.resume:
            raise DNIError(
                f"--out {out_dir}: already holds a run ({', '.join(existing)}); choose another directory, pass "
                "--resume to continue it, or --overwrite to replace it."
            )
        out_dir.mkdir(parents=True, exist_ok=True)
    if args.resume:
        find_checkpoint(Path(args.resume))  # fail here, before starting workers
    if spec.distributed.checkpoint_every and out_dir is None:
        raise DNIError("distributed.checkpoint_every is set in the spec but no --out DIR was given to write to.")
    cfg = RunConfig(
        **run_fields(args, spec),
        data_dir=args.data,
        device=args.device,
        threads=threads,
        out_dir=str(out_dir) if out_dir else None,
        metrics_path=args.metrics or (str(out_dir / "metrics.jsonl") if out_dir else None),
        resume=args.resume,
    )
    if under_torchrun:
        run_rank(int(os.environ["RANK"]), world, cfg)
        return 0
    console.print(f"starting {world} workers with {threads} thread(s) each", highlight=False)
    return launch(cfg, world)
