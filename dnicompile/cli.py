"""Command line: `dnicompile model.py --spec cuts.yaml [--code] [--emit DIR] [--train ...]`, `dnicompile schema`."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import traceback
from pathlib import Path

from rich.console import Console

from .errors import DNIError

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: usage + message, exit 2, no traceback
        self.print_usage(sys.stderr)
        sys.stderr.write(f"dnicompile: error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dnicompile")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="dnicompile",
        description="Compile a PyTorch model into decoupled stages trained with synthetic gradients.",
        epilog="`dnicompile schema` prints the spec's JSON Schema.",
    )
    p.add_argument("model", help="Python file defining the model (`model`, `build_model`, or the spec's `model:`)")
    p.add_argument("--spec", required=True, help="YAML file of cut points (see specs/)")
    p.add_argument("--version", action="version", version=f"dnicompile {_version()}")
    p.add_argument(
        "--allow-imports",
        action="store_true",
        help="let the spec name Python code to import and run: a loss 'package.module:function', a synthesizer "
        "'package.module:ClassName' or a data loader 'file.py:function' (refused without it; see README, Security)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec value, e.g. --set stages.default.optimizer.lr=1e-4 --set cuts.0.synthetic_gradient.model=mlp "
        "(a dotted path, numbers index lists; the value is YAML); checked as the file is",
    )
    inspect = p.add_argument_group("inspect")
    inspect.add_argument("--code", action="store_true", help="print each stage's generated Python")
    inspect.add_argument(
        "--nodes",
        action="store_true",
        help="list the fx nodes and module paths you can cut after, and the points automatic cuts choose from "
        "(with `cuts: {auto: ...}`: the cuts chosen, as YAML to paste into the spec)",
    )
    inspect.add_argument(
        "--emit", metavar="DIR", help="write stage_<i>.py, stages.dot, stages.svg, stages.html and memory.json"
    )
    inspect.add_argument(
        "--memory",
        type=_memory_size,
        metavar="SIZE",
        help="plan memory for a device of SIZE (80GB, 80GiB, 512MB: GB = 10^9 bytes, GiB = 2^30): say which stages "
        "would not fit and by how much, at --batch-size (default: the spec's train.batch_size); the stage table "
        "always estimates each stage (README, Planning memory). A plan, not a check: the exit code stays 0",
    )
    train = p.add_argument_group("train")
    train.add_argument("--train", action="store_true", help="train the program on the spec's data set")
    train.add_argument(
        "--data", metavar="DIR", help="data directory (default: the spec's data.path, then system paths)"
    )
    train.add_argument("--steps", type=_positive_int, help="training steps (default: the spec's train.steps)")
    train.add_argument("--batch-size", type=_positive_int, help="batch size (default: the spec's train.batch_size)")
    train.add_argument("--eval-every", type=_positive_int, help="evaluate on the test set every N steps")
    train.add_argument("--seed", type=_seed, help="random seed (default: the spec's train.seed)")
    train.add_argument(
        "--log-every",
        type=_positive_int,
        help="a metrics line every N steps (default 10; on several workers the spec's distributed.log_every)",
    )
    train.add_argument("--metrics", metavar="FILE.jsonl", help="write one JSON object per line of metrics")
    train.add_argument("--out", metavar="DIR", help="write learning curves (PNG), metrics and final weights here")
    train.add_argument(
        "--logger",
        type=_logger_names,
        metavar="NAME[,NAME]",
        help="where the metrics go: jsonl (default; metrics.jsonl or --metrics), csv (metrics.csv), tensorboard "
        "(tensorboard/; needs the tb extra), comma-separated; csv and tensorboard write into --out, else next to "
        "--metrics",
    )
    train.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    train.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --out")
    train.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run whose --out is DIR from its newest readable checkpoint (--out defaults to DIR)",
    )
    dist = p.add_argument_group("distributed")
    dist.add_argument("--workers", type=_positive_int, default=1, help="processes on this host, one stage group each")
    dist.add_argument("--threads", type=_positive_int, help="intra-op threads per worker (default: cores / workers)")
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks of internal errors")
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _Size(int):
    """Bytes, remembering how the flag wrote them (`80GB`)."""

    text = ""


def _memory_size(text: str) -> _Size:
    from .memory_plan import parse_memory

    try:
        size = _Size(parse_memory(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    size.text = text
    return size


def _logger_names(text: str) -> list[str]:
    from .train.loggers import logger_names

    try:
        return logger_names(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed is an integer from 0 to {MAX_SEED}, got {value}")
    return value


MAX_SEED = 2**32 - 1  # as the spec's train.seed (dnicompile.spec.MAX_SEED)

# errors of the file system, not of dnicompile: a full disk, a read-only mount, a path that is a directory
_OS_REASONS = {
    errno.ENOSPC: ("no space left on the device", "free some space or write somewhere else"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write somewhere else"),
    errno.EROFS: ("read-only file system", "choose a path on a writable file system"),
    errno.EACCES: ("permission denied", "choose a path you may write to"),
    errno.EPERM: ("operation not permitted", "choose a path you may write to"),
    errno.EISDIR: ("is a directory", "give the path of a file"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "check the path"),
    errno.EEXIST: ("already exists", "choose another path or remove it"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.EFBIG: ("file too large", "write somewhere else"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
    errno.EIO: ("input/output error", "check the disk"),
}


def _os_error_message(e: OSError, args: argparse.Namespace | None) -> str | None:
    """`--out DIR: PATH: read-only file system; choose ...` for an OSError about a file, else None (a bug)."""
    if e.filename is None and e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO):
        return None
    reason, hint = _OS_REASONS.get(e.errno, (e.strerror or str(e), "check the path"))
    path = os.fsdecode(e.filename) if e.filename is not None else None
    flag = ""
    for name in ("out", "metrics", "emit", "data", "resume", "spec", "model"):
        value = getattr(args, name, None) if args is not None else None
        if value and path is not None and _within(path, value):
            flag = f"--{name} {value}: " if name not in ("spec", "model") else ""
            break
    where = f"{path}: " if path is not None else ""
    return f"{flag}{where}{reason}; {hint}."


# what torch.save's C++ writer raises when the file system refuses a write (a full disk)
_SAVE_FAILURES = ("PytorchStreamWriter failed", "file write failed", "iostream error", "inline_container.cc")


def _save_error_message(e: RuntimeError, args: argparse.Namespace | None) -> str | None:
    """`--out DIR: writing a file failed (...): the disk is full` for torch.save's own write errors, else None."""
    chain, seen = [], e
    while seen is not None and len(chain) < 5:
        chain.append(str(seen))
        seen = seen.__context__
    if not any(marker in text for text in chain for marker in _SAVE_FAILURES):
        return None
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    out = getattr(args, "out", None) if args is not None else None
    where = f"--out {out}: " if out else ""
    free = ""
    if out:
        import shutil

        with contextlib.suppress(OSError):
            free = f" ({shutil.disk_usage(out).free:,} bytes free there)"
    return (
        f"{where}writing a file failed ({first}){free}; the disk is probably full: free some space or write "
        "somewhere else."
    )


