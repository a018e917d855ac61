"""Partition: resolve cut points in the traced graph and give every node a stage.

A cut after node n splits the graph in program order: everything computed up to and including n is
before it, everything after is behind it. The boundary tensors of a cut are all values defined before
it and used behind it, so a residual stream that skips over several cuts is a boundary tensor of each;
except sizes and tensors made from no input and no parameter (a rotary table, a causal mask made from
sizes), which the stage behind the cut computes again.
What each stage receives and sends, and so the graph of stages, follows the real data dependencies
([Note: stage DAG]): a chain where each stage reads the one before (values that skip a stage relayed
through it), a DAG where branches are independent (values sent straight from producer to readers).

Everything here is linear in the size of the graph (plus a log factor in the number of cuts).
"""

from __future__ import annotations

import bisect
import dataclasses
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import networkx as nx
import sympy
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils._sympy.functions import FloorDiv, Mod, PythonMod

from ..errors import PartitionError, did_you_mean
from ..spec import Spec
from .trace import gc_paused, symbolic_values

COMPUTE_OPS = ("call_module", "call_function", "call_method")
aten = torch.ops.aten


@dataclass(frozen=True)
class BoundaryTensor:
    """A value that crosses a cut: the fx node that computes it, its shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    producer: int  # stage that computes it; -1 for a program input


@dataclass(frozen=True)
class CutPoint:
    """A resolved cut: where it is in the graph and which tensors cross it."""

    index: int  # order in the program: cut i sits between stage i and stage i+1
    spec_index: int  # position in the spec's `cuts:` list
    name: str
    node: str  # the fx node the cut comes after
    boundary: tuple[BoundaryTensor, ...]  # every value live across the cut point, in program order
    sent: tuple[BoundaryTensor, ...] = ()  # what stage `index` sends on ([Note: stage DAG]); a chain: `boundary`


@dataclass(frozen=True)
class TiedTensor:
    """A parameter or buffer used by more than one stage (e.g. an embedding tied to the output head).

    Every stage reads the same tensor. Its `owner`, the last stage that uses it, is the one whose optimizer
    updates it: the gradients the other stages compute for it land in the same `.grad` first, so the owner's
    update uses their sum, as backprop does.
    """

    names: tuple[str, ...]  # every name the tensor has in the model, e.g. ('lm_head.weight', 'wte.weight')
    stages: tuple[int, ...]  # the stages that use it, in order
    owner: int  # the stage that updates it
    parameter: bool  # a parameter (trained) or a buffer
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Partition:
    """Where every node of the traced graph goes."""

    graph_module: fx.GraphModule
    stage_of: Mapping[str, int]  # node name -> stage; get_attr nodes -> every stage using them is in `shared`
    stage_nodes: tuple[tuple[str, ...], ...]  # node names of each stage, in program order
    shared_attrs: Mapping[str, tuple[int, ...]]  # get_attr node -> stages that read it (copied into each)
    cuts: tuple[CutPoint, ...]
    stage_graph: nx.DiGraph  # edge u -> v: the tensors v receives from u (`tensors`), the cut after u (`cut`)
    input_names: tuple[str, ...]
    tied: tuple[TiedTensor, ...] = ()  # tensors used by more than one stage
    # stage -> (tensor, stage it comes from; -1: a program input) for each value it receives, in program order;
    # stage 0 takes the program inputs themselves ([Note: stage DAG])
    stage_inputs: tuple[tuple[tuple[BoundaryTensor, int], ...], ...] = ()

    @property
    def chain(self) -> bool:
        """Whether the stages form a chain: stage i receives only from stage i - 1, and every stage from it."""
        path = {(k, k + 1) for k in range(self.num_stages - 1)}
        return set(self.stage_graph.edges) == path

    @cached_property
    def nx_graph(self) -> nx.DiGraph:
        """The fx graph as a networkx DiGraph: node names, edges from producer to user (built on first use)."""
        return to_networkx(self.graph_module.graph)

    @property
    def num_stages(self) -> int:
        return len(self.stage_nodes)


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The fx graph as a DiGraph over node names, edges from each node to its users."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name, op=node.op)
        for user in node.users:
            g.add_edge(node.name, user.name)
    return g


def partition(gm: fx.GraphModule, spec: Spec, model: nn.Module) -> Partition:
    """Resolve `spec.cuts` in `gm` and split its nodes into stages."""
    with gc_paused():
        return _partition(gm, spec, model)


def _partition(gm: fx.GraphModule, spec: Spec, model: nn.Module) -> Partition:
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last_in_module = last_node_of_modules(nodes, pos)
    modules = dict(model.named_modules())

    # 1. resolve every cut to a node position
    resolved: list[tuple[int, int]] = []  # (position, spec index)
    by_name = {n.name: n for n in nodes}
    for i, cut in enumerate(spec.cuts):
        resolved.append((_resolve(cut.after, i, spec, by_name, last_in_module, modules, pos), i))
    resolved.sort()
    for (p0, i0), (p1, i1) in zip(resolved, resolved[1:]):
        if p0 == p1:
            a, b = spec.cuts[i0], spec.cuts[i1]
            raise PartitionError(
                f"{spec.where('cuts', i1, 'after')}: cut `{b.after}` is at the same point as cut `{a.after}` "
                f"({spec.where('cuts', i0, 'after')}): both come after node `{nodes[p0].name}`. Remove one of them."
            )
    cut_pos = [p for p, _ in resolved]

    # 2. stage of every node: how many cuts come before it in program order
    stage_of, shared, stage_nodes = _assign(nodes, pos, cut_pos)
    num_stages = len(cut_pos) + 1

    # 3. every stage must compute something, or its cut does not separate the graph
    for s in range(num_stages):
        if not any(by_name[n].op in COMPUTE_OPS for n in stage_nodes[s]):
            _raise_empty_stage(s, resolved, spec, nodes)

    # tensors made from no input and no parameter (rotary tables, masks built from sizes) are computed again
    # in the stage that reads them, and sizes and other non-tensor values a later stage reads too: only values
    # that depend on the batch's data cross
    cut_nodes = [nodes[p] for p in cut_pos]
    copied = _recompute_input_free_tensors(gm, cut_nodes)
    if _recompute_non_tensors(gm, cut_nodes, [i for _, i in resolved], spec) or copied:
        nodes = list(gm.graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        resolved = [(pos[n], i) for n, (_, i) in zip(cut_nodes, resolved)]
        cut_pos = [p for p, _ in resolved]
        stage_of, shared, stage_nodes = _assign(nodes, pos, cut_pos)

    # 4. boundary tensors: values defined at or before a cut and used after it
    crossing: list[list[fx.Node]] = [[] for _ in cut_pos]
    for node in nodes:
        if node.op in ("get_attr", "output") or not node.users:
            continue
        last_use = max(pos[u] for u in node.users)
        first = bisect.bisect_left(cut_pos, pos[node])  # first cut at or after the definition
        last = bisect.bisect_left(cut_pos, last_use)  # cuts strictly before the last use
        for c in range(first, last):
            crossing[c].append(node)
    cuts = []
    for c, (p, spec_index) in enumerate(resolved):
        boundary = tuple(_boundary_tensor(v, c, spec, spec_index, stage_of, nodes) for v in crossing[c])
        cuts.append(
            CutPoint(
                index=c, spec_index=spec_index, name=spec.cuts[spec_index].label, node=nodes[p].name, boundary=boundary
            )
        )

    # 5. parameters and buffers used by more than one stage: tied, owned (updated) by the last of them
    tied = _tied_tensors(nodes, stage_of, shared, gm, model)

    # 6. what each stage receives and sends: the stage graph ([Note: stage DAG])
    tensors = {b.name: b for cut in cuts for b in cut.boundary}
    stage_inputs, sent = _routes(nodes, stage_of, tensors, num_stages)
    cuts = [dataclasses.replace(cut, sent=tuple(sent[cut.index])) for cut in cuts]
    stage_graph = nx.DiGraph()
    stage_graph.add_nodes_from(range(num_stages))
    for s, received in enumerate(stage_inputs):
        for b, src in received:
            if src >= 0:
                if not stage_graph.has_edge(src, s):
                    stage_graph.add_edge(src, s, tensors=(), cut=cuts[src].name)
                stage_graph.edges[src, s]["tensors"] += (b,)
    return Partition(
        graph_module=gm,
        stage_of=stage_of,
        stage_nodes=tuple(tuple(s) for s in stage_nodes),
        shared_attrs=shared,
        cuts=tuple(cuts),
        stage_graph=stage_graph,
        input_names=tuple(n.name for n in nodes if n.op == "placeholder"),
        tied=tied,
        stage_inputs=tuple(tuple(r) for r in stage_inputs),
    )


# [Note: stage DAG] Cuts stay points in program order (a spec names them the same way), but which stage reads
# which value is the graph's: stage j reads stage i when a value computed in i is used in j (the program inputs
# are no stage's: every stage that reads one has it). A value whose producer and readers are joined by a run of
# stages each reading the one before (p -> p+1 -> ... -> last reader) is relayed along that run, as in a chain:
# every stage on it receives the value and sends it on, and each cut on it sees it. Otherwise (a stage on the
# way does not depend on the one before: independent branches, two towers) it goes straight from its producer to
# each stage that reads it, and a program input straight from the data. So the stage graph (edge i -> j: what j
# receives from i) is the chain stage 0 -> 1 -> ... exactly when each stage reads the one before, and otherwise a
# DAG whose parallel branches the distributed runtime runs at the same time. The cut after stage i owns what
# stage i sends (`CutPoint.sent`: the gradients of those tensors are the cut's kind's business, whichever stages
# read them); its `boundary` stays every value live across its point. Cut kinds on a graph that is not a chain:
# exact, synthetic and local; delayed cuts need a chain (program.py refuses them).
def _routes(nodes: list[fx.Node], stage_of, tensors: dict, num_stages: int):
    """Each stage's (tensor, source stage) inputs and each stage's sent tensors, in program order."""
    readers: list[tuple[fx.Node, int, list[int]]] = []
    reads: set[tuple[int, int]] = set()
    for node in nodes:
        if node.op in ("get_attr", "output") or not node.users or node.name not in tensors:
            continue
        producer = -1 if node.op == "placeholder" else stage_of[node.name]
        own = max(producer, 0)  # the program inputs are stage 0's placeholders
        users = sorted({stage_of[u.name] for u in node.users} - {own})
        if users:
            readers.append((node, producer, users))
            if producer >= 0:
                reads.update((producer, u) for u in users)
    inputs: list[list[tuple[BoundaryTensor, int]]] = [[] for _ in range(num_stages)]
    sent: list[list[BoundaryTensor]] = [[] for _ in range(num_stages)]
    for node, producer, users in readers:
        b = tensors[node.name]
        own, last = max(producer, 0), users[-1]
        if all((k, k + 1) in reads for k in range(own, last)):  # relayed along the run own -> ... -> last
            for k in range(own, last):
                sent[k].append(b)
                inputs[k + 1].append((b, k))
        else:  # straight from its producer (or the data) to each stage that reads it
            if producer >= 0:
                sent[producer].append(b)
            for u in users:
                inputs[u].append((b, producer))
    return inputs, sent


def _assign(nodes: list[fx.Node], pos: dict, cut_pos: list[int]):
    """Stage of every node (how many cuts come before it), the stages reading each get_attr, each stage's nodes."""
    stage_of: dict[str, int] = {}
    shared: dict[str, tuple[int, ...]] = {}
    output_node = nodes[-1]
    for node in nodes:
        if node.op == "get_attr":
            continue
        stage_of[node.name] = bisect.bisect_left(cut_pos, pos[node]) if node is not output_node else len(cut_pos)
    for node in nodes:
        if node.op == "get_attr":
            users = sorted({stage_of[u.name] for u in node.users if u.op != "get_attr"})
            shared[node.name] = tuple(users) or (bisect.bisect_left(cut_pos, pos[node]),)
            stage_of[node.name] = shared[node.name][0]
    stage_nodes: list[list[str]] = [[] for _ in range(len(cut_pos) + 1)]
    for node in nodes:
        if node.op == "get_attr":
            for s in shared[node.name]:
                stage_nodes[s].append(node.name)
        else:
            stage_nodes[stage_of[node.name]].append(node.name)
    return stage_of, shared, stage_nodes


