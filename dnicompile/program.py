"""DecoupledProgram: the stages, the cuts with their synthesizers, per-stage optimizers and clocks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .compile.emit import emit_stages, rebind_buffers
from .compile.partition import BoundaryTensor, Partition, partition
from .compile.trace import trace
from .errors import PartitionError, SpecError
from .spec import ClockConfig, OptimizerConfig, Spec, SyntheticGradientConfig, SyntheticInputConfig, load_spec


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of a stage input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.name}: {dt}[{', '.join(map(str, self.shape))}]"


class _ScaleGrad(torch.autograd.Function):
    """The identity, multiplying the gradient on its way back by the scaler's scale (`inverse`: dividing by it),
    read when the backward runs: a delayed cut's backward steps later, with the scale its update unscales by."""

    @staticmethod
    def forward(ctx, scaler, inverse: bool, *tensors):
        ctx.scaler, ctx.inverse = scaler, inverse
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        scale = ctx.scaler.get_scale()
        factor = 1.0 / scale if ctx.inverse else scale
        return (None, None, *(None if g is None else g * factor for g in grads))


def _scale_grad(values: tuple, scaler, inverse: bool) -> tuple:
    """`values` with the gradients of its tensors that require grad scaled by `scaler` (_ScaleGrad)."""
    picked = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor) and v.requires_grad]
    if not picked:
        return values
    scaled = _ScaleGrad.apply(scaler, inverse, *(values[i] for i in picked))
    out = list(values)
    for i, v in zip(picked, scaled):
        out[i] = v
    return tuple(out)


