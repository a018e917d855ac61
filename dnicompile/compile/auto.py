"""Automatic cuts (`cuts: {auto: {stages: S, balance: ...}}`): where the graph can be cut, what each piece
between those places costs, and the cuts that balance the stages.

[Note: cut candidates] A candidate is a node every path from the program's inputs to its outputs passes
through: a dominator of a virtual sink in the DAG from a virtual source (networkx's immediate dominators), on
the graph of the values gradients flow through (floating-point tensors computed from a parameter or a
floating-point input). Every other such value is then computed before it or from it, so the values crossing a
cut there are the node's own output, plus any tensor that needs no gradient and is read on both sides (a
causal mask, position ids, integer labels, a tensor a size is read from). Parameter reads are copied into
every stage, and sizes are computed again in the stage that reads them, by partition. What
crosses, and whether a cut is valid, is partition's call: the candidates are partitioned all at once, which
checks them and gives the tensors crossing each, and the stages of that partition are the pieces whose
costs the balance adds up.

[Note: balanced cuts] The stages are runs of consecutive pieces. `balance_chain` picks the S - 1 candidates
that make the largest run's cost smallest (dynamic programming), and among the splits that reach that, the
one whose cuts carry the fewest bytes, then the one with the other stages most even (least sum of squares).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import yaml
from torch.utils._pytree import tree_leaves

from ..errors import PartitionError, SpecError
from ..spec import AutoCutsConfig, CutSpec, Spec, load_spec
from .emit import emit_stages
from .partition import (
    COMPUTE_OPS,
    BoundaryTensor,
    Partition,
    _holds_tensors,
    _is_tensor,
    last_node_of_modules,
    partition,
    to_networkx,
)

BALANCES = ("flops", "params", "time")


@dataclass(frozen=True)
class Candidate:
    """A place the graph can be cut ([Note: cut candidates]): after fx node `node`, written `after` in a spec."""

    node: str
    after: str  # the outermost-but-one module path that ends at `node` (`layers.3`), else the node's name
    boundary: tuple[BoundaryTensor, ...]  # the tensors crossing a cut here

    @property
    def bytes(self) -> int:
        """Bytes crossing a cut here, at the example inputs' batch size."""
        return sum(_numel(b.shape) * _itemsize(b.dtype) for b in self.boundary)


@dataclass(frozen=True)
class CutPlan:
    """The candidates of a graph, the cost of each piece between them, and the cuts chosen (if any).

    `costs[balance][i]` is the cost of the nodes after candidate i - 1 up to and including candidate i (the
    last entry: after the last candidate); a stage's cost is the sum of its pieces'."""

    candidates: tuple[Candidate, ...]
    costs: Mapping[str, tuple[float, ...]]
    balance: str = "flops"
    chosen: tuple[int, ...] = ()  # indices into `candidates`, in order
    config: AutoCutsConfig | None = field(default=None, compare=False)

    def cumulative(self, balance: str | None = None) -> list[float]:
        """The cost of everything up to and including each candidate."""
        out, total = [], 0.0
        for c in self.costs[balance or self.balance][:-1]:
            total += c
            out.append(total)
        return out

    def total(self, balance: str | None = None) -> float:
        return float(sum(self.costs[balance or self.balance]))

    def stage_costs(self, balance: str | None = None) -> list[float]:
        """The cost of each stage the chosen cuts make."""
        return stage_costs(self.costs[balance or self.balance], self.chosen)