def _module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    if node.op == "call_module" and node.target not in paths:
        paths.append(node.target)
    return paths


def last_node_of_modules(nodes: list[fx.Node], pos: dict) -> dict[str, int]:
    """Module path -> position of the last node computed inside it (leaf or not)."""
    last: dict[str, int] = {}
    for node in nodes:
        if node.op not in COMPUTE_OPS:
            continue
        for path in _module_paths(node):
            last[path] = pos[node]
    return last


def _resolve(after, i, spec, by_name, last_in_module, modules, pos) -> int:
    where = spec.where("cuts", i, "after")
    node = by_name.get(after)
    if node is None and after in last_in_module:
        return last_in_module[after]
    if node is None:
        if after in modules:
            raise PartitionError(
                f"{where}: module `{after}` computes nothing in the traced graph (is it used in forward()?), "
                "so there is no point to cut after. Name a module that forward() calls."
            )
        candidates = [m for m in modules if m] + [n for n, v in by_name.items() if v.op in COMPUTE_OPS]
        raise PartitionError(
            f"{where}: cut after `{after}`: no module path or fx node of that name{did_you_mean(after, candidates)}. "
            "Run `dnicompile MODEL.py --spec SPEC --nodes` to list the names you can cut after."
        )
    if node.op not in COMPUTE_OPS:
        kinds = {"placeholder": "a program input", "output": "the program output", "get_attr": "a parameter read"}
        raise PartitionError(
            f"{where}: cut after `{after}`: that node is {kinds[node.op]}, not a computation; "
            "cut after a module or an operation instead."
        )
    return pos[node]