class Stage:
    """The nodes between two consecutive cuts, as a GraphModule sharing the model's parameters."""

    def __init__(self, index: int, graph_module: fx.GraphModule, inputs, outputs, optimizer, clock):
        self.index = index
        self.name = f"stage{index}"
        self.graph_module = graph_module
        self.inputs: tuple[TensorInfo, ...] = inputs
        self.outputs: tuple[TensorInfo, ...] = outputs
        self.optimizer_config: OptimizerConfig = optimizer
        self.clock_config: ClockConfig = clock
        self.borrowed: frozenset[int] = frozenset()  # ids of tied tensors another stage owns (Partition.tied)
        self.precision = "fp32"  # or "bf16": the forward runs under autocast ([Note: stage precision])
        self.accumulate = 1  # steps whose mean gradient each update takes ([Note: accumulation])
        self.compile_options: dict | None = None  # torch.compile's options, None for eager ([Note: compiled stages])
        self.scaler: torch.amp.GradScaler | None = None  # fp16 only ([Note: stage precision])
        self._compiled = None

    def __call__(self, *args: Any) -> Any:
        return self.run(args)

    def run(self, values: tuple, tensors: dict | None = None) -> Any:
        """The stage's forward on `values`, with the named parameters/buffers in `tensors` in place of its own
        (torch.func.functional_call) where given."""
        gm = self.graph_module
        if self.compile_options is not None and not tensors:
            # [Note: compiled stages] `compile:` wraps the stage's GraphModule in torch.compile at its first call
            # (after the program has moved to its device); the wrapper shares the GraphModule's parameters, so
            # optimizers, state_dict and checkpoints see the same tensors. A run with other parameters in place
            # (`tensors`: a delayed cut's stashed weights) stays eager: dynamo would guard on, and recompile for,
            # each stash.
            if self._compiled is None:
                self._compiled = torch.compile(gm, **self.compile_options)
            gm = self._compiled
        if self.precision == "fp32":
            return functional_call(gm, tensors, tuple(values)) if tensors else gm(*values)
        # [Note: stage precision] bf16 / fp16: autocast on the device of the inputs; the parameters, their
        # gradients and the optimizer stay fp32, and half outputs leave the stage as fp32 (a lossless widening), so
        # the boundary tensors, synthesizers, heads and messages between ranks keep the traced dtypes. fp16 has a
        # gradient scaler of its own per stage (torch.amp.GradScaler): the gradient entering the stage at its
        # outputs is multiplied by the scale, the one leaving it at its inputs divided by it, so only this stage's
        # backward and its parameters' gradients are scaled, whatever sent the gradient (the loss, a synthesizer,
        # a delayed cut, the next rank); StageState.step unscales them, skips the update where one is not finite
        # and updates the scale, as GradScaler does for a whole model.
        device = next((v.device.type for v in values if isinstance(v, torch.Tensor)), "cpu")
        half = torch.float16 if self.precision == "fp16" else torch.bfloat16
        scaler = self.grad_scaler(device) if half == torch.float16 and torch.is_grad_enabled() else None
        if scaler is not None:
            values = _scale_grad(tuple(values), scaler, inverse=True)
        with torch.autocast(device, dtype=half):
            out = functional_call(gm, tensors, tuple(values)) if tensors else gm(*values)
        out = tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype == half else t, out)
        if scaler is None:
            return out
        leaves, spec = tree_flatten(out)
        return tree_unflatten(list(_scale_grad(tuple(leaves), scaler, inverse=False)), spec)

    def grad_scaler(self, device: str = "cpu") -> torch.amp.GradScaler:
        """The fp16 stage's gradient scaler, on `device` (made anew there, with the scale so far, on a move)."""
        if self.scaler is None or self.scaler._device != device:
            state = self.scaler.state_dict() if self.scaler is not None else None
            self.scaler = torch.amp.GradScaler(device)
            if state:
                self.scaler.load_state_dict(state)
            self.scaler.scale(torch.zeros((), device=device))  # makes its scale tensor (scale() does, lazily)
        return self.scaler

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this stage updates: all it uses but the tied ones another stage owns."""
        return [p for p in self.graph_module.parameters() if id(p) not in self.borrowed]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.graph_module.named_parameters() if id(p) not in self.borrowed]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def num_nodes(self) -> int:
        return sum(1 for n in self.graph_module.graph.nodes if n.op not in ("placeholder", "output"))

    @property
    def code(self) -> str:
        return self.graph_module.code

    def __repr__(self) -> str:
        return f"Stage({self.name}, nodes={self.num_nodes}, params={self.num_parameters()})"


class Cut:
    """A cut between stage `index` and `index + 1` in program order: its boundary tensors, what stage `index`
    sends across it (to stage `index + 1` in a chain, to the stages that read it in a DAG) and its configs."""

    def __init__(self, point, spec_cut):
        self.index: int = point.index
        self.name: str = point.name
        self.after: str = spec_cut.after
        self.node: str = point.node
        self.boundary: tuple[BoundaryTensor, ...] = point.boundary  # every value live across the cut point
        self.sent: tuple[BoundaryTensor, ...] = point.sent  # what stage `index` sends ([Note: stage DAG])
        self.synthetic_gradient: SyntheticGradientConfig | None = spec_cut.synthetic_gradient
        self.synthetic_input: SyntheticInputConfig | None = spec_cut.synthetic_input
        self.local_loss = spec_cut.local_loss
        self.delayed_gradient = spec_cut.delayed_gradient

    @property
    def kind(self) -> str:
        """exact, synthetic, delayed or local (the interface class the runtime gives it: interfaces.py)."""
        if self.local_loss is not None:
            return "local"
        if self.delayed_gradient is not None:
            return "delayed"
        return "exact" if self.synthetic_gradient is None else "synthetic"

    @property
    def exact(self) -> bool:
        """True when the true gradient crosses this cut (no synthetic gradient, no local loss)."""
        return self.kind == "exact"

    def __repr__(self) -> str:
        kind = self.synthetic_gradient.model if self.kind == "synthetic" else self.kind
        return f"Cut({self.name!r}, after={self.node}, {kind}, boundary={[b.name for b in self.boundary]})"


class ProgramBase(nn.Module):
    """[Note: program protocol] What every compiled program offers, feed-forward (`DecoupledProgram`) or recurrent
    (`RecurrentProgram`): `model` and `spec`; `num_stages` and `stage_parameters(i)`; `train(mode)` / `eval()` /
    `to(device)`, which reach the model, the stages and the runtime's own models; `parameters()` (each tensor once)
    and `state_dict()` (the model's own keys); `summary()` (plain text, made without the renderer); `runtime`
    (the local runtime, built on first use) and `build_runtime()` (a fresh one, [Note: seeds]); `train_step`.
    A program never trains itself: the runtimes (runtime/) and the one training loop (train/loop.py) do.

    A program is an `nn.Module` whose one child is the model: `named_parameters`, `named_modules`, `buffers`,
    `state_dict` and `load_state_dict` use the model's own names, so a program goes where a module goes (a
    LightningModule's attribute, `torch.save(program.state_dict())`), and `state_dict(interfaces=True)` adds the
    cuts' own models (synthesizers, heads) under `interfaces.<cut>.`."""

    model: nn.Module
    spec: Spec
    _runtime = None

    def __init__(self) -> None:
        super().__init__()
        self._register_load_state_dict_pre_hook(self._load_as_a_child)

    def _load_as_a_child(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        """[Note: a program inside a module] A module that holds the program (a LightningModule's attribute)
        saves the program's keys as the model's own under its prefix (`state_dict`), and loads by recursing into
        its children, where the model is the child `model`: put every key under `model.` (the model's own keys
        never lack it here, whatever they are called, `model.` included), and load `interfaces.` keys into the
        cuts' models."""
        cut_keys = {}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix) :]
            if rest.startswith("interfaces."):
                cut_keys[rest] = state_dict.pop(key)
            else:
                state_dict[f"{prefix}model.{rest}"] = state_dict.pop(key)
        self._load_interfaces(cut_keys, strict)

    def _load_interfaces(self, cut_keys: dict, strict: bool) -> None:
        """`interfaces.<cut>.<i>.` keys into the cuts' models of the runtime (built if it is not yet)."""
        if not cut_keys:
            return
        for iface in self.runtime.interfaces:
            for i, module in enumerate(iface.modules()):
                prefix = f"interfaces.{iface.name}.{i}."
                mine = {k[len(prefix) :]: v for k, v in cut_keys.items() if k.startswith(prefix)}
                if mine or strict:
                    module.load_state_dict(mine, strict=strict)

    # ---------------------------------------------------------------- the runtime
    def _new_runtime(self):
        raise NotImplementedError

    @property
    def runtime(self):
        """The local runtime, built on first use."""
        if self._runtime is None:
            self.build_runtime()
        return self._runtime

    def build_runtime(self):
        """A fresh local runtime (replacing any before). [Note: seeds] Its models (synthesizers, heads) are drawn
        from torch's global generator: every training loop seeds it with the run's seed right before building the
        runtime, so one worker and several start from the same models."""
        self._runtime = self._new_runtime()
        return self._runtime

    # ---------------------------------------------------------------- stages
    @property
    def num_stages(self) -> int:
        raise NotImplementedError

    def stage_parameters(self, index: int) -> list[nn.Parameter]:
        raise NotImplementedError

    def parameters(self, recurse: bool = True) -> list[nn.Parameter]:
        """Every parameter a stage updates, each once."""
        seen, out = set(), []
        for i in range(self.num_stages):
            for p in self.stage_parameters(i):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    # ---------------------------------------------------------------- modes, devices, state
    def _set_mode(self, mode: bool) -> None:
        """Subclasses: modules of their own that `model.train` does not reach."""

    def _moved(self, device) -> None:
        """Subclasses: what must follow the model to `device`."""

    def train(self, mode: bool = True):
        self.model.train(mode)
        self._set_mode(mode)
        if self._runtime is not None:
            self._runtime.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def to(self, device: str | torch.device):
        self.model.to(device)
        self._moved(device)
        if self._runtime is not None:
            self._runtime.to(device)
        return self

    def state_dict(self, *args, interfaces: bool = False, **kwargs) -> dict[str, torch.Tensor]:
        """The model's own state_dict: loadable into the original model class. `interfaces=True`: also the cuts'
        models (synthesizers, local heads) under `interfaces.<cut>.<index>.` (their optimizers are in the
        runtime's checkpoint, not here)."""
        state = self.model.state_dict(*args, **kwargs)
        if interfaces and self._runtime is not None:
            for iface in self._runtime.interfaces:
                for i, module in enumerate(iface.modules()):
                    for k, v in module.state_dict().items():
                        state[f"interfaces.{iface.name}.{i}.{k}"] = v
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load `state_dict()`'s result: the model's keys into the model, `interfaces.` keys (if any) into the
        cuts' models of the runtime (built if it is not yet). Returns the model's missing and unexpected keys."""
        own = {k: v for k, v in state_dict.items() if not k.startswith("interfaces.")}
        result = self.model.load_state_dict(own, strict=strict, assign=assign)
        self._load_interfaces({k: v for k, v in state_dict.items() if k.startswith("interfaces.")}, strict)
        return result

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self.model.named_parameters(prefix, recurse, remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self.model.named_buffers(prefix, recurse, remove_duplicate)

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        return self.model.named_modules(memo, prefix, remove_duplicate)

    def summary(self) -> str:
        raise NotImplementedError


class DecoupledProgram(ProgramBase):
    """A model compiled into decoupled stages.

    `program(*inputs)` runs the stages in order and returns what the model returns; autograd flows
    through every cut. `program.train_step(x, y)` trains it decoupled (see dnicompile.runtime.local).
    """

    cut_plan = None  # how `cuts: {auto: ...}` chose the cuts (compile/auto.py's CutPlan); None for written cuts

    def __init__(self, model: nn.Module, spec: Spec, part: Partition, stages: list[Stage], cuts: list[Cut], traced):
        super().__init__()
        self.model = model
        self.spec = spec
        self.partition = part
        self.stages = stages
        self.cuts = cuts
        self.frontend = traced.frontend
        self.frontend_reason = traced.frontend_reason  # why that front end (shown in the stage table)
        self.example_inputs = traced.example_inputs
        # boundary tensors whose first dimension is this size are batch-major; others are batch-independent
        self.example_batch = traced.example_inputs[0].shape[0] if traced.example_inputs else None
        self.input_names = tuple(traced.input_names)  # forward()'s arguments the program takes, in order
        self.output_type = traced.output_type  # the model's output type, rebuilt from the last stage's output
        self.interface_classes: dict[str, type] = {}
        # [Note: stage graph] partition's networkx graph of stages (edge i -> j: the tensors j receives from i,
        # [Note: stage DAG] in partition.py) with the program's Stage objects on its nodes and, on each edge, the
        # Cut after its producer (whose kind decides what goes back along it). A chain when each stage reads the
        # one before, else a DAG. The runtimes take what crosses between stages from it (`stage_inputs`) and run
        # the stages in program order, a topological order of it; the renderer draws it.
        self.stage_graph = part.stage_graph.copy()
        for stage in stages:
            self.stage_graph.nodes[stage.index]["stage"] = stage
        for u, _, data in self.stage_graph.edges(data=True):
            data["cut"] = cuts[u]
        if not nx.is_directed_acyclic_graph(self.stage_graph) or any(u >= v for u, v in self.stage_graph.edges):
            raise PartitionError("the stage graph has an edge against program order; this is a bug in partition")
        self.stage_order: tuple[int, ...] = tuple(range(len(stages)))
        self.chain: bool = part.chain
        if not self.chain:
            for cut in cuts:
                if cut.kind == "delayed":
                    raise SpecError(
                        f"{spec.where('cuts', part.cuts[cut.index].spec_index, 'delayed_gradient')}: delayed cut "
                        f"`{cut.name}` in a program whose stages do not form a chain ({self.describe_edges()}): a "
                        "delayed cut needs each stage to read the one before. On parallel branches use exact, "
                        "synthetic_gradient or local_loss cuts, or cut so that the stages form a chain."
                    )

    # ---------------------------------------------------------------- running
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the stages on the inputs (in the order of `input_names`, or by name, as the model takes them) and
        return what the model returns, of its type: a dataclass, namedtuple or `ModelOutput` the model returns
        comes back as one (the last stage returns it as plain dicts and tuples)."""
        if kwargs:
            args = self._bind(args, kwargs)
        sent: dict[int, dict[str, Any]] = {-1: dict(zip(self.partition.input_names, args))}
        out = self.stages[0](*args)
        for stage in self.stages[1:]:
            sent[stage.index - 1] = {b.name: v for b, v in zip(self.cuts[stage.index - 1].sent, out)}
            out = stage(*self.gather(stage.index, sent))
        return self.output_type.restore(out)

    forward = __call__

    def _bind(self, args: tuple, kwargs: dict) -> tuple:
        if len(args) > len(self.input_names):
            raise TypeError(f"{len(args)} inputs given; the program takes {list(self.input_names)}")
        twice = [n for n in self.input_names[: len(args)] if n in kwargs]
        if twice:
            raise TypeError(f"input {twice[0]!r} given twice, by position and by name")
        kwargs = dict(kwargs)
        values = list(args)
        for name in self.input_names[len(args) :]:
            if name not in kwargs:
                raise TypeError(f"missing input {name!r}; the program takes {list(self.input_names)}")
            values.append(kwargs.pop(name))
        if kwargs:
            raise TypeError(f"unexpected inputs {sorted(kwargs)}; the program takes {list(self.input_names)}")
        return tuple(values)

    def _new_runtime(self):
        """The local runtime (a StageState per stage, an interface per cut), with `interface_classes` (kind or cut
        name -> Interface subclass) in place of the default interfaces."""
        from .runtime.local import LocalRuntime

        return LocalRuntime(self, self.interface_classes)

    def train_step(self, *inputs: torch.Tensor, target: torch.Tensor | None = None):
        """One decoupled training step over all stages; the last positional argument is the target, unless the
        model computes its own loss (`loss: {from_output: i}`): then all are inputs (labels among them)."""
        if target is None and isinstance(self.spec.loss, str):
            *inputs, target = inputs
        return self.runtime.train_step(tuple(inputs), target)

    # ---------------------------------------------------------------- stages, modes, devices
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def gather(self, stage: int, sent: dict[int, dict[str, Any]]) -> tuple:
        """Stage `stage`'s inputs from what the stages before it sent (`sent[i]`: tensor name -> value; -1: the
        program inputs), in the order the stage takes them ([Note: stage DAG])."""
        return tuple(sent[src][b.name] for b, src in self.partition.stage_inputs[stage])

    def cut_after(self, stage: int) -> Cut | None:
        """The cut after `stage`, which owns what it sends (None for the last stage)."""
        return self.cuts[stage] if stage < len(self.cuts) else None

    def cuts_before(self, stage: int) -> list[Cut]:
        """The cuts after the stages that `stage` receives from, in program order (none for a first stage)."""
        return [self.cuts[u] for u in sorted(self.stage_graph.predecessors(stage))]

    def cut_before(self, stage: int) -> Cut | None:
        """The cut on the stage graph's edge into `stage` (None where it receives only program inputs); where it
        receives from several stages (a DAG), that of the last of them (`cuts_before` gives all)."""
        before = self.cuts_before(stage)
        return before[-1] if before else None

    def describe_edges(self) -> str:
        """The stage graph's edges, `stage0 -> stage2, stage1 -> stage2`."""
        return ", ".join(f"stage{u} -> stage{v}" for u, v in sorted(self.stage_graph.edges)) or "no edges"

    def stage_parameters(self, index: int) -> list[nn.Parameter]:
        return self.stages[index].parameters()

    def _set_mode(self, mode: bool) -> None:
        for s in self.stages:
            s.graph_module.train(mode)

    def _moved(self, device) -> None:
        for s in self.stages:  # Module.to makes new buffer tensors: the stages must read those
            rebind_buffers(s.graph_module, self.model, device)

    # ---------------------------------------------------------------- inspection
    def summary(self) -> str:
        from .describe import summary_text

        return summary_text(self)

    def code(self) -> str:
        from .describe import stage_code

        return "\n\n".join(stage_code(self, s) for s in self.stages)

    def __repr__(self) -> str:
        return f"DecoupledProgram({type(self.model).__name__}, stages={len(self.stages)}, cuts={len(self.cuts)})"


