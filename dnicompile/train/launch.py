"""`--train --workers N` and torchrun: check the inputs here, then start (or join) the workers.

[Note: loopback] Workers started with `--workers N` all run on this host, so nothing of theirs listens beyond
it: the launcher binds a socket to 127.0.0.1 on a port the system picks and hands it to a `TCPStore` (the
rendezvous), which keeps it for the whole run (no port is released and picked again, so no other process can
take it in between); the workers connect to it and build their process group from it (`store=`), and gloo
(and NCCL) use the loopback interface only. MASTER_ADDR / MASTER_PORT are read only under torchrun (WORLD_SIZE
set), whose rendezvous is the user's to configure. Ranks exchange tensors only, never pickled objects.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import tempfile
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..compile.auto import pinned_cuts
from ..errors import DNIError
from ..files import write_text_atomic
from ..runtime.distributed import find_checkpoint
from ..runtime.placement import measure_stage_costs, plan_placement
from ..runtime.transport import PeerError
from .data import find_fashion_mnist
from .loggers import chosen_loggers
from .outputs import check_outputs, cli_schedule, exit_code, require_data, resolve_device


def run_fields(args, spec) -> dict:
    """What every multi-process run takes from the command line and the spec: files, steps, batches, seed."""
    return {
        "model_path": str(Path(args.model).resolve()),
        "spec_path": str(Path(args.spec).resolve()),
        # cuts a `cuts: {auto: ...}` spec chose here are the workers' too, not chosen again in each of them
        "overrides": [*(getattr(args, "set", None) or []), *pinned_cuts(spec)],
        "command": getattr(args, "argv", None),
        "loggers": chosen_loggers(args),
        **cli_schedule(args, spec),
    }


def train_distributed_from_cli(program, args, console) -> int:
    spec = program.spec
    require_data(spec)
    find_fashion_mnist(args.data or spec.data.path)  # fail or download here, once; the workers find the files
    resolve_device(args.device)
    under_torchrun = "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun else args.workers
    if under_torchrun and spec.chosen_by is not None and spec.chosen_by.balance == "time":
        raise DNIError(
            f"{spec.where('cuts', 'auto', 'balance')}: `balance: time` under torchrun: each process would time the "
            "model itself and could choose other cuts. Run `dnicompile MODEL.py --spec SPEC --nodes` once and paste "
            "the cuts it prints into the spec, or use `balance: flops` or `params`."
        )
    plan_placement(program, world, spec.distributed)  # validates the placement against the stages
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // (int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    out_dir, metrics_path = check_outputs(args)
    resume = None
    if args.resume:  # chosen here, before starting workers; every rank of a torchrun job chooses alike
        say = console.print if not under_torchrun or os.environ.get("RANK") == "0" else (lambda *a, **k: None)
        resume = str(find_checkpoint(Path(args.resume), world, say=lambda t: say(t, highlight=False)))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    if spec.distributed.checkpoint_every and out_dir is None:
        raise DNIError("distributed.checkpoint_every is set in the spec but no --out DIR was given to write to.")
    cfg = RunConfig(
        **run_fields(args, spec),
        data_dir=args.data,
        device=args.device,
        threads=threads,
        log_every=args.log_every or spec.distributed.log_every,
        out_dir=str(out_dir) if out_dir else None,
        metrics_path=str(metrics_path) if metrics_path else None,
        # distributed.checkpoint_every, the older spelling, still wins where a spec sets it
        checkpoint_every=spec.distributed.checkpoint_every or spec.train.checkpoint_every,
        keep_checkpoints=spec.train.keep_checkpoints,
        resume=resume,
    )
    if under_torchrun:
        try:
            summary = run_rank(int(os.environ["RANK"]), world, cfg)
        except Exception as e:
            if failure_kind(e) != "peer":
                raise
            # another rank died or hung: say so plainly (torchrun's agent names the rank that failed first)
            import sys

            sys.stderr.write(f"dnicompile: error: rank {os.environ['RANK']} stopped: {e}\n")
            return 1
        return exit_code(summary)
    console.print(f"starting {world} workers with {threads} thread(s) each", highlight=False)
    return launch(cfg, world)[0]


# --------------------------------------------------------------------------- launching
@dataclass
class RunConfig:
    """Everything a worker process needs to rebuild the program and train its part: a feed-forward program's
    stages (train/distributed.py) or a hierarchical program's core (train/hierarchical.py)."""

    model_path: str
    spec_path: str
    steps: int
    batch_size: int
    eval_every: int
    seed: int
    data_dir: str | None  # the data set's folder (feed-forward) or text file (hierarchical)
    device: str = "cpu"
    threads: int = 1
    log_every: int = 10
    out_dir: str | None = None
    metrics_path: str | None = None
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])  # --logger: the driver rank's (train/loggers.py)
    checkpoint_every: int | None = None  # with out_dir
    keep_checkpoints: int = 2
    resume: str | None = None  # the checkpoint folder to continue from (find_checkpoint's choice)
    title: str = ""  # of the plots
    overrides: list[str] = field(default_factory=list)  # the command line's --set KEY=VALUE
    command: list[str] | None = None  # the command line that started the run, for the summary
    error_dir: str = ""
    store_port: int = 0  # the launcher's loopback TCPStore; 0 under torchrun (env:// rendezvous)
    progress: bool = True