def _raise_empty_stage(s, resolved, spec, nodes) -> None:
    if s == len(resolved):
        p, i = resolved[-1]
        raise PartitionError(
            f"{spec.where('cuts', i, 'after')}: cut after `{spec.cuts[i].after}` does not separate the graph: "
            f"nothing is computed after node `{nodes[p].name}`, so the last stage would be empty. "
            "Move the cut earlier or remove it."
        )
    p, i = resolved[s]
    if s == 0:
        raise PartitionError(
            f"{spec.where('cuts', i, 'after')}: cut after `{spec.cuts[i].after}` does not separate the graph: "
            "nothing is computed before it, so the first stage would be empty. Move the cut later or remove it."
        )
    _, prev = resolved[s - 1]
    raise PartitionError(
        f"{spec.where('cuts', i, 'after')}: cut after `{spec.cuts[i].after}` does not separate the graph from the cut "
        f"after `{spec.cuts[prev].after}`: nothing is computed between them (stage {s} would be empty). "
        "Remove one of the two cuts."
    )


def _boundary_tensor(v: fx.Node, c: int, spec: Spec, spec_index: int, stage_of, nodes) -> BoundaryTensor:
    meta = v.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        kind = getattr(v.meta.get("type"), "__name__", "non-tensor")
        user = next((u for u in v.users if stage_of.get(u.name, -1) > c), None)
        stack = _module_paths(v)
        inside = f" in module `{stack[-1]}`" if stack else ""
        made = v.meta.get("user_site") or v.format_node()
        used = f" ({user.meta['user_site']})" if user is not None and user.meta.get("user_site") else ""
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise PartitionError(
            f"{spec.where('cuts', spec_index, 'after')}: {article} {kind} value crosses the cut after "
            f"`{spec.cuts[spec_index].after}`: node `{v.name}` ({made}){inside} is used by "
            f"`{user.name if user else '?'}`{used} behind the cut. Only tensors can cross a cut: move the cut so that "
            f"`{v.name}` and its users are on the same side"
            + (", or cut after the element you need (`getitem` node) instead of the tuple." if kind == "tuple" else ".")
        )
    producer = -1 if v.op == "placeholder" else stage_of[v.name]
    return BoundaryTensor(name=v.name, shape=tuple(meta.shape), dtype=meta.dtype, producer=producer)


