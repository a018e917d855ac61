"""The local runtime: one process, stages in topological order, the reference semantics of a step.

For a synthetic cut between stages A and B (DESIGN.md, "The training step"):
  1. A runs forward: h = A(x).
  2. g_hat = M(h.detach(), c) / batch; A runs backward from h with g_hat; A steps if its clock ticks.
  3. B runs on h.detach().requires_grad_() (or on the synthetic input I(x)), backward, steps;
     delta = h.grad is the gradient B sends back (it already holds B's own synthetic gradients).
  4. M learns from ||M(h, c) - batch * delta||^2; I (if any) from ||I(x) - h||^2.
Stages joined by exact cuts form one locked group: autograd flows through them and they all step
after the group's backward, which is plain backprop across those cuts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from ..errors import SpecError
from ..interfaces import Interface, interface_for_cut, is_float
from ..losses import check_loss_inputs, check_output_loss, get_loss
from ..synthesizers import one_hot_context
from .state import FORMAT, StageState, upgrade_state


@dataclass
class StepResult:
    """What one training step measured."""

    loss: float
    output: torch.Tensor = field(repr=False)  # the program output, detached (for accuracy)
    synth_loss: dict[str, float] = field(default_factory=dict)  # cut name -> synthetic-gradient L2 loss
    cosine: dict[str, float] = field(default_factory=dict)  # cut name -> cos(synthetic, true gradient)
    input_loss: dict[str, float] = field(default_factory=dict)  # cut name -> synthetic-input L2 loss
    head_accuracy: dict[str, float] = field(default_factory=dict)  # local-loss cut -> its head's batch accuracy
    ticked: list[bool] = field(default_factory=list)  # stage index -> did it update


@dataclass
class PendingCut:
    """A synthetic cut crossed in this step, waiting for the gradient from behind it."""

    cut: object
    h: dict  # tensor name -> the real boundary tensor, detached
    preds: dict  # tensor name -> M(h, c), with graph, (B, ...)
    used: tuple  # what the next stage ran on (leaves whose .grad is delta)
    synthetic: dict | None  # tensor name -> I(x), with graph, where the cut has synthetic inputs


@dataclass
class StepContext:
    """What one step carries through the stages."""

    step: int
    inputs: tuple
    target: torch.Tensor
    context: torch.Tensor | None  # one-hot labels for cDNI
    batch: int
    ticks: list[bool]
    result: StepResult
    pending: list[PendingCut] = field(default_factory=list)


class LocalRuntime:
    """Trains a DecoupledProgram in one process: a StageState per stage, an interface per cut.

    `interfaces` may replace the interface class of a kind of cut ("exact", "synthetic") or of one cut (by
    name) with a subclass; the program's `interface_classes` are used when it builds its runtime."""

    def __init__(self, program, interfaces: dict | None = None):
        self.program = program
        spec = program.spec
        self.loss_fn = get_loss(spec.loss, spec.where("loss"))
        # `loss: {from_output: i}`: the model returns its loss; its labels (if named) are one of its inputs
        self.labels_index = None if isinstance(spec.loss, str) else check_output_loss(program, spec.where("loss"))
        self.num_classes = _num_classes(program)
        # a local-loss head is trained with the spec's loss (cross-entropy where the model computes its own)
        self.local_loss_fn = get_loss(spec.loss if isinstance(spec.loss, str) else "cross_entropy", spec.where("loss"))
        scores = _class_scores(program) if any(c.kind == "local" for c in program.cuts) else None
        self.per_token = scores is not None and len(scores.shape) == 3
        first_input = program.stages[0].inputs[0] if program.stages[0].inputs else None
        in_shape = tuple(first_input.shape[1:]) if first_input is not None else None
        self.interfaces: list[Interface] = []
        for cut in program.cuts:
            where = spec.where("cuts", program.partition.cuts[cut.index].spec_index)
            if cut.synthetic_input is not None:
                if cut.exact:
                    raise SpecError(
                        f"{where}: cut `{cut.name}` has a synthetic_input but no synthetic_gradient; a stage that "
                        "starts from a synthetic input cannot send the true gradient back. Add a synthetic_gradient."
                    )
                if first_input is None or not is_float(first_input.dtype):
                    raise SpecError(f"{where}: synthetic_input needs a floating-point program input to predict from.")
            self.interfaces.append(
                interface_for_cut(
                    cut, self.num_classes, in_shape, where, interfaces, self.local_loss_fn, self.per_token
                )
            )
        self.stages = [
            StageState(s.index, s.parameters(), s.optimizer_config, s.clock_config, spec.where("stages"))
            for s in program.stages
        ]
        self.step = 0
        self._loss_checked = False

    # ---------------------------------------------------------------- modes and devices
    def modules(self) -> list[nn.Module]:
        return [m for iface in self.interfaces for m in iface.modules()]

    def train(self, mode: bool = True) -> None:
        for iface in self.interfaces:
            iface.train(mode)

    def to(self, device) -> None:
        for iface in self.interfaces:
            iface.to(device)

    # ---------------------------------------------------------------- the step
    def train_step(self, inputs: tuple[torch.Tensor, ...], target: torch.Tensor) -> StepResult:
        ctx = self.begin_step(inputs, target)
        outputs, open_group = self.run_stages(0, len(self.program.stages) - 1, tuple(inputs), ctx)
        self.apply_loss(outputs, ctx, open_group)
        self.learn_synthesizers(ctx)
        self.step += 1
        return ctx.result

    def begin_step(self, inputs: tuple, target: torch.Tensor) -> StepContext:
        """Tick the clocks, clear gradients, and prepare the labels' one-hot context."""
        ticks = [stage.tick(self.step) for stage in self.stages]
        for stage in self.stages:
            stage.zero_grad()
        if target is None and self.labels_index is not None:
            target = inputs[self.labels_index]
        context = one_hot_context(target, self.num_classes) if self.num_classes else None
        result = StepResult(loss=float("nan"), output=torch.empty(0), ticked=ticks)
        batch = (target if target is not None else inputs[0]).shape[0]
        return StepContext(self.step, tuple(inputs), target, context, batch, ticks, result)

    def run_stages(self, first: int, last: int, values: tuple, ctx: StepContext) -> tuple[tuple, list[int]]:
        """Run stages first..last on `values`, crossing the synthetic cuts between them (steps 1-3 of the
        training step). Returns the last stage's outputs and the stages whose backward is still to come
        (those joined to it by exact cuts)."""
        open_group: list[int] = []
        order = self.program.stage_order
        for i in order[order.index(first) : order.index(last) + 1]:
            outputs = self.program.stages[i](*values)
            open_group.append(i)
            if i == last:
                return outputs, open_group
            cut = self.program.cut_after(i)
            if self.interfaces[cut.index].exact:
                values = outputs
                continue
            preds = self.apply_synthetic_gradient(cut, outputs, ctx, open_group)
            open_group = []
            values = self.receive(cut, outputs, preds, ctx)
        raise AssertionError("unreachable")

    def apply_loss(self, outputs, ctx: StepContext, open_group: list[int]) -> None:
        """The last stage: the true loss, backward through the open group, and its update."""
        if not self._loss_checked:  # once, at the first step: the output and labels fit a built-in loss
            check_loss_inputs(self.program.spec.loss, outputs, ctx.target, self.program.spec.where("loss"))
            self._loss_checked = True
        loss = self.loss_fn(outputs, ctx.target)
        loss.backward()
        ctx.result.loss = float(loss.detach())
        ctx.result.output = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, outputs)
        self.step_stages(open_group, ctx.ticks)

    def apply_synthetic_gradient(self, cut, outputs: tuple, ctx: StepContext, open_group: list[int]) -> dict:
        """Backward from the cut's boundary tensors with the interface's gradient, then update the open group.
        Returns the interface's predictions (with graph), which learn once the true gradient is known."""
        iface = self.interfaces[cut.index]
        h = {b.name: t for b, t in zip(cut.boundary, outputs)}
        context = ctx.target if iface.wants_target else ctx.context
        preds = iface.predict(h, context)
        grads = iface.gradient(h, context, preds, ctx.batch)
        roots = [h[name] for name in grads if h[name].requires_grad]
        if roots:
            torch.autograd.backward(roots, [grads[name] for name in grads if h[name].requires_grad])
        self.step_stages(open_group, ctx.ticks)
        if not iface.sends_back:  # its statistics are known now (a local head's loss and accuracy)
            ctx.result.synth_loss[cut.name] = iface.stats.loss
            if getattr(iface, "accuracy", None) is not None:
                ctx.result.head_accuracy[cut.name] = iface.accuracy
            iface.stats.reset()
        return preds

    def receive(self, cut, outputs: tuple, preds: dict, ctx: StepContext) -> tuple:
        """What the stage behind a synthetic cut runs on: the detached boundary tensors (leaves whose
        .grad becomes delta), or the synthetic inputs I(x) where the cut has them."""
        iface = self.interfaces[cut.index]
        if not iface.sends_back:  # nothing goes back: the stage after needs no gradient for its input
            return tuple(h.detach() for h in outputs)
        received = tuple(h.detach().requires_grad_(True) if is_float(h.dtype) else h.detach() for h in outputs)
        used, synthetic = received, None
        if iface.has_input:
            synthetic = iface.predict_input(ctx.inputs[0])  # I(x), (B, ...)
            used = tuple(
                synthetic[b.name].detach().requires_grad_(True) if b.name in synthetic else h
                for b, h in zip(cut.boundary, received)
            )
        h = {b.name: t for b, t in zip(cut.boundary, received)}
        ctx.pending.append(PendingCut(cut, h, preds, used, synthetic))
        return used

    def step_stages(self, stages: list[int], ticks: list[bool]) -> None:
        for s in stages:
            if ticks[s]:
                self.stages[s].step()

    def learn_synthesizers(self, ctx: StepContext) -> None:
        """Step 4: each interface learns from the gradient the stage behind its cut produced."""
        for p in ctx.pending:
            iface = self.interfaces[p.cut.index]
            deltas = {b.name: leaf.grad for b, leaf in zip(p.cut.boundary, p.used) if b.name in p.preds}
            iface.stats.reset()
            loss = iface.learn(p.h, ctx.context, deltas, ctx.batch, preds=p.preds)
            if loss is not None:
                ctx.result.synth_loss[p.cut.name] = loss
                ctx.result.cosine[p.cut.name] = iface.stats.cosine
            if p.synthetic is not None:
                ctx.result.input_loss[p.cut.name] = iface.learn_input(p.synthetic, p.h)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "format": FORMAT,
            "step": self.step,
            "stages": [s.state_dict() for s in self.stages],
            "interfaces": {i.name: i.state_dict() for i in self.interfaces if i.state_dict()},
        }

    def load_state_dict(self, state: dict) -> None:
        state = upgrade_state(state, [None if i.exact else i.name for i in self.interfaces])
        self.step = state["step"]
        for stage, s in zip(self.stages, state["stages"]):
            stage.load_state_dict(s)
        for iface in self.interfaces:
            if iface.name in state["interfaces"]:
                iface.load_state_dict(state["interfaces"][iface.name])