# --------------------------------------------------------------------------- the rendezvous [Note: loopback]
class LoopbackStore:
    """The launcher's TCPStore, listening on 127.0.0.1 only, on a port the system picked and that it holds."""

    def __init__(self, timeout_s: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            self.store = dist.TCPStore(
                "127.0.0.1",
                self.port,
                None,
                True,
                timeout=timedelta(seconds=timeout_s),
                wait_for_workers=False,
                master_listen_fd=sock.fileno(),
            )
        except BaseException:
            sock.close()
            raise
        sock.detach()  # the store owns the socket now, and closes it when it goes

    def close(self) -> None:
        self.store = None


def loopback_interface() -> str | None:
    """The loopback network interface's name (`lo` on Linux, `lo0` on macOS), if there is one."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def join_group(backend: str, rank: int, world: int, timeout: timedelta, store_port: int) -> None:
    """init_process_group: from the launcher's loopback store when `store_port` is set ([Note: loopback]),
    else from torchrun's environment."""
    if not store_port:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        return
    lo = loopback_interface()
    if lo is not None:  # gloo's and NCCL's own sockets: loopback only
        os.environ["GLOO_SOCKET_IFNAME"] = lo
        os.environ["NCCL_SOCKET_IFNAME"] = lo
    store = dist.TCPStore("127.0.0.1", store_port, world, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def _worker_entry(rank: int, world: int, cfg: RunConfig) -> None:
    """Process entry point (torch.multiprocessing): rank `rank` of `world`. Ctrl-C reaches the launcher, which
    asks every worker to stop with one SIGTERM ([Note: agreed stop] in train/distributed.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    summary = run_rank(rank, world, cfg)
    if summary is not None and cfg.error_dir:  # the driver's summary, for the launcher
        final = {k: v for k, v in summary.items() if k != "rows"}
        write_text_atomic(Path(cfg.error_dir) / "summary.json", json.dumps(final))


def run_rank(rank: int, world: int, cfg: RunConfig) -> dict | None:
    """Build the program, join the process group, train this rank's part with the one training loop; report
    errors to a file. Returns the summary on the driver, None elsewhere."""
    where = "?"
    try:
        torch.set_num_threads(cfg.threads)
        from ..compile.model_file import build_model
        from ..spec import load_spec

        spec = load_spec(Path(cfg.spec_path), overrides=cfg.overrides)
        timeout = timedelta(seconds=spec.distributed.timeout_s)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model_path, spec.model, spec.model_args)
        if spec.recurrent is not None:  # a hierarchical program: one core per rank
            from ..recurrent import compile_recurrent
            from .hierarchical import train_core

            program = compile_recurrent(model, spec)
            where = "lower core" if rank == 0 else "upper core"
            if cfg.error_dir:
                write_started(Path(cfg.error_dir), rank, where)
            join_group("gloo", rank, world, timeout, cfg.store_port)
            summary = train_core(program, rank, cfg)
            return summary if rank == 0 else None
        from ..program import compile_decoupled
        from .distributed import train_rank

        program = compile_decoupled(model, spec)
        device = _rank_device(cfg.device, rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        join_group(backend, rank, world, timeout, cfg.store_port)
        costs = None
        if spec.distributed.placement == "time":  # rank 0 measures, so that every rank splits alike
            program.to(device)
            program.runtime.to(device)
            box = torch.zeros(len(program.stages), dtype=torch.float64, device=device)
            if rank == 0:
                box.copy_(torch.tensor(measure_stage_costs(program, device=device), dtype=torch.float64))
            dist.broadcast(box, src=0)
            costs = box.cpu().tolist()
        placement = plan_placement(program, world, spec.distributed, costs)
        first, last = placement[rank]
        where = ", ".join(f"stage{s}" for s in range(first, last + 1))
        if cfg.error_dir:
            write_started(Path(cfg.error_dir), rank, where)
        summary = train_rank(program, rank, world, placement, device, cfg)
        return summary if rank == world - 1 else None
    except BaseException as e:
        if cfg.error_dir:
            write_report(Path(cfg.error_dir), rank, where, e)
        raise
    finally:
        leave_group()


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


@dataclass
class WorkerExit:
    """How one worker process ended: its exit code (negative: the signal that killed it) and the signal the
    launcher itself sent it, if any (then its death is the launcher's doing, not a cause)."""

    rank: int
    exitcode: int | None
    sent: int | None = None

    @property
    def failed(self) -> bool:
        return self.exitcode not in (None, 0)

    @property
    def killed_by_us(self) -> bool:
        """The launcher stopped it (after another worker's failure, or on Ctrl-C): its end is no cause."""
        return self.sent is not None


@dataclass
class WorkersResult:
    failed: bool
    stop_code: int | None  # 130 after Ctrl-C, 143 after SIGTERM
    exits: list[WorkerExit]


def run_workers(entry, args: tuple, nprocs: int, stop_grace_s: float = 3.0) -> WorkersResult:
    """Spawn `nprocs` processes running entry(rank, *args) and wait for all of them. When one fails (an exit
    code other than 0, or a signal), every other is stopped at once (SIGTERM, then SIGKILL after 3 s), so the run
    ends as soon as its first worker does; each worker's exit is recorded (`WorkersResult.exits`) for the report.
    Ctrl-C (SIGINT) or SIGTERM to the launcher sends every worker one SIGTERM and gives them `stop_grace_s` to
    finish (they agree on a step, checkpoint and write their outputs), then kills them; a second Ctrl-C or
    SIGTERM kills them at once (stop_code 130 or 143). No worker outlives this."""
    import multiprocessing.connection
    import sys

    import torch.multiprocessing as mp

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    context = None
    try:
        context = mp.start_processes(entry, args=args, nprocs=nprocs, join=False, start_method="spawn")
        procs = context.processes
        exits = [WorkerExit(rank, None) for rank in range(nprocs)]
        try:
            while True:
                alive = [p for p in procs if p.exitcode is None]
                if not alive or any(p.exitcode not in (None, 0) for p in procs):
                    break
                multiprocessing.connection.wait([p.sentinel for p in alive], timeout=1)
        except (KeyboardInterrupt, _Terminated) as stop:
            interrupted = isinstance(stop, KeyboardInterrupt)
            sys.stderr.write(
                f"dnicompile: {'interrupted' if interrupted else 'terminated'}; the workers stop after an agreed step "
                "and keep what they wrote (again to stop them at once)\n"
            )
            try:
                _stop(procs, exits, grace_s=stop_grace_s)
            except (KeyboardInterrupt, _Terminated):
                pass  # killed below
            return WorkersResult(False, 130 if interrupted else 143, exits)
        _stop(procs, exits)
        return WorkersResult(any(e.failed for e in exits), None, exits)
    finally:
        if context is not None:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
            for f in context.error_files:  # torch's per-process traceback files: the reports have it all
                if f:
                    Path(f).unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, previous)


def _stop(procs, exits: list[WorkerExit], grace_s: float = 3.0) -> None:
    """Stop every worker still running (SIGTERM; SIGKILL after `grace_s`) and record how each ended."""
    import time

    for p, e in zip(procs, exits):
        if p.exitcode is None:  # reaps a worker that has just died: its exit code is then its own
            e.sent = signal.SIGTERM
            p.terminate()
            with contextlib.suppress(OSError):  # a stopped worker (SIGSTOP, a debugger) takes SIGTERM once woken
                os.kill(p.pid, signal.SIGCONT)
    deadline = time.monotonic() + grace_s
    for p, e in zip(procs, exits):
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            e.sent = signal.SIGKILL
            p.kill()
            p.join(5)
        e.exitcode = p.exitcode


def launch(cfg: RunConfig, workers: int) -> tuple[int, dict | None]:
    """Start `workers` processes on this host and wait: (exit code, the driver's summary). If any rank fails,
    the others are stopped and the root cause is printed, naming the rank and its stages (report_failure).
    Ctrl-C (SIGINT) or SIGTERM asks every worker to stop after an agreed step, checkpoint and write what it
    has (a second one stops them at once); the exit code is then 130 or 143."""
    from ..spec import load_spec

    timeout_s = load_spec(Path(cfg.spec_path), overrides=cfg.overrides).distributed.timeout_s
    store = LoopbackStore(timeout_s)
    try:
        cfg.store_port = store.port
        with tempfile.TemporaryDirectory(prefix="dnicompile-errors-") as box:
            cfg.error_dir = box
            result = run_workers(_worker_entry, (workers, cfg), workers, stop_grace_s=timeout_s)
            path = Path(box) / "summary.json"
            summary = json.loads(path.read_text()) if path.exists() else None
            if result.stop_code is not None:
                return result.stop_code, summary
            if not result.failed:
                return 0, summary
            return report_failure(Path(box), result.exits), None
    finally:
        store.close()


# [Note: failure reports] Each rank writes started<N>.json once it knows its stages, and, if it fails,
# rank<N>.json (both atomically) with the kind of its failure, decided by the exception's type: "bad-input" (a
# DNIError: exit 2), "peer" (it was waiting on another rank: transport.PeerError or torch.distributed's own
# DistError, such as a connection reset by a dead peer), or "error". The launcher records how each worker
# ended and which it stopped itself. The root cause, in this order: the lowest rank with bad input; the lowest
# rank that died without a report by no hand of the launcher (killed by a signal, or an exit code with no
# Python exception: the OOM killer, kill -9, a crash in native code), since nothing another rank does kills
# a process that way; the first rank to report an error of its own (by the report's time: a peer's failure
# comes after the cause's, which is written before its sockets close); the lowest rank waiting on a peer.
def leave_group() -> None:
    """Destroy this process's process group, if it joined one; a peer that is gone cannot make it fail."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def failure_kind(e: BaseException) -> str:
    if isinstance(e, DNIError):
        return "bad-input"
    if isinstance(e, (PeerError, dist.DistError)):
        return "peer"
    return "error"


def write_started(folder: Path, rank: int, where: str) -> None:
    record = {"rank": rank, "stages": where, "pid": os.getpid()}
    write_text_atomic(folder / f"started{rank}.json", json.dumps(record))


def write_report(folder: Path, rank: int, where: str, e: BaseException) -> None:
    import time

    kind = failure_kind(e)
    message = str(e) if kind == "bad-input" else f"{type(e).__name__}: {e}"
    detail = "" if kind == "bad-input" else traceback.format_exc()
    record = {"rank": rank, "stages": where, "kind": kind, "message": message, "detail": detail, "time": time.time()}
    write_text_atomic(folder / f"rank{rank}.json", json.dumps(record))


def _read_json(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_reports(folder: Path) -> list[dict]:
    """The ranks' failure reports, root cause first (without the launcher's view of how workers ended); a
    report that cannot be read is left out."""
    errors = [r for p in sorted(folder.glob("rank*.json")) if (r := _read_json(p)) is not None]
    order = {"bad-input": 0, "error": 1, "peer": 2}
    errors.sort(
        key=lambda e: (
            order.get(e.get("kind"), 1),
            e.get("time", 0) if e.get("kind") == "error" else 0,
            e.get("rank", 0),
        )
    )
    return errors


def _death(e: WorkerExit) -> str:
    if e.exitcode is not None and e.exitcode < 0:
        try:
            name = f" ({signal.Signals(-e.exitcode).name})"
        except ValueError:
            name = ""
        return f"was killed by signal {-e.exitcode}{name}"
    return f"exited with code {e.exitcode} without a report"


def report_failure(folder: Path, exits: list[WorkerExit] | None = None) -> int:
    """Print the root cause of a failed run ([Note: failure reports]) and return its exit code (2 for bad
    input, else 1)."""
    import sys

    errors = read_reports(folder)
    reported = {e.get("rank") for e in errors}
    died = [x for x in exits or [] if x.failed and not x.killed_by_us and x.rank not in reported]
    # ranks the launcher had to stop, that reported nothing: still running when a peer gave up waiting on them
    silent = [x for x in exits or [] if x.killed_by_us and x.rank not in reported]
    if errors and errors[0].get("kind") == "peer" and not died and silent:
        e = errors[0]
        named = re.search(r"from rank (\d+)", e.get("message", ""))
        hung = next((x for x in silent if named and x.rank == int(named.group(1))), silent[0])
        started = _read_json(folder / f"started{hung.rank}.json") or {}
        sys.stderr.write(
            f"dnicompile: error: rank {hung.rank} ({started.get('stages', 'its stages not assigned yet')}) stopped "
            f"answering: it was still running (hung, or slower than distributed.timeout_s) when rank {e['rank']} "
            f"({e['stages']}) gave up waiting for it ({e['message']}); the workers were stopped.\n"
        )
        return 1
    if errors and errors[0].get("kind") == "bad-input" or not died:
        if not errors:
            sys.stderr.write("dnicompile: error: a worker died without a report (killed by the system?)\n")
            return 1
        e = errors[0]
        sys.stderr.write(f"dnicompile: error: rank {e['rank']} ({e['stages']}) failed: {e['message']}\n")
        if e["kind"] != "bad-input" and os.environ.get("DNICOMPILE_TRACEBACK"):
            sys.stderr.write(e["detail"])
        return 2 if e["kind"] == "bad-input" else 1
    dead = died[0]
    started = _read_json(folder / f"started{dead.rank}.json") or {}
    stages = started.get("stages", "its stages not assigned yet")
    sys.stderr.write(
        f"dnicompile: error: rank {dead.rank} ({stages}) {_death(dead)}; the other workers were stopped.\n"
    )
    return 1