# ----------------------------------------------------------------------------- non-tensor values behind a cut

_SIZE_METHODS = ("size", "dim", "numel")
_SIZE_FUNCTIONS = (
    getattr,
    operator.getitem,
    operator.add,
    operator.sub,
    operator.mul,
    operator.floordiv,
    operator.mod,
    operator.neg,
    torch.Size,
    aten.sym_size.int,
    aten.sym_numel.default,
)


class _NotRecomputable(Exception):
    """Why a non-tensor value cannot be computed again behind a cut."""


def _is_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape")


def _holds_tensors(node: fx.Node) -> bool:
    """A tuple, list or dict of tensors (a module that returns several)."""
    meta = node.meta.get("tensor_meta")
    return meta is not None and not hasattr(meta, "shape")


def _positions(graph: fx.Graph, cut_nodes: list[fx.Node]):
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    cut_pos = [pos[n] for n in cut_nodes]

    def stage(n: fx.Node) -> int:
        return len(cut_pos) if n.op == "output" else bisect.bisect_left(cut_pos, pos[n])

    return nodes, pos, cut_pos, stage


def _crossing(nodes: list[fx.Node], stage) -> list[fx.Node]:
    """Values that are not tensors and that a later stage reads."""
    out = []
    for v in nodes:
        if v.op in ("get_attr", "output") or _is_tensor(v) or not v.users:
            continue
        s = stage(v)
        if any(stage(u) > s for u in v.users):
            out.append(v)
    return out


def _recompute_non_tensors(gm: fx.GraphModule, cut_nodes: list[fx.Node], spec_indices: list[int], spec: Spec) -> bool:
    """Let no value but tensors cross a cut; True if the graph changed (`cut_nodes` may change too).

    - an element of a tuple of tensors (a module that returns several) that a later stage reads is taken out
      of the tuple before the cut, and crosses as a tensor;
    - a size (`x.size(0)`, `x.shape[:-1]`, `B * T`, a SymInt of an exported graph) is read again, in the stage
      that uses it, from a tensor that stage receives or computes before the use, and that has that size in
      its shape (the sizes are matched symbolically, each input dimension its own symbol, so the batch
      dimension stays dynamic); sizes the model fixes, and other constants (None, bools, dtypes), are written in
      as they are; a device is read from a tensor the stage has.
    Nothing else crosses, no tensor is added to a boundary. A value that cannot be rebuilt raises PartitionError
    with the reason (its value depends on the data in a tensor, or no tensor the stage has carries that size).
    """
    graph = gm.graph
    changed = False
    while True:  # elements of tuples, first (an element that is not a tensor is then rebuilt below)
        nodes, pos, cut_pos, stage = _positions(graph, cut_nodes)
        crossing = _crossing(nodes, stage)
        if not crossing:
            if changed:
                gm.recompile()
            return changed
        hoisted = False
        for v in crossing:
            if not _holds_tensors(v):
                continue
            anchor = v
            for u in list(v.users):
                if (
                    stage(u) > stage(v)
                    and u.op == "call_function"
                    and u.target is operator.getitem
                    and u.args[0] is v
                    and not isinstance(u.args[1], fx.Node)
                    and u not in cut_nodes
                ):
                    anchor.append(u)
                    anchor = u
            if anchor is not v:
                hoisted = changed = True
                if v in cut_nodes:  # the cut after a module that returns a tuple comes after its elements
                    cut_nodes[cut_nodes.index(v)] = anchor
        if not hoisted:
            break

    sym = symbolic_values(gm)
    export_style = any(n.op == "placeholder" and "val" in n.meta for n in nodes)
    live = _live_tensors(nodes, pos, cut_pos)
    cache: dict = {}
    replaced: list[fx.Node] = []
    for v in crossing:
        by_stage: dict[int, list[fx.Node]] = {}
        for u in v.users:
            if stage(u) > stage(v):
                by_stage.setdefault(stage(u), []).append(u)
        for s, users in sorted(by_stage.items()):
            first = min(users, key=pos.__getitem__)
            local = [t for t in nodes[cut_pos[s - 1] + 1 : pos[first]] if _is_tensor(t)]
            emitter = _Emitter(graph, first, pos[first], s, live[s - 1] + local, sym, export_style, cache, v)
            try:
                if v not in sym.values:
                    raise _NotRecomputable(sym.failed.get(v) or "it has no symbolic value")
                new = emitter.value(sym.values[v])
            except _NotRecomputable as e:
                c = stage(v)
                raise PartitionError(_crossing_message(v, users[0], spec, spec_indices[c], str(e))) from None
            for u in users:
                u.args = fx.node.map_arg(u.args, lambda n, v=v, new=new: new if n is v else n)
                u.kwargs = fx.node.map_arg(u.kwargs, lambda n, v=v, new=new: new if n is v else n)
        replaced.append(v)
    _erase_dead_sizes(graph, replaced, set(cut_nodes))
    gm.recompile()
    return True


