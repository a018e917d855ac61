"""Inspect a DecoupledProgram: the stage table, generated code, and a drawing of the stage graph."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from .compile.emit import stage_module_source
from .describe import (
    describe_clock,
    describe_optimizer,
    describe_synthesizer,
    fmt_shape,
    stage_header,
    summary_text,
)
from .errors import DNIError
from .files import save_atomic, write_text_atomic

if TYPE_CHECKING:
    from .memory_plan import MemoryPlan
    from .program import DecoupledProgram


def dot_string(text: str) -> str:
    """`text` as a double-quoted Graphviz string: backslashes, quotes and line breaks escaped, so that a name
    from the spec or the model (a cut named `a" ; x -> y ; "`) stays one label and never adds statements."""
    escaped = str(text).replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
    return f'"{escaped}"'


def _lines(*parts: str) -> str:
    """Several lines of one label: each escaped, joined by Graphviz's line break."""
    return dot_string("\n".join(parts))


# How each cut kind is drawn: (colour, Graphviz edge style, SVG stroke-dasharray, the legend's words). The
# drawings show a legend of the kinds a program has.
CUT_STYLES = {
    "exact": ("#333333", "solid", "", "exact: the true gradient crosses"),
    "synthetic": ("#1f6fd1", "dashed", "6,4", "synthetic: a synthesizer predicts the gradient"),
    "local": ("#2a9d4b", "dashed", "10,3,2,3", "local loss: a head trains the stage before; nothing goes back"),
    "delayed": ("#d9822b", "dotted", "2,3", "delayed: the true gradient, steps late"),
}
_LEGEND_SAMPLE = {
    "solid": "\u2501\u2501\u2501\u2501",
    "dashed": "\u2501 \u2501 \u2501",
    "dotted": "\u00b7\u00b7\u00b7\u00b7\u00b7\u00b7",
}


def _kinds(program: DecoupledProgram) -> list[str]:
    """The cut kinds the program has, in CUT_STYLES' order."""
    present = {cut.kind for _, _, cut in program.stage_graph.edges(data="cut")}
    return [k for k in CUT_STYLES if k in present]


def _dot_legend(kinds: list[str]) -> str:
    """A Graphviz node whose HTML label lists the cut kinds drawn, each with a sample of its line."""
    rows = "".join(
        f'<tr><td align="left"><font color="{CUT_STYLES[k][0]}">{_LEGEND_SAMPLE[CUT_STYLES[k][1]]}</font></td>'
        f'<td align="left">{html.escape(CUT_STYLES[k][3])}</td></tr>'
        for k in kinds
    )
    table = (
        f'<table border="0" cellspacing="2"><tr><td colspan="2" align="left"><b>cut kinds</b></td></tr>{rows}</table>'
    )
    return f'  "legend" [shape=plaintext, fontsize=10, label=<{table}>];'  # unconnected: drawn in the top rank


def stages_dot(program: DecoupledProgram) -> str:
    """The stage graph in Graphviz dot: stages as boxes, boundary tensors on the edges. Every identifier and
    label is a quoted, escaped string (dot_string)."""
    lines = ["digraph stages {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb"];']
    lines.append('  "input" [shape=plaintext, label="input"];')
    for s in program.stages:
        label = _lines(
            s.name,
            f"{s.num_nodes} nodes, {s.num_parameters():,} params",
            f"{describe_optimizer(s)}, {describe_clock(s)}",
        )
        lines.append(f"  {dot_string(s.name)} [label={label}];")
    lines.append('  "loss" [shape=plaintext, label="output"];')
    first = ", ".join(str(t) for t in program.stages[0].inputs)
    lines.append(f'  "input" -> {dot_string(program.stages[0].name)} [label={dot_string(first)}];')
    for s in program.stages[1:]:  # stages that read program inputs themselves ([Note: stage DAG])
        direct = [t for t, (_, src) in zip(s.inputs, program.partition.stage_inputs[s.index]) if src < 0]
        if direct:
            label = dot_string(", ".join(str(t) for t in direct))
            lines.append(f'  "input" -> {dot_string(s.name)} [label={label}];')
    for u, v, data in program.stage_graph.edges(data=True):  # [Note: stage graph]
        cut = data["cut"]
        color, style = CUT_STYLES[cut.kind][:2]
        label = _lines(
            f"{cut.name} ({describe_synthesizer(cut)})", *(f"{b.name} {fmt_shape(b.shape)}" for b in data["tensors"])
        )
        head, tail = program.stages[u].name, program.stages[v].name
        lines.append(f'  {dot_string(head)} -> {dot_string(tail)} [label={label}, style={style}, color="{color}"];')
    last = program.stages[-1]
    outputs = ", ".join(str(t) for t in last.outputs)
    lines.append(f'  {dot_string(last.name)} -> "loss" [label={dot_string(outputs)}];')
    kinds = _kinds(program)
    if kinds:
        lines.append(_dot_legend(kinds))
    lines.append("}")
    return "\n".join(lines) + "\n"


