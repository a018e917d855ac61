"""Compile time against torch.fx's own symbolic_trace, and the torch.export front end against the fx one.

Models: deep residual MLPs of width 4 (so that the shape work is cheap and the graph size is what is
measured), blocks `x = x + fc2(relu(fc1(x)))` of 4 fx nodes each, cut into 17 stages by 16 cuts.

For each size, every measurement is repeated and the median kept; the repetitions are interleaved
(symbolic_trace, compile, passes, ...) so that a noisy, shared machine slows all of them alike:

- `symbolic_trace`: torch.fx.symbolic_trace(model), the reference, as torch ships it, and with Python's
  cyclic GC paused around it, as dnicompile pauses it around its own passes;
- `compile`: the whole compile_decoupled (trace + shapes + partition + emit + program), fx front end;
- `trace`, `shapes`, `partition`, `emit`: the passes one by one;
- `export`: compile_decoupled with `trace: {frontend: export}` (torch.export + conversion + the same passes),
  and torch.export.export alone, on the sizes given by --export-sizes.

    python benchmarks/compile_speed.py                      # 1k, 10k, 50k nodes; export on 1k and 10k
    python benchmarks/compile_speed.py --sizes 1000 --reps 3 --export-sizes 1000
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's dnicompile

from dnicompile import compile_decoupled, load_spec  # noqa: E402
from dnicompile.compile.emit import emit_stages  # noqa: E402
from dnicompile.compile.partition import partition  # noqa: E402
from dnicompile.compile.trace import _symbolic_trace, example_inputs_for, gc_paused, propagate_shapes  # noqa: E402

WIDTH = 4
NODES_PER_BLOCK = 4  # fc1, relu, fc2, add


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class ResidualMLP(nn.Module):
    def __init__(self, blocks: int, width: int = WIDTH):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(width) for _ in range(blocks)])

    def forward(self, x):
        return self.blocks(x)


def spec_for(blocks: int, cuts: int, frontend: str = "fx"):
    """16 cuts after evenly spaced blocks."""
    after = [f"blocks.{(i + 1) * blocks // (cuts + 1)}" for i in range(cuts)]
    return load_spec(
        {
            "inputs": {"x": {"shape": [8, WIDTH]}},
            "trace": {"frontend": frontend},
            "cuts": [{"after": a} for a in after],
        }
    )


def _paused(fn, *args):
    with gc_paused():
        return fn(*args)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    gc.collect()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def measure(nodes: int, reps: int, cuts: int, export_reps: int) -> dict:
    blocks = nodes // NODES_PER_BLOCK
    model = ResidualMLP(blocks)
    spec = spec_for(blocks, cuts)
    export_spec = spec_for(blocks, cuts, "export")
    names, examples = example_inputs_for(model, spec, None)
    times: dict[str, list[float]] = {}

    def add(key: str, seconds: float) -> None:
        times.setdefault(key, []).append(seconds)

    graph_nodes = len(fx.symbolic_trace(model).graph.nodes)  # warm-up, and the size
    compile_decoupled(model, spec)  # warm-up
    for rep in range(reps):
        add("symbolic_trace", timed(fx.symbolic_trace, model)[0])
        add("symbolic_trace_gc_paused", timed(_paused, fx.symbolic_trace, model)[0])
        add("compile", timed(compile_decoupled, model, spec)[0])
        t, gm = timed(_paused, _symbolic_trace, model, spec)  # GC paused, as trace() runs them
        add("trace", t)
        add("shapes", timed(_paused, propagate_shapes, gm, examples, spec)[0])
        t, part = timed(partition, gm, spec, model)
        add("partition", t)
        add("emit", timed(emit_stages, part)[0])
        if rep < export_reps:
            add("export_compile", timed(compile_decoupled, model, export_spec)[0])
            dynamic = ({0: torch.export.Dim.AUTO},)
            add("torch_export", timed(torch.export.export, model, examples, dynamic_shapes=dynamic)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    med["nodes"] = graph_nodes
    med["reps"] = reps
    return med


def table(rows: list[dict]) -> str:
    lines = [
        "| fx nodes | symbolic_trace | compile_decoupled | ratio | symbolic_trace, GC paused | ratio to that "
        "| trace | shapes | partition | emit | partition+emit per node |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pe = r["partition"] + r["emit"]
        lines.append(
            f"| {r['nodes']:,} | {r['symbolic_trace']:.3f} s | {r['compile']:.3f} s | "
            f"{r['compile'] / r['symbolic_trace']:.2f}x | {r['symbolic_trace_gc_paused']:.3f} s | "
            f"{r['compile'] / r['symbolic_trace_gc_paused']:.2f}x | {r['trace']:.3f} s | {r['shapes']:.3f} s | "
            f"{r['partition']:.3f} s | {r['emit']:.3f} s | {pe / r['nodes'] * 1e6:.1f} µs |"
        )
    exported = [r for r in rows if "export_compile" in r]
    if exported:
        lines += [
            "",
            "| fx nodes | compile, fx front end | compile, export front end | export / fx | torch.export.export alone |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in exported:
            lines.append(
                f"| {r['nodes']:,} | {r['compile']:.3f} s | {r['export_compile']:.3f} s | "
                f"{r['export_compile'] / r['compile']:.1f}x | {r['torch_export']:.3f} s |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000], help="fx nodes per model")
    p.add_argument("--reps", type=int, nargs="+", default=[7, 5, 3], help="repetitions per size (last repeats)")
    p.add_argument("--cuts", type=int, default=16)
    p.add_argument("--export-sizes", type=int, nargs="*", default=[1000, 10000], help="sizes to export too")
    p.add_argument("--export-reps", type=int, default=3, help="repetitions of the (slow) export measurements")
    args = p.parse_args()
    print(f"# torch {torch.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} threads")
    rows = []
    for i, n in enumerate(args.sizes):
        reps = args.reps[min(i, len(args.reps) - 1)]
        rows.append(measure(n, reps, args.cuts, args.export_reps if n in args.export_sizes else 0))
        print(f"{n} nodes done: {rows[-1]}", file=sys.stderr)
    print(table(rows))


if __name__ == "__main__":
    main()