# ----------------------------------------------------------------------------- tensors made from no input

# ops that draw random numbers or leave memory unset: computing them again would not give the same tensor
_NOT_AGAIN = ("dropout", "rand", "bernoulli", "normal", "multinomial", "poisson", "empty", "uniform", "exponential")
# views: a write into one writes into the tensor it views
_VIEW_NAMES = (
    "getitem", "view", "reshape", "slice", "select", "narrow", "transpose", "permute", "expand", "unsqueeze",
    "squeeze", "t", "flatten", "unflatten", "as_strided", "diagonal", "unbind", "split", "chunk", "alias",
    "detach", "__getitem__", "contiguous",
)  # fmt: skip


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[-1]
    return getattr(t, "__name__", str(t))


def _writes(node: fx.Node) -> list[fx.Node]:
    """The nodes whose tensors `node` writes in place (empty for an op that writes nothing)."""
    t = node.target
    if node.op == "call_method":
        return [node.args[0]] if t.endswith("_") and node.args and isinstance(node.args[0], fx.Node) else []
    if node.op != "call_function":
        return []
    if isinstance(t, torch._ops.OpOverload):
        written = []
        for i, arg in enumerate(t._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                written += [
                    v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, fx.Node)
                ]
        return written
    from .export import when_training

    if t is when_training:  # when_training(op, training, tensor, ...): an in-place op on tensor (a counter)
        return [a for a in node.args[2:3] if isinstance(a, fx.Node)]
    name = getattr(t, "__name__", "")
    return [node.args[0]] if name.endswith("_") and node.args and isinstance(node.args[0], fx.Node) else []


