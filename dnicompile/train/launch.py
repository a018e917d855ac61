"""`--train --workers N` and torchrun: check the inputs here, then start (or join) the workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import DNIError
from ..files import write_text_atomic
from ..runtime.distributed import find_checkpoint
from ..runtime.placement import measure_stage_costs, plan_placement
from ..runtime.transport import PeerError
from .data import find_fashion_mnist
from .outputs import OUT_FILES, cli_schedule, resolve_device


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


# --------------------------------------------------------------------------- launching
@dataclass
class RunConfig:
    """Everything a worker process needs to rebuild the program and train its part."""

    model_path: str
    spec_path: str
    steps: int
    batch_size: int
    eval_every: int
    seed: int
    data_dir: str | None
    device: str
    threads: int
    out_dir: str | None = None
    metrics_path: str | None = None
    resume: str | None = None
    error_dir: str = ""
    master_port: int = 0
    progress: bool = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_entry(rank: int, world: int, cfg: RunConfig) -> None:
    """Process entry point (torch.multiprocessing): rank `rank` of `world`."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(cfg.master_port)
    run_rank(rank, world, cfg)


def run_rank(rank: int, world: int, cfg: RunConfig) -> None:
    """Build the program, join the process group, train this rank's stages; report errors to a file."""
    stage_desc = "?"
    try:
        torch.set_num_threads(cfg.threads)
        from ..compile.model_file import build_model
        from ..program import compile_decoupled
        from ..spec import load_spec

        spec = load_spec(Path(cfg.spec_path))
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model_path, spec.model, spec.model_args)
        program = compile_decoupled(model, spec)
        device = _rank_device(cfg.device, rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=spec.distributed.timeout_s)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        costs = None
        if spec.distributed.placement == "time":  # rank 0 measures, so that every rank splits alike
            program.to(device)
            program.runtime.to(device)
            box = [measure_stage_costs(program, device=device) if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            costs = box[0]
        placement = plan_placement(program, world, spec.distributed, costs)
        first, last = placement[rank]
        stage_desc = ", ".join(f"stage{s}" for s in range(first, last + 1))
        from .distributed import train_rank

        train_rank(program, rank, world, placement, device, cfg)
    except BaseException as e:
        if cfg.error_dir:
            write_report(Path(cfg.error_dir), rank, stage_desc, e)
        raise
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def _rank_device(name: str, rank: int) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        index = device.index if device.index is not None else rank % count
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return device


class _Terminated(Exception):
    """SIGTERM reached the launcher."""


def _raise_terminated(signum, frame):
    raise _Terminated


def run_workers(entry, args: tuple, nprocs: int) -> tuple[bool, int | None]:
    """Spawn `nprocs` processes running entry(rank, *args) and wait for all of them. Returns (failed,
    stop_code): failed when a worker raised or died; stop_code 130 after Ctrl-C (SIGINT) and 143 after
    SIGTERM (`kill PID`, a job scheduler), once every worker has been stopped. No worker outlives this."""
    import sys

    import torch.multiprocessing as mp

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        context = mp.start_processes(entry, args=args, nprocs=nprocs, join=False, start_method="spawn")
        try:
            while not context.join(timeout=1):
                pass
        except (mp.ProcessExitedException, mp.ProcessRaisedException):
            return True, None
        except (KeyboardInterrupt, _Terminated) as stop:
            for p in context.processes:
                if p.is_alive():
                    p.terminate()
            interrupted = isinstance(stop, KeyboardInterrupt)
            sys.stderr.write(f"dnicompile: {'interrupted' if interrupted else 'terminated'}; all workers stopped\n")
            return False, (130 if interrupted else 143)
        finally:
            for p in context.processes:
                p.join(5)
                if p.is_alive():
                    p.kill()
        return False, None
    finally:
        signal.signal(signal.SIGTERM, previous)


def launch(cfg: RunConfig, workers: int) -> int:
    """Start `workers` processes on this host and wait; returns the exit code. If any rank fails,
    the others are stopped and the first error is printed, naming the rank and its stages. Ctrl-C
    (SIGINT) or SIGTERM stops every worker; the exit code is then 130 or 143."""

    cfg.master_port = cfg.master_port or free_port()
    with tempfile.TemporaryDirectory(prefix="dnicompile-errors-") as error_dir:
        cfg.error_dir = error_dir
        failed, stop_code = run_workers(_worker_entry, (workers, cfg), workers)
        if stop_code is not None:
            return stop_code
        if not failed:
            return 0
        return report_failure(Path(error_dir))


# [Note: failure reports] Each rank that fails writes rank<N>.json (atomically) with the kind of its failure,
# decided by the exception's type: "bad-input" (a DNIError: exit 2), "peer" (it was waiting on another rank:
# transport.PeerError or torch.distributed's own DistError, such as a connection reset by a dead peer), or
# "error". The launcher reports the root cause: the lowest rank that failed for a reason of its own, else the
# lowest that failed at all.
def failure_kind(e: BaseException) -> str:
    if isinstance(e, DNIError):
        return "bad-input"
    if isinstance(e, (PeerError, dist.DistError)):
        return "peer"
    return "error"


def write_report(folder: Path, rank: int, where: str, e: BaseException) -> None:
    kind = failure_kind(e)
    message = str(e) if kind == "bad-input" else f"{type(e).__name__}: {e}"
    detail = "" if kind == "bad-input" else traceback.format_exc()
    record = {"rank": rank, "stages": where, "kind": kind, "message": message, "detail": detail}
    write_text_atomic(folder / f"rank{rank}.json", json.dumps(record))


def read_reports(folder: Path) -> list[dict]:
    """The ranks' failure reports, root cause first; a report that cannot be read is left out."""
    errors = []
    for path in sorted(folder.glob("rank*.json")):
        try:
            errors.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    errors.sort(key=lambda e: (e.get("kind") == "peer", e.get("rank", 0)))
    return errors


def report_failure(folder: Path) -> int:
    """Print the root cause of a failed run and return its exit code (2 for bad input, else 1)."""
    import sys

    errors = read_reports(folder)
    if not errors:
        sys.stderr.write("dnicompile: error: a worker died without a report (killed by the system?)\n")
        return 1
    e = errors[0]
    sys.stderr.write(f"dnicompile: error: rank {e['rank']} ({e['stages']}) failed: {e['message']}\n")
    if e["kind"] != "bad-input" and os.environ.get("DNICOMPILE_TRACEBACK"):
        sys.stderr.write(e["detail"])
    return 2 if e["kind"] == "bad-input" else 1