def _within(path: str, top: str) -> bool:
    try:
        p, t = Path(path).resolve(), Path(top).resolve()
    except (OSError, RuntimeError):
        return False
    return p == t or t in p.parents


@contextlib.contextmanager
def _imports_allowed(allow: bool):
    """With --allow-imports, let the worker processes this run starts load the spec with imports allowed too
    (they inherit DNICOMPILE_ALLOW_IMPORTS=1); the variable is restored afterwards."""
    from .spec import ALLOW_IMPORTS_ENV

    if not allow:
        yield
        return
    before = os.environ.get(ALLOW_IMPORTS_ENV)
    os.environ[ALLOW_IMPORTS_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ALLOW_IMPORTS_ENV, None)
        else:
            os.environ[ALLOW_IMPORTS_ENV] = before


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["schema"]:
        from .spec import json_schema

        print(json.dumps(json_schema(), indent=2))
        return 0
    try:
        args = build_parser().parse_args(argv)
        args.argv = ["dnicompile", *argv]  # for the run's summary
    except SystemExit as e:  # --help (0) or a bad flag (2): argparse has printed the message
        return int(e.code or 0)
    try:
        with _imports_allowed(args.allow_imports):
            return _run(args)
    except DNIError as e:
        sys.stderr.write(f"dnicompile: error: {e}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("dnicompile: interrupted\n")
        return 130
    except OSError as e:  # the file system said no: name the path and why
        message = _os_error_message(e, args)
        if message is None:
            return _internal_error(e, args)
        sys.stderr.write(f"dnicompile: error: {message}\n")
        return EXIT_BAD_INPUT
    except RuntimeError as e:
        message = _save_error_message(e, args)
        if message is None:
            return _internal_error(e, args)
        sys.stderr.write(f"dnicompile: error: {message}\n")
        return EXIT_BAD_INPUT
    except Exception as e:
        return _internal_error(e, args)


def _internal_error(e: BaseException, args: argparse.Namespace) -> int:
    """A bug of ours: say so plainly, traceback on request."""
    if args.traceback:
        traceback.print_exception(type(e), e, e.__traceback__)
    sys.stderr.write(
        f"dnicompile: internal error: {type(e).__name__}: {e}\n"
        "This is a bug in dnicompile; rerun with --traceback and report it with your model and spec.\n"
    )
    return 1


def _run(args: argparse.Namespace) -> int:
    import torch

    from .compile.model_file import build_model
    from .describe import stage_code, summary_table
    from .inspect import write_emit
    from .program import compile_decoupled
    from .spec import load_spec

    _check_flags(args)
    spec = load_spec(Path(args.spec), allow_imports=True if args.allow_imports else None, overrides=args.set)
    _check_spec(spec)  # optimizers, schedulers, the loss: before the model file runs
    _note_imports(spec)
    if args.train:  # the same initial weights in this process and in every distributed worker
        torch.manual_seed(spec.train.seed if args.seed is None else args.seed)
    model = build_model(args.model, spec.model, spec.model_args, where=spec.where)
    if spec.recurrent is not None or spec.bptt is not None:  # cut in time, not in the graph
        if args.memory:
            raise DNIError(f"--memory {args.memory.text}: plans feed-forward programs; this spec is recurrent.")
        from .train.recurrent import run_recurrent_cli

        if not args.train:  # check all that training would build (it builds its own program)
            from .recurrent import compile_recurrent

            compile_recurrent(model, spec).runtime  # noqa: B018 - built for its checks
        return run_recurrent_cli(model, spec, args)
    program = compile_decoupled(model, spec)
    if not args.train:
        # build what --train builds (synthesizers against the boundary tensors, optimizers, the loss), so that
        # checking a spec finds every error training would; training builds it itself, after seeding
        program.runtime  # noqa: B018 - built for its checks
        from .runtime.distributed import check_microbatches

        check_microbatches(program)
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    if args.nodes:
        _print_nodes(program, out)
    if args.train:
        if args.workers > 1 or "WORLD_SIZE" in os.environ:
            if spec.data is not None and spec.data.loader is not None:
                raise DNIError(
                    f"{spec.where('data', 'loader')}: `data.loader` trains in one process; drop --workers (several "
                    "workers train on `data: fashion-mnist`)."
                )
            from .train.launch import train_distributed_from_cli

            return train_distributed_from_cli(program, args, out)
        from .train.feedforward import train_from_cli

        return train_from_cli(program, args, out)
    plan = _memory_plan(program, args)
    out.print(summary_table(program, plan))
    for line in plan.report(args.memory.text if args.memory else None) if plan is not None else ():
        out.print(line, markup=False, highlight=False)
    if args.code:
        for stage in program.stages:
            out.print(stage_code(program, stage), markup=False)
    if args.emit:
        written = write_emit(program, args.emit, plan=plan)
        out.print(f"wrote {len(written)} files to {args.emit}: " + ", ".join(p.name for p in written), markup=False)
    return 0


def _memory_plan(program, args: argparse.Namespace):
    """The memory plan the stage table shows ([Note: memory plan]); with --memory, against that device. A plan
    that cannot be made is said once and the table is shown without it (--memory: exit 2)."""
    from .memory_plan import plan_memory

    try:
        return plan_memory(program, batch=args.batch_size, device_bytes=args.memory)
    except DNIError:
        raise
    except Exception as e:
        if args.memory or args.traceback:
            raise
        sys.stderr.write(f"dnicompile: note: no memory estimate ({type(e).__name__}: {e})\n")
        return None


def _check_flags(args: argparse.Namespace) -> None:
    """Flags that name files, and numbers the parser cannot judge alone: fail before any work starts."""
    if args.memory and args.train:
        raise DNIError(
            f"--memory {args.memory.text}: plans a program's memory without training; drop --train or --memory."
        )
    if args.emit:
        emit = Path(args.emit)
        if emit.exists() and not emit.is_dir():
            raise DNIError(
                f"--emit {emit}: exists and is not a directory; give a directory to write the stage files to."
            )
    if args.metrics and Path(args.metrics).is_dir():
        raise DNIError(
            f"--metrics {args.metrics}: is a directory; give the path of a file to write "
            f"(e.g. {Path(args.metrics) / 'metrics.jsonl'})."
        )
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise DNIError(f"--out {args.out}: exists and is not a directory; give a directory for the run's files.")
    cores = os.cpu_count() or 1
    if args.threads is not None and args.threads > 4 * cores:
        raise DNIError(
            f"--threads {args.threads}: this machine has {cores} core{'s' if cores != 1 else ''}; use at most "
            f"{4 * cores} (more threads than cores only slow each step down)."
        )


def _check_spec(spec) -> None:
    """What can be checked from the spec alone: every optimizer and scheduler, and the loss's name (a
    'module:function' is imported later, with the model file's folder on the path, when the runtime is built)."""
    from .losses import get_loss, get_step_loss
    from .optim import check_optimizers

    check_optimizers(spec)
    if isinstance(spec.loss, str) and ":" not in spec.loss:
        recurrent = spec.recurrent is not None or spec.bptt is not None
        (get_step_loss if recurrent else get_loss)(spec.loss, spec.where("loss"))


def _note_imports(spec) -> None:
    """Say, once, which code an allowed spec imports and runs."""
    found = spec.imports()
    if found and spec.allows_imports:
        listed = "; ".join(f"{what} {name!r} ({spec.where(*loc)})" for loc, what, name in found)
        sys.stderr.write(f"dnicompile: note: imports allowed: the spec runs code from {listed}\n")


def _print_nodes(program, out: Console) -> None:
    from rich.markup import escape
    from rich.table import Table

    from .compile.partition import last_node_of_modules

    table = Table(title="cut points (fx nodes in program order)")
    for col in ("node", "op", "module", "stage", "`after:` a module path (leaf or not) that ends here"):
        table.add_column(col)
    nodes = list(program.partition.graph_module.graph.nodes)
    ends: dict[int, list[str]] = {}
    for path, at in last_node_of_modules(nodes, {n: i for i, n in enumerate(nodes)}).items():
        if path:
            ends.setdefault(at, []).append(path)
    for i, node in enumerate(nodes):
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = next(reversed(stack.values()))[0] if stack else (node.target if node.op == "call_module" else "")
        row = (node.name, node.op, path, program.partition.stage_of[node.name], ", ".join(ends.get(i, [])))
        table.add_row(*(escape(str(v)) for v in row))
    out.print(table)
    _print_candidates(program, out)


def _print_candidates(program, out: Console) -> None:
    """The points every path passes through (compile/auto.py), what crosses there and the cost up to there;
    with `cuts: {auto: ...}`, the cuts chosen as a `cuts:` list to paste into the spec."""
    from rich.markup import escape
    from rich.table import Table

    from .compile.auto import cut_candidates, cuts_yaml, format_bytes, format_cost

    plan = program.cut_plan
    if plan is None:
        plan = cut_candidates(program.partition.graph_module, program.model, balances=("flops", "params"))
    balances = [plan.balance] if program.cut_plan is not None else ["flops", "params"]
    chosen = {plan.candidates[i].node: f"cut {k}" for k, i in enumerate(plan.chosen)}
    if program.cut_plan is None:
        chosen = {cut.node: cut.name for cut in program.cuts}
    table = Table(title="candidate cut points (every path from the inputs to the outputs passes through them)")
    for col in ("`after:`", "node", "crossing", "bytes", *(f"{b} up to here" for b in balances), "cut"):
        table.add_column(col)
    cumulative = {b: plan.cumulative(b) for b in balances}
    totals = {b: plan.total(b) or 1.0 for b in balances}
    for i, c in enumerate(plan.candidates):
        crossing = ", ".join(
            f"{str(b.dtype).removeprefix('torch.')}[{', '.join(map(str, b.shape))}]" for b in c.boundary
        )
        costs = [f"{format_cost(cumulative[b][i], b)} ({100 * cumulative[b][i] / totals[b]:.1f}%)" for b in balances]
        row = (c.after, c.node, crossing, format_bytes(c.bytes), *costs, chosen.get(c.node, ""))
        table.add_row(*(escape(str(v)) for v in row))
    out.print(table)
    if not plan.candidates:
        out.print("no point of the graph is crossed by every path (a skip connection spans the whole model)")
    if program.cut_plan is not None:
        out.print(cuts_yaml(program.spec, program.cut_plan), markup=False, highlight=False)


if __name__ == "__main__":
    sys.exit(main())