def choose_cuts(gm: fx.GraphModule, spec: Spec, model: nn.Module, example_inputs: tuple) -> tuple[Spec, CutPlan]:
    """Place `spec.cuts: {auto: ...}`'s cuts in the traced graph `gm`: the spec with those cuts written out
    (each of `auto.kind`), and the plan that chose them. Raises SpecError when the graph has too few places."""
    config = spec.auto_cuts
    assert config is not None
    plan = cut_candidates(gm, model, balances=(config.balance,), example_inputs=example_inputs)
    wanted = config.stages - 1
    found = len(plan.candidates)
    if wanted > found:
        where = spec.where("cuts", "auto", "stages")
        if found == 0:
            raise SpecError(
                f"{where}: `stages: {config.stages}` needs {wanted} cut{'s' if wanted != 1 else ''}, but the graph has "
                "no point where it can be cut automatically (one every path from the inputs to the outputs passes "
                "through, where only tensors cross: a skip connection over the whole model leaves none). Write the cuts as a list (`- after: "
                "NODE`; `--nodes` lists the names) where skip connections may cross them."
            )
        shown = ", ".join(f"`{c.after}`" for c in plan.candidates[:8]) + (", ..." if found > 8 else "")
        raise SpecError(
            f"{where}: `stages: {config.stages}` needs {wanted} cuts, but the graph has only {found} point"
            f"{'s' if found != 1 else ''} where it can be cut automatically (every path from the inputs to the "
            f"outputs passes through them, and only tensors cross there: after {shown}), so at most {found + 1} "
            "stages. Use `stages: {found + 1}` or fewer, or write the cuts as a "
            "list (`- after: NODE`; `--nodes` lists the names) where skip connections may cross them."
        )
    costs = plan.costs[config.balance]
    chosen = balance_chain(costs, config.stages, [c.bytes for c in plan.candidates])
    plan = CutPlan(plan.candidates, plan.costs, config.balance, chosen, config)
    return chosen_spec(spec, [plan.candidates[i].after for i in chosen]), plan


def chosen_spec(spec: Spec, after: Sequence[str]) -> Spec:
    """`spec` with `cuts: {auto: ...}` replaced by a cut after each of `after`, of the auto kind. Errors about a
    cut point at the `auto:` key, errors about its kind at `kind:` ([Note: cut candidates])."""
    config = spec.auto_cuts
    assert config is not None
    kind = config.kind.model_dump(exclude_unset=True)
    cuts = [CutSpec.model_validate({"after": a, **kind}) for a in after]
    out = spec.model_copy(update={"cuts": cuts})
    out._chosen_by = config
    marks = dict(spec._marks)
    here = marks.get(("cuts", "auto")) or marks.get(("cuts",))
    base = ("cuts", "auto", "kind")
    for i in range(len(cuts)):
        if here is not None:
            marks[("cuts", i)] = marks.get(base, here)
            marks[("cuts", i, "after")] = here
        for loc, mark in spec._marks.items():
            if loc[:3] == base and len(loc) > 3:
                marks[("cuts", i, *loc[3:])] = mark
    out._marks = marks
    return out


def cuts_data(spec: Spec) -> list[dict]:
    """The spec's cuts as plain data (what a `cuts:` list in YAML holds), each with what was set only."""
    out = []
    for cut in spec.cuts:
        data = cut.model_dump(exclude_unset=True, mode="json")
        out.append({k: data.pop(k) for k in ("after", "name") if k in data} | data)  # `after` first, as people write it
    return out


def cuts_yaml(spec: Spec, plan: CutPlan) -> str:
    """The chosen cuts as a `cuts:` list to paste into the spec in place of `cuts: {auto: ...}`."""
    config = plan.config
    costs = plan.stage_costs()
    total = sum(costs) or 1.0
    shares = ", ".join(f"{100 * c / total:.1f}%" for c in costs)
    header = (
        f"# cuts chosen by `cuts: {{auto: ...}}` ({config.stages} stages, balance: {config.balance}; stage shares "
        f"{shares} of {format_cost(total, config.balance)});\n"
        "# paste this in place of `cuts: {auto: ...}` to keep these cuts (and edit them):\n"
    )
    return header + yaml.dump({"cuts": cuts_data(spec)}, Dumper=_IndentedDumper, sort_keys=False, width=120)