def stages_svg(program: DecoupledProgram) -> str:
    """A self-contained SVG drawing of the stage chain with boundary tensors on the edges."""
    box_w, box_h, gap, left = 360, 64, 120, 40
    label_x = left + box_w + 30
    n = len(program.stages)
    height = 70 + n * box_h + (n - 1) * gap + 60
    width = label_x + 520
    markers = "".join(
        f'<marker id="arrow-{kind}" markerWidth="10" markerHeight="10" refX="9" refY="3" orient="auto">'
        f'<path d="M0,0 L0,6 L9,3 z" fill="{color}"/></marker>'
        for kind, (color, *_) in CUT_STYLES.items()
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="12">',
        f"<defs>{markers}</defs>",
    ]
    kinds = _kinds(program)
    if kinds:  # the legend: top right, above the first cut's label
        parts.append(f'<text x="{label_x}" y="16" font-weight="bold">cut kinds</text>')
        for j, kind in enumerate(kinds):
            color, _, dash, words = CUT_STYLES[kind]
            ly = 16 + 15 * (j + 1)
            dashes = f' stroke-dasharray="{dash}"' if dash else ""
            parts.append(
                f'<line x1="{label_x}" y1="{ly - 4}" x2="{label_x + 36}" y2="{ly - 4}" stroke="{color}" '
                f'stroke-width="2"{dashes}/>'
            )
            parts.append(f'<text x="{label_x + 44}" y="{ly}" font-size="11">{html.escape(words)}</text>')
    first = ", ".join(f"{t.name} {fmt_shape(t.shape)}" for t in program.stages[0].inputs)
    parts.append(f'<text x="{left}" y="20" fill="#555">input: {html.escape(first)}</text>')
    y = 40
    middle = {s.index: 40 + s.index * (box_h + gap) + box_h / 2 for s in program.stages}
    skips = [(u, v) for u, v in sorted(program.stage_graph.edges) if v != u + 1]
    for k, (u, v) in enumerate(skips):  # edges that pass stages by ([Note: stage DAG]): on the left, one lane each
        lane = left - 8 - 6 * (k % 5)
        cut = program.cuts[u]
        color, _, dash, _ = CUT_STYLES[cut.kind]
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(
            f'<polyline points="{left},{middle[u]} {lane},{middle[u]} {lane},{middle[v]} {left - 2},{middle[v]}" '
            f'fill="none" stroke="{color}" stroke-width="1.5"{dashes} marker-end="url(#arrow-{cut.kind})"/>'
        )
    for stage in program.stages:
        esc = html.escape
        parts.append(
            f'<rect x="{left}" y="{y}" width="{box_w}" height="{box_h}" rx="10" fill="#eef3fb" stroke="#36c"/>'
        )
        parts.append(f'<text x="{left + 12}" y="{y + 20}" font-weight="bold">{esc(stage.name)}</text>')
        parts.append(
            f'<text x="{left + 12}" y="{y + 38}">{stage.num_nodes} nodes, {stage.num_parameters():,} params</text>'
        )
        parts.append(
            f'<text x="{left + 12}" y="{y + 54}">{esc(describe_optimizer(stage))}, {esc(describe_clock(stage))}</text>'
        )
        cut = program.cut_after(stage.index)
        if cut is not None and program.stage_graph.has_edge(stage.index, stage.index + 1):
            x = left + box_w / 2
            color, _, dash, _ = CUT_STYLES[cut.kind]
            dashes = f' stroke-dasharray="{dash}"' if dash else ""
            parts.append(
                f'<line x1="{x}" y1="{y + box_h}" x2="{x}" y2="{y + box_h + gap - 4}" stroke="{color}" '
                f'stroke-width="1.5"{dashes} marker-end="url(#arrow-{cut.kind})"/>'
            )
        if cut is not None:
            color = CUT_STYLES[cut.kind][0]
            ty = y + box_h + 22
            readers = sorted(program.stage_graph.successors(stage.index))
            to = "" if readers == [stage.index + 1] else " -> " + ", ".join(f"stage{v}" for v in readers)
            parts.append(
                f'<text x="{label_x}" y="{ty}" font-weight="bold"><tspan fill="{color}">cut {esc(cut.name)}</tspan>: '
                f"{esc(describe_synthesizer(cut))}{esc(to)}</text>"
            )
            for j, b in enumerate(cut.sent[:5]):
                parts.append(f'<text x="{label_x}" y="{ty + 16 * (j + 1)}">{esc(b.name)} {fmt_shape(b.shape)}</text>')
            if len(cut.sent) > 5:
                parts.append(f'<text x="{label_x}" y="{ty + 16 * 6}">... {len(cut.sent) - 5} more</text>')
        y += box_h + gap
    last = ", ".join(f"{t.name} {fmt_shape(t.shape)}" for t in program.stages[-1].outputs)
    parts.append(f'<text x="{left}" y="{y - gap + 20}" fill="#555">output: {html.escape(last)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_emit(program: DecoupledProgram, out_dir: str | Path, plan: MemoryPlan | None = None) -> list[Path]:
    """Write stage_<i>.py, stages.dot, stages.svg and stages.html into `out_dir`; with a memory plan also
    memory.json, its per-stage breakdown ([Note: memory plan]), and its column in stages.html's table."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DNIError(f"--emit {out}: exists and is not a directory; give a directory to write the stage files to.")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stage in program.stages:
        path = out / f"stage_{stage.index}.py"
        header = (
            f"{stage_header(program, stage)}# Import this file and build the stage with Stage{stage.index}(model).\n"
        )
        constants_file = f"stage_{stage.index}_constants.pt"
        source, constants = stage_module_source(
            stage.graph_module, program.model, f"Stage{stage.index}", header, constants_file
        )
        if constants:
            save_atomic(constants, out / constants_file)
            written.append(out / constants_file)
        write_text_atomic(path, source)
        written.append(path)
    svg = stages_svg(program)
    files = {
        "stages.dot": stages_dot(program),
        "stages.svg": svg,
        "stages.html": (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(type(program.model).__name__)} "
            "stages</title>"
            "</head><body><h1>Stages</h1>"
            + svg
            + "<pre>"
            + html.escape(summary_text(program, plan=plan))
            + "</pre></body></html>\n"
        ),
    }
    if plan is not None:
        files["memory.json"] = plan.to_json()
    for name, text in files.items():
        write_text_atomic(out / name, text)
        written.append(out / name)
    return written
