"""Command line: `dnicompile model.py --spec cuts.yaml [--code] [--emit DIR] [--train ...]`, `dnicompile schema`."""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="dnicompile",
        description="Compile a PyTorch model into decoupled stages trained with synthetic gradients.",
        epilog="`dnicompile schema` prints the spec's JSON Schema.",
    )
    p.add_argument("model", help="Python file defining the model (`model`, `build_model`, or the spec's `model:`)")
    p.add_argument("--spec", required=True, help="YAML file of cut points (see specs/)")
    inspect = p.add_argument_group("inspect")
    inspect.add_argument("--code", action="store_true", help="print each stage's generated Python")
    inspect.add_argument("--nodes", action="store_true", help="list the fx nodes and module paths you can cut after")
    inspect.add_argument("--emit", metavar="DIR", help="write stage_<i>.py, stages.dot, stages.svg and stages.html")
    train = p.add_argument_group("train")
    train.add_argument("--train", action="store_true", help="train the program on the spec's data set")
    train.add_argument(
        "--data", metavar="DIR", help="data directory (default: the spec's data.path, then system paths)"
    )
    train.add_argument("--steps", type=_positive_int, help="training steps (default: the spec's train.steps)")
    train.add_argument("--batch-size", type=_positive_int, help="batch size (default: the spec's train.batch_size)")
    train.add_argument("--eval-every", type=_positive_int, help="evaluate on the test set every N steps")
    train.add_argument("--seed", type=int, help="random seed (default: the spec's train.seed)")
    train.add_argument("--metrics", metavar="FILE.jsonl", help="write one JSON object per line of metrics")
    train.add_argument("--out", metavar="DIR", help="write learning curves (PNG), metrics and final weights here")
    train.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    train.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --out")
    dist = p.add_argument_group("distributed")
    dist.add_argument("--workers", type=_positive_int, default=1, help="processes on this host, one stage group each")
    dist.add_argument("--threads", type=_positive_int, help="intra-op threads per worker (default: cores / workers)")
    dist.add_argument("--resume", metavar="DIR", help="continue from the last checkpoint in DIR (a run's --out)")
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["schema"]:
        from .spec import json_schema

        print(json.dumps(json_schema(), indent=2))
        return 0
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad flag (2): argparse has printed the message
        return int(e.code or 0)
    try:
        return _run(args)
    except DNIError as e:
        sys.stderr.write(f"dnicompile: error: {e}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("dnicompile: interrupted\n")
        return 130
    except Exception as e:  # a bug of ours: say so plainly, traceback on request
        if args.traceback:
            traceback.print_exc()
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

    spec = load_spec(Path(args.spec))
    if args.train:  # the same initial weights in this process and in every distributed worker
        torch.manual_seed(spec.train.seed if args.seed is None else args.seed)
    model = build_model(args.model, spec.model, spec.model_args, where=spec.where)
    if spec.recurrent is not None or spec.bptt is not None:  # cut in time, not in the graph
        from .train.recurrent import run_recurrent_cli

        return run_recurrent_cli(model, spec, args)
    program = compile_decoupled(model, spec)
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    if args.nodes:
        _print_nodes(program, out)
    if args.train:
        if args.workers > 1 or "WORLD_SIZE" in os.environ:
            from .train.launch import train_distributed_from_cli

            return train_distributed_from_cli(program, args, out)
        if args.resume:
            raise DNIError("--resume continues a distributed run: use it with --workers N (N > 1) or torchrun.")
        from .train.feedforward import train_from_cli

        return train_from_cli(program, args, out)
    out.print(summary_table(program))
    if args.code:
        for stage in program.stages:
            out.print(stage_code(program, stage), markup=False)
    if args.emit:
        written = write_emit(program, args.emit)
        out.print(f"wrote {len(written)} files to {args.emit}: " + ", ".join(p.name for p in written), markup=False)
    return 0


def _print_nodes(program, out: Console) -> None:
    from rich.table import Table

    table = Table(title="cut points (fx nodes in program order)")
    for col in ("node", "op", "module", "stage"):
        table.add_column(col)
    for node in program.partition.graph_module.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = next(reversed(stack.values()))[0] if stack else (node.target if node.op == "call_module" else "")
        table.add_row(node.name, node.op, str(path), str(program.partition.stage_of[node.name]))
    out.print(table)


if __name__ == "__main__":
    sys.exit(main())
