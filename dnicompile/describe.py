"""Text about a program: the stage table (what `program.summary()` and the CLI print) and each stage's code."""

from __future__ import annotations

import io
import textwrap
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from .memory_plan import MemoryPlan
    from .program import Cut, DecoupledProgram, Stage


def fmt_shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def format_bytes(n: int | float | None) -> str:
    """Binary units (TiB, GiB, MiB, KiB), one decimal; `?` for an unknown size."""
    if n is None:
        return "?"
    for scale, unit in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def describe_synthesizer(cut: Cut) -> str:
    """The cut's kind and settings, as the stage table and the drawings show them."""
    if cut.exact:
        text = "exact (true gradient)"
    elif cut.kind == "delayed":
        dg = cut.delayed_gradient
        steps = "step" if dg.delay == 1 else "steps"
        text = "delayed true gradient, " + ("as it arrives" if dg.delay == "auto" else f"{dg.delay} {steps} late")
        text += f", weights: {dg.weights}" + (f", shrink {dg.shrink:g}" if dg.shrink != 1 else "")
        text += f", predict {dg.predict}" if dg.predict != "none" else ""
    elif cut.kind == "local":
        ll = cut.local_loss
        text = f"local loss: {ll.head} head"
        if ll.head in ("mlp", "conv"):
            text += f" {ll.layers}x{ll.hidden}"
        text += f", {ll.optimizer.name}(lr={ll.optimizer.lr:g})" + (f", weight {ll.weight:g}" if ll.weight != 1 else "")
    else:
        sg = cut.synthetic_gradient
        text = sg.model
        if sg.model == "mlp":
            text += f" {sg.layers}x{sg.hidden or 1024}"
        elif sg.model == "conv":
            text += f" {sg.layers}x{sg.kernel_size}x{sg.kernel_size}"
        if sg.condition_on_labels:
            text = "c" + text + " +labels"
        if sg.scale != 1:
            text += f" scale={sg.scale:g}"
    if cut.synthetic_input is not None:
        text += f", synthetic input ({cut.synthetic_input.model})"
    return text


def describe_optimizer(stage: Stage) -> str:
    opt = stage.optimizer_config
    extra = "".join(f", {k}={v}" for k, v in (opt.model_extra or {}).items())
    sched = f" + {opt.scheduler.name}" if opt.scheduler else ""
    clip = f", clip_grad_norm={opt.clip_grad_norm:g}" if opt.clip_grad_norm is not None else ""
    precision = f", {stage.precision}" if getattr(stage, "precision", "fp32") != "fp32" else ""
    compiled = ", compiled" if getattr(stage, "compile_options", None) else ""
    return f"{opt.name}(lr={opt.lr:g}{extra}{clip}){sched}{precision}{compiled}"


def describe_clock(stage: Stage) -> str:
    k = getattr(stage, "accumulate", 1)
    if k > 1:  # [Note: accumulation]: the clock {every: k, offset: k - 1}, gradients kept between
        return f"every {k}, accumulating"
    c = stage.clock_config
    text = (
        f"p={c.probability:g}" if c.probability is not None else ("every step" if c.every == 1 else f"every {c.every}")
    )
    return text + (f" from {c.offset}" if c.offset else "")


