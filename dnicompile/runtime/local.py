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
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from ..clock import Clock
from ..errors import SpecError
from ..losses import check_output_loss, get_loss
from ..optim import build_optimizer
from ..synthesizers import build_synthetic_gradient, build_synthetic_input, one_hot_context


@dataclass
class StepResult:
    """What one training step measured."""

    loss: float
    output: torch.Tensor = field(repr=False)  # the program output, detached (for accuracy)
    synth_loss: dict[str, float] = field(default_factory=dict)  # cut name -> synthetic-gradient L2 loss
    cosine: dict[str, float] = field(default_factory=dict)  # cut name -> cos(synthetic, true gradient)
    input_loss: dict[str, float] = field(default_factory=dict)  # cut name -> synthetic-input L2 loss
    ticked: list[bool] = field(default_factory=list)  # stage index -> did it update


@dataclass
class PendingCut:
    """A synthetic cut crossed in this step, waiting for the gradient from behind it."""

    cut: object
    preds: dict  # tensor name -> M(h, c), with graph, (B, ...)
    used: tuple  # what the next stage ran on (leaves whose .grad is delta)
    received: tuple  # the real boundary tensors, detached
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


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


class CutSynthesizers(nn.Module):
    """The synthesizers of one cut: a synthetic-gradient model per float boundary tensor, and an
    optional synthetic-input model per boundary tensor."""

    def __init__(self, cut, num_classes: int, input_shape: tuple[int, ...] | None, where: str):
        super().__init__()
        self.cut = cut
        self.grad = nn.ModuleDict()
        self.input = nn.ModuleDict()
        for b in cut.boundary:
            if not _is_float(b.dtype):
                continue
            if cut.synthetic_gradient is not None:
                self.grad[b.name] = build_synthetic_gradient(cut.synthetic_gradient, b.shape[1:], num_classes, where)
            if cut.synthetic_input is not None:
                self.input[b.name] = build_synthetic_input(cut.synthetic_input, input_shape, b.shape[1:], where)