def pinned_cuts(spec: Spec) -> list[str]:
    """A `--set cuts=[...]` override that fixes the cuts a `cuts: {auto: ...}` spec chose, for the worker
    processes that load the spec again (each would measure its own times, and could choose other cuts)."""
    if spec.chosen_by is None:
        return []
    # YAML's own writer, not JSON: PyYAML reads JSON's `1e-05` back as a string, its own `1.0e-05` as a number
    flow = yaml.safe_dump(cuts_data(spec), default_flow_style=True, width=float("inf"), sort_keys=False)
    return ["cuts=" + flow.strip()]


# ----------------------------------------------------------------------------- candidates and their costs


def cut_candidates(
    gm: fx.GraphModule,
    model: nn.Module,
    balances: Sequence[str] = ("flops", "params"),
    example_inputs: tuple | None = None,
) -> CutPlan:
    """The candidates of `gm` ([Note: cut candidates]) with the cost of the pieces between them by each of
    `balances` (`time` runs the pieces on `example_inputs`). `gm` is left as it is."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    compute = [n for n in nodes if n.op in COMPUTE_OPS]
    last_compute = pos[compute[-1]] if compute else -1
    names = [n.name for n in _dominators(gm) if n.op in COMPUTE_OPS and pos[n] < last_compute]
    part, names = _partition_at(gm, model, names)
    after = _spec_names(nodes, pos, model)
    candidates = tuple(
        Candidate(node=name, after=after.get(name, name), boundary=cut.boundary)
        for name, cut in zip(names, part.cuts if part is not None else ())
    )
    # the pieces: the stages of the partition at every candidate (the whole graph when there is none)
    pieces_gm = part.graph_module if part is not None else gm
    pieces = part.stage_nodes if part is not None else (tuple(n.name for n in nodes),)
    costs: dict[str, tuple[float, ...]] = {}
    for balance in balances:
        if balance == "flops":
            by_node = {n.name: node_flops(n, pieces_gm) for n in pieces_gm.graph.nodes}
            costs[balance] = tuple(float(sum(by_node[n] for n in piece)) for piece in pieces)
        elif balance == "params":
            costs[balance] = tuple(float(c) for c in _piece_params(pieces_gm, pieces))
        elif balance == "time":
            if example_inputs is None:
                raise ValueError("balance `time` needs example inputs")
            costs[balance] = tuple(_stage_times(part, model, example_inputs)) if part is not None else (0.0,)
        else:
            raise ValueError(f"unknown balance {balance!r}; one of {BALANCES}")
    return CutPlan(candidates, costs, balance=balances[0] if balances else "flops")


def _dominators(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes every path from a virtual source to a virtual sink passes through, in program order, on the
    graph of the values gradients flow through ([Note: cut candidates])."""
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    keep = _differentiable(gm)
    g = to_networkx(graph)
    # parameter reads are copied into every stage that reads them: they are no path around a cut
    g.remove_nodes_from([n.name for n in graph.nodes if n.op == "get_attr" or (n not in keep and n.op != "output")])
    source, sink = object(), object()  # never a node name
    starts = [n for n in g if g.in_degree(n) == 0]
    ends = [n for n in g if g.out_degree(n) == 0]
    g.add_edges_from((source, n) for n in starts)
    g.add_edges_from((n, sink) for n in ends)
    if sink not in g:
        return []
    idom = nx.immediate_dominators(g, source)
    chain, v = [], idom.get(sink, source)
    while v is not source:
        chain.append(by_name[v])
        v = idom[v]
    return chain[::-1]


def _differentiable(gm: fx.GraphModule) -> set[fx.Node]:
    """The tensors (and tuples of them) a gradient flows through: floating-point values computed from a
    parameter or a floating-point input. The others (a causal mask, position ids, integer labels, tables built
    from buffers) need no gradient; they may cross a cut as extra boundary tensors, which partition decides."""
    modules = dict(gm.named_modules())
    out: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if not (_is_tensor(n) or _holds_tensors(n)) or not _floating(n):
            continue
        if n.op == "placeholder":
            out.add(n)
        elif n.op == "get_attr":
            if isinstance(_attr(gm, n.target), nn.Parameter):
                out.add(n)
        elif any(a in out for a in n.all_input_nodes) or (
            n.op == "call_module" and any(True for _ in modules[n.target].parameters())
        ):
            out.add(n)
    return out