def _infos(nodes: list[fx.Node]) -> tuple[TensorInfo, ...]:
    out = []
    for n in nodes:
        meta = n.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            out.append(TensorInfo(n.name, tuple(meta.shape), meta.dtype))
    return tuple(out)


def _output_infos(gm: fx.GraphModule) -> tuple[TensorInfo, ...]:
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values: list[fx.Node] = []
    fx.node.map_arg(out_node.args[0], values.append)
    return _infos(values)


def compile_decoupled(model: nn.Module, spec: str | Path | dict | Spec, example_inputs: Any = None) -> DecoupledProgram:
    """Trace `model`, cut it where `spec` says, and return the decoupled program.

    `spec` is a path to a YAML file, a YAML string, a dict, or a Spec. `example_inputs` (a tensor, a
    tuple, or a dict by forward() argument name) replaces the spec's `inputs:`.
    """
    spec = load_spec(spec)
    traced = trace(model, spec, example_inputs)
    plan = None
    if spec.auto_cuts is not None:  # `cuts: {auto: ...}`: from here on, as if the chosen cuts were written
        from .compile.auto import choose_cuts

        spec, plan = choose_cuts(traced.graph_module, spec, model, traced.example_inputs)
    part = partition(traced.graph_module, spec, model)
    spec.check_stage_keys(part.num_stages)
    stage_modules = emit_stages(part)
    stages = []
    for i, gm in enumerate(stage_modules):
        inputs = _infos([n for n in gm.graph.nodes if n.op == "placeholder"])
        outputs = _output_infos(gm)
        opt, clock = spec.stage_config(i, f"stage{i}")
        stages.append(Stage(i, gm, inputs, outputs, opt, clock))
        stages[-1].precision = spec.stage_precision(i, f"stage{i}")
        stages[-1].accumulate = spec.stage_accumulate(i, f"stage{i}")
        stages[-1].compile_options = spec.stage_compile(i, f"stage{i}")
    for tied in part.tied:  # one stage owns (updates) a tied tensor; the others only read it
        tensor = model.get_parameter(tied.names[0]) if tied.parameter else model.get_buffer(tied.names[0])
        for s in tied.stages:
            if s != tied.owner:
                stages[s].borrowed |= {id(tensor)}
    cuts = [Cut(p, spec.cuts[p.spec_index]) for p in part.cuts]
    program = DecoupledProgram(model, spec, part, stages, cuts, traced)
    program.cut_plan = plan
    if not isinstance(spec.loss, str):  # `loss: {from_output: i}`: the output must hold a scalar there
        from .losses import check_output_loss

        check_output_loss(program, spec.where("loss"))
    return program