def summary_table(program: DecoupledProgram, plan: MemoryPlan | None = None) -> Table:
    """The stage table. Names come from the user's model and spec, so every cell is escaped: a cut named
    `[/x]` is shown as written, never read as rich markup. With a memory plan (dnicompile/memory_plan.py) it has
    columns of each stage's parameter bytes and its estimate at the plan's batch, marked where it exceeds the plan's
    device."""
    table = Table(
        title=escape(
            f"{type(program.model).__name__}: {len(program.stages)} stages, {len(program.cuts)} cuts "
            f"(front end: {program.frontend}{', ' + program.frontend_reason if program.frontend_reason else ''})"
        ),
        show_lines=True,
    )
    memory = f"memory @ batch {plan.batch}" if plan is not None else None
    columns = ["stage", "nodes", "params", *(["param bytes", memory] if memory else [])]
    columns += ["inputs", "outputs", "outgoing cut", "optimizer", "clock"]
    for col in columns:
        right = col in ("nodes", "params", "param bytes", memory)
        table.add_column(col, overflow="fold", justify="right" if right else "left")
    over = {s.index: x for s, x in plan.over()} if plan is not None else {}
    dag = not getattr(program, "chain", True)  # [Note: stage DAG]: say where each input comes from, where outputs go
    for stage in program.stages:
        cut = program.cut_after(stage.index)
        outgoing = f"{cut.name}: {describe_synthesizer(cut)}" if cut else "(loss)"
        inputs = [f"{t.name} {fmt_shape(t.shape)}" for t in stage.inputs]
        if dag:
            if stage.index > 0:
                sources = [src for _, src in program.partition.stage_inputs[stage.index]]
                inputs = [f"{text} from {'input' if src < 0 else f'stage{src}'}" for text, src in zip(inputs, sources)]
            if cut is not None:
                readers = sorted(program.stage_graph.successors(stage.index))
                outgoing += " -> " + (", ".join(f"stage{v}" for v in readers) or "nobody")
        cells = [stage.name, str(stage.num_nodes), f"{stage.num_parameters():,}"]
        if plan is not None:
            sp = plan.stages[stage.index]
            cells.append(format_bytes(sp.param_bytes))
            text = format_bytes(sp.total_bytes) + ("" if sp.known else " + ?")
            if stage.index in over:
                text += f"\n{format_bytes(over[stage.index])} over"
            cells.append(text)
        cells += [
            "\n".join(inputs),
            "\n".join(f"{t.name} {fmt_shape(t.shape)}" for t in stage.outputs),
            outgoing,
            describe_optimizer(stage),
            describe_clock(stage),
        ]
        table.add_row(*(escape(c) for c in cells))
    notes = [describe_tied(t) for t in getattr(program.partition, "tied", ())]
    notes += describe_imports(program.spec)
    if plan is not None:
        notes.append(describe_plan(plan))
    if notes:
        table.caption = escape("\n".join(notes))
        table.caption_justify = "left"
    return table


def describe_plan(plan: MemoryPlan) -> str:
    """The stage table's note on its memory column."""
    device = f"; device {format_bytes(plan.device_bytes)}" if plan.device_bytes is not None else ""
    return (
        f"memory @ batch {plan.batch}: a stage on a device of its own (weights, gradients, optimizer state, "
        f"activations kept for the backward, boundary tensors, what its outgoing cut adds; optimizer steps as on "
        f"{plan.device}{device}); the whole program in one process: {format_bytes(plan.one_process_bytes)}. "
        "Estimates, not measurements: dnicompile/memory_plan.py says how."
    )


def describe_imports(spec) -> list[str]:
    """One line per piece of Python code the spec imports and runs (allowed with --allow-imports)."""
    if spec is None or not spec.allows_imports:
        return []
    return [
        f"imports allowed: {_dotted(loc)} = {name!r} ({what}, {spec.where(*loc)}) runs code from module "
        f"{name.partition(':')[0]}"
        for loc, what, name in spec.imports()
    ]


def _dotted(loc: tuple) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def describe_tied(tied) -> str:
    """One line on a tensor several stages use: its names, who uses it, who updates it."""
    names = " = ".join(tied.names)
    users = ", ".join(f"stage{s}" for s in tied.stages)
    if not tied.parameter:
        return f"shared buffer: {names} {fmt_shape(tied.shape)}, used by {users}"
    others = ", ".join(f"stage{s}" for s in tied.stages if s != tied.owner)
    return (
        f"tied: {names} {fmt_shape(tied.shape)}, used by {users}; updated by stage{tied.owner}, "
        f"with the gradient from {others} added first"
    )


def summary_text(program: DecoupledProgram, width: int = 140, plan: MemoryPlan | None = None) -> str:
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(summary_table(program, plan))
    return console.export_text()


def stage_header(program: DecoupledProgram, stage: Stage) -> str:
    """Comment lines naming a stage, its size, its inputs and outputs."""
    ins = ", ".join(str(t) for t in stage.inputs)
    outs = ", ".join(str(t) for t in stage.outputs)
    return (
        f"# {stage.name} of {type(program.model).__name__}: {stage.num_nodes} nodes, {stage.num_parameters():,} parameters\n"
        f"# inputs:  {ins}\n# outputs: {outs}\n"
    )


def stage_code(program: DecoupledProgram, stage: Stage) -> str:
    """The readable Python of one stage, with a header naming its cuts."""
    header = stage_header(program, stage)
    body = textwrap.indent(stage.graph_module.code.strip("\n"), "    ")
    return f"{header}class {type(stage.graph_module).__name__}(torch.nn.Module):\n{body}\n"