class LocalRuntime:
    """Trains a DecoupledProgram in one process: per-stage optimizers and clocks, synthesizers per cut."""

    def __init__(self, program):
        self.program = program
        spec = program.spec
        self.loss_fn = get_loss(spec.loss, spec.where("loss"))
        # `loss: {from_output: i}`: the model returns its loss; its labels (if named) are one of its inputs
        self.labels_index = None if isinstance(spec.loss, str) else check_output_loss(program, spec.where("loss"))
        self.num_classes = _num_classes(program)
        first_input = program.stages[0].inputs[0] if program.stages[0].inputs else None
        in_shape = tuple(first_input.shape[1:]) if first_input is not None else None
        self.synth: list[CutSynthesizers | None] = []
        for cut in program.cuts:
            where = spec.where("cuts", program.partition.cuts[cut.index].spec_index)
            if cut.synthetic_input is not None:
                if cut.exact:
                    raise SpecError(
                        f"{where}: cut `{cut.name}` has a synthetic_input but no synthetic_gradient; a stage that "
                        "starts from a synthetic input cannot send the true gradient back. Add a synthetic_gradient."
                    )
                if first_input is None or not _is_float(first_input.dtype):
                    raise SpecError(f"{where}: synthetic_input needs a floating-point program input to predict from.")
            if cut.exact:
                self.synth.append(None)
            else:
                self.synth.append(CutSynthesizers(cut, self.num_classes, in_shape, where))
        self.optimizers, self.schedulers, self.clocks = [], [], []
        for stage in program.stages:
            opt, sched = build_optimizer(stage.parameters(), stage.optimizer_config, spec.where("stages"))
            self.optimizers.append(opt)
            self.schedulers.append(sched)
            self.clocks.append(Clock(stage.clock_config, stage.index))
        self.synth_optimizers = []
        self.synth_schedulers: dict[int, tuple] = {}  # cut index -> (gradient, input) lr schedulers or None
        for cs, cut in zip(self.synth, program.cuts):
            if cs is None:
                self.synth_optimizers.append((None, None))
                continue
            where = spec.where("cuts", program.partition.cuts[cut.index].spec_index)
            g, g_sched = build_optimizer(cs.grad.parameters(), cut.synthetic_gradient.optimizer, where)
            i, i_sched = (
                build_optimizer(cs.input.parameters(), cut.synthetic_input.optimizer, where)
                if cs.input
                else (None, None)
            )
            self.synth_optimizers.append((g, i))
            self.synth_schedulers[cut.index] = (g_sched, i_sched)
        self.step = 0

    # ---------------------------------------------------------------- modes and devices
    def modules(self) -> list[nn.Module]:
        return [cs for cs in self.synth if cs is not None]

    def train(self, mode: bool = True) -> None:
        for m in self.modules():
            m.train(mode)

    def to(self, device) -> None:
        for m in self.modules():
            m.to(device)

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
        ticks = [clock.tick(self.step) for clock in self.clocks]
        for opt in self.optimizers:
            if opt is not None:
                opt.zero_grad(set_to_none=True)
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
        for i in range(first, last + 1):
            outputs = self.program.stages[i](*values)
            open_group.append(i)
            if i == last:
                return outputs, open_group
            cut = self.program.cuts[i]
            if cut.exact:
                values = outputs
                continue
            preds = self.apply_synthetic_gradient(cut, outputs, ctx, open_group)
            open_group = []
            values = self.receive(cut, outputs, preds, ctx)
        raise AssertionError("unreachable")

    def apply_loss(self, outputs, ctx: StepContext, open_group: list[int]) -> None:
        """The last stage: the true loss, backward through the open group, and its update."""
        loss = self.loss_fn(outputs, ctx.target)
        loss.backward()
        ctx.result.loss = float(loss.detach())
        ctx.result.output = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, outputs)
        self.step_stages(open_group, ctx.ticks)

    def apply_synthetic_gradient(self, cut, outputs: tuple, ctx: StepContext, open_group: list[int]) -> dict:
        """Backward from the cut's boundary tensors with M(h, c) / batch, then update the open group."""
        cs = self.synth[cut.index]
        preds, roots, grads = {}, [], []
        scale = cut.synthetic_gradient.scale / ctx.batch
        for b, h in zip(cut.boundary, outputs):
            if b.name not in cs.grad:
                continue
            pred = cs.grad[b.name](h.detach(), ctx.context)  # per-sample gradient, (B, ...)
            preds[b.name] = pred
            if h.requires_grad:
                roots.append(h)
                grads.append(pred.detach() * scale)
        if roots:
            torch.autograd.backward(roots, grads)
        self.step_stages(open_group, ctx.ticks)
        return preds

    def receive(self, cut, outputs: tuple, preds: dict, ctx: StepContext) -> tuple:
        """What the stage behind a synthetic cut runs on: the detached boundary tensors (leaves whose
        .grad becomes delta), or the synthetic inputs I(x) where the cut has them."""
        cs = self.synth[cut.index]
        received = tuple(h.detach().requires_grad_(True) if _is_float(h.dtype) else h.detach() for h in outputs)
        used, synthetic = received, None
        if cs.input:
            synthetic = {name: model(ctx.inputs[0]) for name, model in cs.input.items()}  # I(x), (B, ...)
            used = tuple(
                synthetic[b.name].detach().requires_grad_(True) if b.name in synthetic else h
                for b, h in zip(cut.boundary, received)
            )
        ctx.pending.append(PendingCut(cut, preds, used, received, synthetic))
        return used

    def step_stages(self, stages: list[int], ticks: list[bool]) -> None:
        for s in stages:
            opt = self.optimizers[s]
            if opt is not None and ticks[s]:
                opt.step()
                if self.schedulers[s] is not None:
                    self.schedulers[s].step()

    def learn_synthesizers(self, ctx: StepContext) -> None:
        """Step 4: each synthesizer learns from the gradient the stage behind its cut produced."""
        for p in ctx.pending:
            deltas = {b.name: leaf.grad for b, leaf in zip(p.cut.boundary, p.used) if b.name in p.preds}
            self.update_synthetic_gradient(p.cut, p.preds, deltas, ctx.batch, ctx.result)
            if p.synthetic is not None:
                self.update_synthetic_input(p.cut, p.synthetic, p.received, ctx.result)

    def update_synthetic_gradient(self, cut, preds: dict, deltas: dict, batch: int, result: StepResult) -> None:
        """One step of ||M(h, c) - batch * delta||^2 for every tensor of the cut; records loss and cosine."""
        g_opt = self.synth_optimizers[cut.index][0]
        losses, dots, pred_sq, true_sq = [], 0.0, 0.0, 0.0
        for name, pred in preds.items():
            delta = deltas.get(name)
            target = torch.zeros_like(pred) if delta is None else delta.detach() * batch
            losses.append(F.mse_loss(pred, target))
            p, t = pred.detach().flatten().double(), target.flatten().double()
            dots += float(p @ t)
            pred_sq += float(p @ p)
            true_sq += float(t @ t)
        if not losses:
            return
        loss = torch.stack(losses).sum()
        g_opt.zero_grad(set_to_none=True)
        loss.backward()
        g_opt.step()
        if self.synth_schedulers[cut.index][0] is not None:
            self.synth_schedulers[cut.index][0].step()
        result.synth_loss[cut.name] = float(loss.detach())
        denom = (pred_sq * true_sq) ** 0.5
        result.cosine[cut.name] = dots / denom if denom > 0 else 0.0

    def update_synthetic_input(self, cut, synthetic: dict, real: tuple, result: StepResult) -> None:
        """One step of ||I(x) - h||^2 once the real boundary tensors are known."""
        i_opt = self.synth_optimizers[cut.index][1]
        losses = [F.mse_loss(synthetic[b.name], h.detach()) for b, h in zip(cut.boundary, real) if b.name in synthetic]
        loss = torch.stack(losses).sum()
        i_opt.zero_grad(set_to_none=True)
        loss.backward()
        i_opt.step()
        if self.synth_schedulers[cut.index][1] is not None:
            self.synth_schedulers[cut.index][1].step()
        result.input_loss[cut.name] = float(loss.detach())

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "optimizers": [o.state_dict() if o is not None else None for o in self.optimizers],
            "schedulers": [s.state_dict() if s is not None else None for s in self.schedulers],
            "clocks": [c.state_dict() for c in self.clocks],
            "synthesizers": [cs.state_dict() if cs is not None else None for cs in self.synth],
            "synth_optimizers": [
                [o.state_dict() if o is not None else None for o in pair] for pair in self.synth_optimizers
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        for o, s in zip(self.optimizers, state["optimizers"]):
            if o is not None:
                o.load_state_dict(s)
        for o, s in zip(self.schedulers, state["schedulers"]):
            if o is not None:
                o.load_state_dict(s)
        for c, s in zip(self.clocks, state["clocks"]):
            c.load_state_dict(s)
        for cs, s in zip(self.synth, state["synthesizers"]):
            if cs is not None:
                cs.load_state_dict(s)
        for pair, states in zip(self.synth_optimizers, state["synth_optimizers"]):
            for o, s in zip(pair, states):
                if o is not None:
                    o.load_state_dict(s)


def _num_classes(program) -> int:
    """Size of the one-hot context for cDNI: the last dimension of the program's output."""
    if not any(c.synthetic_gradient is not None and c.synthetic_gradient.condition_on_labels for c in program.cuts):
        return 0
    if not isinstance(program.spec.loss, str) and program.spec.loss.labels is None:
        raise SpecError(
            f"{program.spec.where('loss')}: condition_on_labels needs the labels, and the model computes its own loss: "
            "name the input that holds them, e.g. `loss: {from_output: 1, labels: targets}`."
        )
    outs = program.stages[-1].outputs
    if not outs:
        raise SpecError(
            f"{program.spec.where('cuts')}: condition_on_labels needs a tensor output (class scores) to size the "
            "one-hot labels."
        )
    return int(outs[0].shape[-1])