def _floating(n: fx.Node) -> bool:
    leaves = tree_leaves(n.meta.get("tensor_meta"), is_leaf=lambda m: hasattr(m, "shape"))
    return any(hasattr(m, "dtype") and (m.dtype.is_floating_point or m.dtype.is_complex) for m in leaves)


def _probe_spec(names: Sequence[str]) -> Spec:
    return load_spec({"cuts": [{"after": n} for n in names]})


def _copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of `gm`'s graph (same node names, shared meta and tensors): partition edits
    the graph it cuts (it computes sizes again behind cuts), and the probes must leave `gm` as it is."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def _partition_at(gm: fx.GraphModule, model: nn.Module, names: list[str]) -> tuple[Partition | None, list[str]]:
    """Partition a copy of `gm` after every node in `names`, leaving out any partition refuses (a value that
    is not a tensor and cannot be computed again behind it); None when it refuses them all."""
    if not names:
        return None, []
    try:
        return partition(_copy_module(gm), _probe_spec(names), model), names
    except PartitionError:
        pass
    good = []
    for name in names:
        try:
            partition(_copy_module(gm), _probe_spec([name]), model)
        except PartitionError:
            continue
        good.append(name)
    return (partition(_copy_module(gm), _probe_spec(good), model) if good else None), good


def _spec_names(nodes: list[fx.Node], pos: dict, model: nn.Module) -> dict[str, str]:
    """Node name -> the module path to write in a spec for a cut after it: among the modules whose last node it
    is, the deepest one that has submodules (`layers.3`, not `layers` or `layers.3.1`), else the outermost;
    only a path that partition resolves to this very node."""
    modules = dict(model.named_modules())
    by_name = {n.name: n for n in nodes}
    ends: dict[str, list[str]] = {}
    for path, at in last_node_of_modules(nodes, pos).items():
        if path and by_name.get(path, nodes[at]) is nodes[at]:
            ends.setdefault(nodes[at].name, []).append(path)
    out = {}
    for name, paths in ends.items():
        containers = [p for p in paths if p in modules and len(modules[p]._modules) > 0]
        if containers:
            out[name] = max(containers, key=lambda p: (p.count("."), len(p)))
        else:
            out[name] = min(paths, key=lambda p: (p.count("."), len(p)))
    return out


def _piece_params(gm: fx.GraphModule, pieces: Sequence[Sequence[str]]) -> list[int]:
    """Parameters each piece (a list of node names) uses, each tensor counted once, in the first that uses it."""
    by_name = {n.name: n for n in gm.graph.nodes}
    modules = dict(gm.named_modules())
    seen: set[int] = set()
    out = []
    for names in pieces:
        count = 0
        for name in names:
            node = by_name[name]
            if node.op == "call_module":
                tensors = list(modules[node.target].parameters())
            elif node.op == "get_attr":
                t = _attr(gm, node.target)
                tensors = [t] if isinstance(t, nn.Parameter) else []
            else:
                continue
            for t in tensors:
                if id(t) not in seen:
                    seen.add(id(t))
                    count += t.numel()
        out.append(count)
    return out


def _stage_times(part: Partition, model: nn.Module, example_inputs: tuple, repeats: int = 3) -> list[float]:
    """Seconds of one forward and backward of each stage of `part` on the example inputs (the fastest of
    `repeats` runs after a warm-up: other work on the machine only ever adds time). Buffers (batch-norm statistics), gradients and the random number
    generators are left as they were."""
    stages = emit_stages(part)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    times = []
    try:
        with torch.random.fork_rng(devices=[]):
            values = tuple(example_inputs)
            for s, stage in enumerate(stages):
                runs, out = [], None
                for r in range(repeats + 1):
                    ins = tuple(
                        v.detach().requires_grad_(s > 0) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                        for v in values
                    )
                    start = time.perf_counter()
                    out = stage(*ins)
                    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
                    if leaves:
                        torch.autograd.backward(leaves, [torch.ones_like(t) for t in leaves])
                    if r:
                        runs.append(time.perf_counter() - start)
                times.append(min(runs))
                values = (
                    tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in out) if s < len(stages) - 1 else ()
                )
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, g in grads:
            p.grad = g
    return times