class _InputFree:
    """Which tensors of a graph depend on no program input and no parameter, and can be computed again behind a
    cut: made by pure operations (nothing random, nothing in place) from constants, sizes, and buffers the graph
    never writes."""

    def __init__(self, gm: fx.GraphModule, nodes: list[fx.Node], written: set[int] | None = None):
        self.gm = gm
        self.written = written or set()  # ids of buffers the graph writes (None: take none as written)
        # one pass in program order (every input before its users); a size or a device read from a tensor is
        # computed again from the stage's own tensors, so it is no dependence on that tensor
        self.free: set[fx.Node] = set()
        for node in nodes:
            if node.op == "get_attr":
                attr = _get_attr(gm, node.target)
                if not isinstance(attr, nn.Parameter) and id(attr) not in self.written:
                    self.free.add(node)
            elif node.op in ("call_function", "call_method") and all(map(self._free_input, node.all_input_nodes)):
                if self.pure(node):
                    self.free.add(node)

    @classmethod
    def written_buffers(cls, gm: fx.GraphModule, nodes: list[fx.Node]) -> set[int]:
        """The ids of the buffers the graph writes in place (batch-norm statistics, counters), or a module it calls
        may write (its own)."""
        written: set[int] = set()
        for node in nodes:
            if node.op == "call_module":
                written.update(id(t) for t in _tensors_of(gm.get_submodule(node.target)))
            for target in _writes(node):
                for attr in cls._viewed_attrs(target):
                    written.add(id(_get_attr(gm, attr.target)))
        return written

    def _free_input(self, a: fx.Node) -> bool:
        if a.op == "get_attr" or _is_tensor(a):
            return a in self.free
        return a.op != "placeholder" and not _holds_tensors(a) and self.pure(a)  # a size, a device, a flag

    @staticmethod
    def _viewed_attrs(node: fx.Node) -> list[fx.Node]:
        """The get_attr nodes `node` is a view of (or is)."""
        out, work = [], [node]
        while work:
            n = work.pop()
            if n.op == "get_attr":
                out.append(n)
            elif n.op in ("call_function", "call_method") and _target_name(n) in _VIEW_NAMES and n.args:
                work += [a for a in n.args[:1] if isinstance(a, fx.Node)]
        return out

    def pure(self, node: fx.Node) -> bool:
        if node.op not in ("call_function", "call_method") or node.is_impure() or _writes(node):
            return False
        t = node.target
        if isinstance(t, torch._ops.OpOverload) and (
            t._schema.is_mutable or torch.Tag.nondeterministic_seeded in t.tags
        ):
            return False
        from .export import when_training

        name = _target_name(node).lower()
        return t is not when_training and not any(word in name for word in _NOT_AGAIN)

    def parts(self, v: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
        """The computations to copy to compute `v` again (v among them), and the non-tensor values (sizes,
        devices) they read, which partition then computes again from the stage's own tensors."""
        compute, sizes, seen, work = [], [], set(), [v]
        while work:
            n = work.pop()
            if n in seen or n.op == "get_attr":
                continue
            seen.add(n)
            if _is_tensor(n):
                compute.append(n)
                work += n.all_input_nodes
            else:
                sizes.append(n)
        return compute, sizes


def _recompute_input_free_tensors(gm: fx.GraphModule, cut_nodes: list[fx.Node]) -> bool:
    """A tensor computed from no program input and no parameter (a rotary position table from a buffer, a causal
    mask made from sizes, a constant bias) that a later stage reads is computed again in that stage, instead of
    crossing the cut: it carries no gradient and, often, no batch dimension, and a synthesizer or a message between
    ranks is no place for it. The computations are copied in front of the stage's first use; the sizes they read
    are then computed again from the stage's own tensors like any other size (so a tensor is only copied where
    the tensors that still cross carry those sizes). True if the graph changed."""
    graph = gm.graph
    nodes, pos, cut_pos, stage = _positions(graph, cut_nodes)

    def crosses(v: fx.Node) -> bool:
        return v.op != "get_attr" and _is_tensor(v) and any(stage(u) > stage(v) for u in v.users)

    # first as if the graph wrote no buffer (cheap, and enough to find that no such tensor crosses, the usual case)
    if not any(map(crosses, _InputFree(gm, nodes).free)):
        return False
    judge = _InputFree(gm, nodes, _InputFree.written_buffers(gm, nodes))
    candidates = [v for v in nodes if v in judge.free and crosses(v)]
    if not candidates:
        return False
    sym = symbolic_values(gm)
    chosen = set(candidates)
    staying = [t for t in nodes if t.op != "output" and t not in chosen and crosses(t)]
    plan: dict[int, list[fx.Node]] = {}  # stage -> the tensors it computes again
    for v in candidates:
        compute, sizes = judge.parts(v)
        for s in sorted({stage(u) for u in v.users if stage(u) > stage(v)}):
            # the sizes must be found again in the tensors that still reach stage s
            reaching = [t for t in staying if stage(t) < s <= max(stage(u) for u in t.users)]
            dims = set()
            for t in reaching:
                val = sym.values.get(t)
                if isinstance(val, torch.Tensor):
                    dims.update(_simplify(d) for d in val.shape if isinstance(d, torch.SymInt))
            if all(n in sym.values and _rebuildable(sym.values[n], dims, bool(reaching)) for n in sizes):
                plan.setdefault(s, []).append(v)
    if not plan:
        return False
    copied: set[fx.Node] = set()
    for s, values in sorted(plan.items()):
        users = [u for v in values for u in v.users if stage(u) == s]
        first = min(users, key=pos.__getitem__)
        compute = sorted({n for v in values for n in judge.parts(v)[0]}, key=pos.__getitem__)
        copied.update(compute)
        copies: dict[fx.Node, fx.Node] = {}
        for n in compute:
            with graph.inserting_before(first):
                copy = graph.node_copy(n, lambda a, copies=copies: copies.get(a, a))
            copy.meta = dict(n.meta)
            copy.meta["nn_module_stack"] = dict(first.meta.get("nn_module_stack") or {})
            copies[n] = copy
        for v in values:
            new = copies[v]
            for u in [u for u in v.users if stage(u) == s]:
                u.args = fx.node.map_arg(u.args, lambda n, v=v, new=new: new if n is v else n)
                u.kwargs = fx.node.map_arg(u.kwargs, lambda n, v=v, new=new: new if n is v else n)
    # the originals no stage reads any more
    for node in sorted(copied, key=pos.__getitem__, reverse=True):
        if not node.users and node not in cut_nodes:
            graph.erase_node(node)
    gm.recompile()
    return True


def _rebuildable(val: Any, dims: set, has_tensors: bool) -> bool:
    """Whether the Emitter below can build `val` from tensors whose dimensions are `dims` (sympy expressions)."""
    if isinstance(val, (torch.SymInt, torch.SymBool, torch.SymFloat)):
        if free_unbacked_symbols(val):
            return False
        expr = _simplify(val)
        return bool(expr.is_number) or (isinstance(val, torch.SymInt) and _buildable(expr, dims))
    if val is None or val is Ellipsis or isinstance(val, (bool, int, float, str, torch.dtype, torch.layout)):
        return True
    if isinstance(val, torch.memory_format):
        return True
    if isinstance(val, torch.device):
        return has_tensors
    if isinstance(val, (torch.Size, tuple, list)) and not hasattr(val, "_fields"):
        return all(_rebuildable(v, dims, has_tensors) for v in val)
    if isinstance(val, slice):
        return all(_rebuildable(v, dims, has_tensors) for v in (val.start, val.stop, val.step))
    return False


def _buildable(e, dims: set) -> bool:
    if e.is_Integer or e in dims:
        return True
    if isinstance(e, (sympy.Add, sympy.Mul, FloorDiv, Mod, PythonMod)):
        return all(_buildable(a, dims) for a in e.args)
    return False


def _live_tensors(nodes: list[fx.Node], pos: dict, cut_pos: list[int]) -> list[list[fx.Node]]:
    """The tensors that cross each cut, in program order."""
    live: list[list[fx.Node]] = [[] for _ in cut_pos]
    for node in nodes:
        if node.op in ("get_attr", "output") or not node.users or not _is_tensor(node):
            continue
        last_use = max(pos[u] for u in node.users)
        for c in range(bisect.bisect_left(cut_pos, pos[node]), bisect.bisect_left(cut_pos, last_use)):
            live[c].append(node)
    return live


def _erase_dead_sizes(graph: fx.Graph, candidates: list[fx.Node], keep: set[fx.Node]) -> None:
    """Erase the size computations no one reads any more."""
    work = list(candidates)
    while work:
        node = work.pop()
        if node.users or node in keep or node.graph is not graph or node.op == "placeholder":
            continue
        pure = (node.op == "call_method" and node.target in _SIZE_METHODS) or (
            node.op == "call_function" and node.target in _SIZE_FUNCTIONS
        )
        if not pure or _is_tensor(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        work.extend(inputs)


class _Emitter:
    """Builds a non-tensor value in stage `stage`, before node `before`, from the shapes of `tensors`."""

    def __init__(self, graph, before, before_pos, stage, tensors, sym, export_style, cache, value_node):
        self.graph, self.before, self.before_pos, self.stage = graph, before, before_pos, stage
        self.tensors, self.sym, self.export_style, self.cache = tensors, sym, export_style, cache
        self.value_node = value_node
        self.dims: dict[fx.Node, list] = {}

    def value(self, val: Any) -> Any:
        """An fx argument (a node, a constant, or a tuple or list of them) that computes `val`."""
        if isinstance(val, (torch.SymInt, torch.SymBool, torch.SymFloat)):
            if free_unbacked_symbols(val):
                raise _NotRecomputable("its value depends on the values in a tensor, not only on shapes")
            expr = _simplify(val)
            if expr.is_number:
                return {torch.SymInt: int, torch.SymBool: bool, torch.SymFloat: float}[type(val)](expr)
            if isinstance(val, torch.SymInt):
                return self.expr(expr)
            raise _NotRecomputable(f"it is a symbolic {type(val).__name__[3:].lower()} ({expr}) computed from sizes")
        if val is None or val is Ellipsis or isinstance(val, (bool, int, float, str)):
            return val
        if isinstance(val, (torch.dtype, torch.layout, torch.memory_format)):
            return val
        if isinstance(val, torch.Size):
            return self.node("call_function", torch.Size, (tuple(self.value(v) for v in val),))
        if type(val) in (tuple, list):
            return type(val)(self.value(v) for v in val)
        if isinstance(val, slice):
            return slice(self.value(val.start), self.value(val.stop), self.value(val.step))
        if isinstance(val, torch.device):
            if not self.tensors:
                raise _NotRecomputable("it is a device, and the stage has no tensor to read it from")
            return self.node("call_function", getattr, (self.tensors[0], "device"))
        if isinstance(val, torch.Tensor):
            raise _NotRecomputable("it holds tensors: only a tensor itself can cross a cut")
        raise _NotRecomputable(f"dnicompile cannot rebuild a {type(val).__name__} behind a cut")

    def expr(self, e) -> Any:
        """A node computing the integer sympy expression `e` from the sizes of the stage's tensors."""
        if e.is_Integer:
            return int(e)
        key = (self.stage, e)
        hit = self.cache.get(key)
        if hit is not None and hit[1] <= self.before_pos:
            return hit[0]
        found = self.find(e)
        if found is not None:
            t, d, size = found
            if self.export_style:
                node = self.node("call_function", aten.sym_size.int, (t, d), val=size)
            else:
                node = self.node("call_method", "size", (t, d))
        elif isinstance(e, (sympy.Add, sympy.Mul)):
            op = operator.add if isinstance(e, sympy.Add) else operator.mul
            parts = [self.expr(a) for a in e.args]
            node = parts[0]
            for part in parts[1:]:
                node = self.node("call_function", op, (node, part))
        elif isinstance(e, (FloorDiv, Mod, PythonMod)):
            op = operator.floordiv if isinstance(e, FloorDiv) else operator.mod
            node = self.node("call_function", op, (self.expr(e.args[0]), self.expr(e.args[1])))
        else:
            names = ", ".join(f"`{t.name}`" for t in self.tensors[:6]) + (", ..." if len(self.tensors) > 6 else "")
            what = self.sym.inputs.get(e)
            raise _NotRecomputable(
                f"it is (or is computed from) the size {e}"
                + (f", {what}," if what else "")
                + f" and no tensor that stage {self.stage} receives or computes before its use "
                + (f"({names}) " if names else "")
                + "has that size in its shape"
            )
        if isinstance(node, fx.Node):
            self.cache[key] = (node, self.before_pos)
        return node

    def find(self, e):
        for t in self.tensors:
            dims = self.dims.get(t)
            if dims is None:
                val = self.sym.values.get(t)
                shape = val.shape if isinstance(val, torch.Tensor) else ()
                dims = self.dims[t] = [(_simplify(d) if isinstance(d, torch.SymInt) else None, d) for d in shape]
            for d, (expr, size) in enumerate(dims):
                if expr is not None and expr == e:
                    return t, d, size
        return None

    def node(self, op: str, target: Any, args: tuple, val: Any = None) -> fx.Node:
        with self.graph.inserting_before(self.before):
            node = self.graph.create_node(op, target, args)
        node.meta["nn_module_stack"] = dict(self.before.meta.get("nn_module_stack") or {})
        if self.value_node.meta.get("user_site"):
            node.meta["user_site"] = self.value_node.meta["user_site"]
        if val is not None:
            node.meta["val"] = val
        return node


def _simplify(v):
    expr = v.node.expr
    env = getattr(v.node, "shape_env", None)
    return env.simplify(expr) if env is not None else expr


def _crossing_message(v: fx.Node, user: fx.Node, spec: Spec, spec_index: int, reason: str) -> str:
    kind = getattr(v.meta.get("type"), "__name__", "non-tensor")
    stack = _module_paths(v)
    inside = f" in module `{stack[-1]}`" if stack else ""
    made = v.meta.get("user_site") or v.format_node()
    used = f" ({user.meta['user_site']})" if user.meta.get("user_site") else ""
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    hint = (
        "keep it a tensor (no .item(), .tolist() or int() on it) so that it crosses as one, or move the cut so "
        f"that `{v.name}` and its users are on the same side."
    )
    if kind in ("tuple", "list", "dict") and _holds_tensors(v):
        hint = (
            f"move the cut so that `{v.name}` and its users are on the same side, or read its elements before the cut."
        )
    return (
        f"{spec.where('cuts', spec_index, 'after')}: {article} {kind} value crosses the cut after "
        f"`{spec.cuts[spec_index].after}`: node `{v.name}` ({made}){inside} is used by `{user.name}`{used} behind "
        f"the cut, and it cannot be computed again there: {reason}. Only tensors cross a cut: {hint}"
    )


def _tied_tensors(nodes, stage_of, shared, gm: fx.GraphModule, model: nn.Module) -> tuple[TiedTensor, ...]:
    """Parameters and buffers that more than one stage uses (GPT's embedding tied to its output head)."""
    used: dict[int, tuple[torch.Tensor, set[int]]] = {}
    modules: dict[str, nn.Module] | None = None
    tensors_of: dict[str, list[torch.Tensor]] = {}
    for node in nodes:
        if node.op == "call_module":
            if node.target not in tensors_of:
                if modules is None:
                    modules = dict(gm.named_modules())
                tensors_of[node.target] = _tensors_of(modules[node.target])
            tensors = tensors_of[node.target]
            stages = (stage_of[node.name],)
        elif node.op == "get_attr":
            t = _get_attr(gm, node.target)
            if not isinstance(t, torch.Tensor) or not isinstance(t, nn.Parameter) and not _is_buffer(gm, node.target):
                continue
            tensors, stages = [t], shared[node.name]
        else:
            continue
        for t in tensors:
            used.setdefault(id(t), (t, set()))[1].update(stages)
    multi = {k: v for k, v in used.items() if len(v[1]) > 1}
    if not multi:
        return ()
    names: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if id(t) in multi:
            names.setdefault(id(t), []).append(name)
    tied = []
    for key, (t, stages) in multi.items():
        ordered = tuple(sorted(stages))
        tied.append(
            TiedTensor(
                names=tuple(names.get(key, ["?"])),
                stages=ordered,
                owner=ordered[-1],
                parameter=isinstance(t, nn.Parameter),
                shape=tuple(t.shape),
            )
        )
    return tuple(sorted(tied, key=lambda x: x.names))


def _tensors_of(mod: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers of a module and its submodules (cheaply for a leaf, the usual case)."""
    if not mod._modules:
        return [t for t in (*mod._parameters.values(), *mod._buffers.values()) if t is not None]
    return [*mod.parameters(), *mod.buffers()]


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_buffer(gm: nn.Module, target: str) -> bool:
    parent, _, leaf = target.rpartition(".")
    mod = gm.get_submodule(parent) if parent else gm
    return leaf in dict(mod.named_buffers(recurse=False))