def _num_classes(program) -> int:
    """Number of classes, for cDNI's one-hot labels and local-loss heads: the last dimension of the class scores."""
    cdni = any(c.synthetic_gradient is not None and c.synthetic_gradient.condition_on_labels for c in program.cuts)
    local = any(c.kind == "local" for c in program.cuts)
    if not (cdni or local):
        return 0
    if not isinstance(program.spec.loss, str) and program.spec.loss.labels is None:
        what = "condition_on_labels" if cdni else "local_loss"
        raise SpecError(
            f"{program.spec.where('loss')}: {what} needs the labels, and the model computes its own loss: "
            "name the input that holds them, e.g. `loss: {from_output: 1, labels: targets}`."
        )
    return int(_class_scores(program).shape[-1])


def _class_scores(program):
    # the class scores: the first floating-point output with a class dimension, (B, K) or (B, T, K); a loss the
    # model returns (a scalar) may come before them, as in a ModelOutput(loss=..., logits=...)
    scores = [t for t in program.stages[-1].outputs if t.dtype.is_floating_point and len(t.shape) >= 2]
    if not scores:
        raise SpecError(
            f"{program.spec.where('cuts')}: condition_on_labels and local_loss need a tensor output (class scores) "
            "to size the one-hot labels and the heads."
        )
    return scores[0]