# ----------------------------------------------------------------------------- FLOPs from shapes

# reading a tensor differently costs nothing
_VIEWS = frozenset(
    """getitem view _unsafe_view reshape flatten unflatten squeeze unsqueeze permute transpose t expand expand_as
    view_as reshape_as split split_with_sizes chunk unbind narrow select slice alias detach size dim numel
    contiguous to type_as""".split()
)
_MATMULS = frozenset("linear matmul mm bmm __matmul__".split())
_ADD_MATMULS = frozenset("addmm baddbmm addbmm".split())  # (bias, a, b)
_CONVS = frozenset("conv1d conv2d conv3d convolution _convolution".split())
_ATTENTION = frozenset(
    "scaled_dot_product_attention _scaled_dot_product_flash_attention _scaled_dot_product_efficient_attention "
    "_scaled_dot_product_flash_attention_for_cpu".split()
)


def node_flops(node: fx.Node, gm: nn.Module) -> int:
    """Forward floating-point operations of one node, from the shapes recorded at tracing: 2 per multiply-add
    of a linear map, matrix product, convolution or attention; one per output element for anything else;
    none for views and sizes."""
    if node.op not in COMPUTE_OPS:
        return 0
    out = _out_numel(node)
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, (nn.Linear, nn.Bilinear)):
            return 2 * out * _shape(node.args[0])[-1] if _shape(node.args[0]) else out
        if isinstance(mod, nn.modules.conv._ConvNd):
            kernel = int(np.prod(mod.kernel_size)) * mod.in_channels // mod.groups
            if isinstance(mod, nn.modules.conv._ConvTransposeNd):  # every input element meets the whole kernel
                return 2 * _numel(_shape(node.args[0])) * kernel * mod.out_channels // mod.in_channels
            return 2 * out * kernel
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            return out
        params = sum(p.numel() for p in mod.parameters())
        if params and not isinstance(mod, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
            shape = _shape(node)  # a module of its own: each output row meets each parameter once
            rows = out // shape[-1] if shape and shape[-1] else 1
            return 2 * params * rows + out
        return max([out, *(_numel(_shape(a)) for a in node.all_input_nodes if _shape(a) is not None)])
    name = _op_name(node)
    if name in _VIEWS:
        return 0
    args = node.args
    if name in _MATMULS and args and _shape(args[0]):
        return 2 * out * _shape(args[0])[-1]
    if name in _ADD_MATMULS and len(args) > 1 and _shape(args[1]):
        return 2 * out * _shape(args[1])[-1] + out
    if name in _CONVS and len(args) > 1 and _shape(args[1]):
        w = _shape(args[1])  # (C_out, C_in / groups, *kernel)
        return 2 * out * _numel(w[1:])
    if name in _ATTENTION and len(args) > 2 and _shape(args[0]) and _shape(args[1]) and _shape(args[2]):
        q, k, v = _shape(args[0]), _shape(args[1]), _shape(args[2])  # (..., L, E), (..., S, E), (..., S, Ev)
        batch = _numel(q[:-2])
        return 2 * batch * q[-2] * k[-2] * (q[-1] + v[-1])
    return out


def _op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return t._overloadpacket.__name__
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t.__name__
    return getattr(t, "__name__", str(t))


def _shape(value) -> tuple[int, ...] | None:
    if not isinstance(value, fx.Node):
        return None
    meta = value.meta.get("tensor_meta")
    return tuple(int(d) for d in meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _out_numel(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return 0
    return sum(_numel(m.shape) for m in tree_leaves(meta, is_leaf=lambda m: hasattr(m, "shape")) if hasattr(m, "shape"))


def _numel(shape) -> int:
    n = 1
    for d in shape or ():
        n *= int(d)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------- the balance


def stage_costs(costs: Sequence[float], chosen: Sequence[int]) -> list[float]:
    """The cost of each stage when the chain of pieces `costs` is cut after the candidates `chosen` (the
    candidate i sits after piece i)."""
    bounds = [0, *(i + 1 for i in chosen), len(costs)]
    return [float(sum(costs[a:b])) for a, b in zip(bounds, bounds[1:])]


def balance_chain(costs: Sequence[float], parts: int, weights: Sequence[float] | None = None) -> tuple[int, ...]:
    """[Note: balanced cuts] The candidates to cut after (indices 0 .. len(costs) - 2, increasing) that split
    the chain of piece costs `costs` into `parts` runs with the smallest largest run; among those, the one with
    the least sum of `weights` (one per candidate: the bytes crossing it), then the most even. O(parts *
    len(costs)) numpy steps."""
    n = len(costs)  # pieces; candidate i sits between piece i and piece i + 1
    if not 1 <= parts <= n:
        raise ValueError(f"{parts} parts of {n} pieces")
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=np.float64))])
    w = np.zeros(n) if weights is None else np.asarray([*weights, 0.0], dtype=np.float64)
    inf = np.inf
    # largest[k, j]: the least largest run when the first j pieces make k runs
    largest = np.full((parts + 1, n + 1), inf)
    largest[0, 0] = 0.0
    for k in range(1, parts + 1):
        for j in range(k, n - (parts - k) + 1):
            runs = np.maximum(largest[k - 1, :j], prefix[j] - prefix[:j])
            largest[k, j] = runs.min()
    best = largest[parts, n]
    limit = best + 1e-9 * max(abs(prefix[-1]), 1.0)  # the same optimum, whatever the order of float additions
    # among the splits whose every run stays within `limit`: the least bytes over their cuts, then the least sum
    # of squared run costs (the other stages as even as they can be); both add up along the chain, so the
    # lexicographic minimum of each prefix is part of the lexicographic minimum of the whole
    carried = np.full((parts + 1, n + 1), inf)
    squares = np.full((parts + 1, n + 1), inf)
    came = np.zeros((parts + 1, n + 1), dtype=np.int64)
    carried[0, 0] = squares[0, 0] = 0.0
    for k in range(1, parts + 1):
        for j in range(k, n - (parts - k) + 1):
            run = prefix[j] - prefix[:j]
            ok = (run <= limit) & np.isfinite(carried[k - 1, :j])
            if not ok.any():
                continue
            options = np.flatnonzero(ok)
            sq = squares[k - 1, options] + run[options] ** 2
            i = int(options[np.lexsort((sq, carried[k - 1, options]))[0]])
            carried[k, j] = carried[k - 1, i] + (w[j - 1] if j < n else 0.0)
            squares[k, j] = squares[k - 1, i] + run[i] ** 2
            came[k, j] = i
    cuts, j = [], n
    for k in range(parts, 0, -1):
        j = int(came[k, j])
        if k > 1:
            cuts.append(j - 1)
    return tuple(reversed(cuts))


# ----------------------------------------------------------------------------- printing


def format_cost(value: float, balance: str) -> str:
    """A cost for people: `1.23 GFLOP`, `4.20 M parameters`, `3.10 ms`."""
    if balance == "time":
        return f"{value * 1e3:.2f} ms"
    unit = "FLOP" if balance == "flops" else " parameters"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit.strip()}"


def format_bytes(n: int) -> str:
    for scale, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class _IndentedDumper(yaml.SafeDumper):
    """YAML with list items indented under their key, as the specs in specs/ are written."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):
        return super().increase_indent(flow, False)
