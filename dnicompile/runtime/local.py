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

from ..clock import Clock
from ..errors import SpecError
from ..losses import get_loss
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
        for cs, cut in zip(self.synth, program.cuts):
            if cs is None:
                self.synth_optimizers.append((None, None))
                continue
            where = spec.where("cuts", program.partition.cuts[cut.index].spec_index)
            g = build_optimizer(cs.grad.parameters(), cut.synthetic_gradient.optimizer, where)[0]
            i = build_optimizer(cs.input.parameters(), cut.synthetic_input.optimizer, where)[0] if cs.input else None
            self.synth_optimizers.append((g, i))
        self.step = 0
        # stage groups joined by exact cuts; a group ends at a synthetic cut or at the loss
        self.groups: list[list[int]] = [[0]]
        for cut in program.cuts:
            if cut.exact:
                self.groups[-1].append(cut.index + 1)
            else:
                self.groups.append([cut.index + 1])

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
        program = self.program
        step = self.step
        ticks = [clock.tick(step) for clock in self.clocks]
        batch = target.shape[0]
        context = one_hot_context(target, self.num_classes) if self.num_classes else None
        for opt in self.optimizers:
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        result = StepResult(loss=float("nan"), output=torch.empty(0), ticked=ticks)
        pending = []  # (cut, synthesizers, predictions per tensor, received leaves)
        values: tuple = tuple(inputs)
        group = 0
        for stage in program.stages:
            outputs = stage(*values)
            i = stage.index
            if i == len(program.cuts):  # the last stage: the true loss
                loss = self.loss_fn(outputs, target)
                loss.backward()
                result.loss = float(loss.detach())
                result.output = outputs.detach() if isinstance(outputs, torch.Tensor) else outputs
                self._step_group(group, ticks)
                break
            cut = program.cuts[i]
            if cut.exact:
                values = outputs
                continue
            cs = self.synth[i]
            preds = {}
            roots, grads = [], []
            for b, h in zip(cut.boundary, outputs):
                if b.name not in cs.grad:
                    continue
                pred = cs.grad[b.name](h.detach(), context)  # per-sample gradient, (B, ...)
                preds[b.name] = pred
                if h.requires_grad:
                    roots.append(h)
                    scale = cut.synthetic_gradient.scale / batch
                    grads.append(pred.detach() * scale)
            if roots:
                torch.autograd.backward(roots, grads)
            self._step_group(group, ticks)
            group += 1
            received = tuple(h.detach().requires_grad_(True) if _is_float(h.dtype) else h.detach() for h in outputs)
            forward_values, synthetic = received, None
            if cs.input:
                synthetic = {name: model(inputs[0]) for name, model in cs.input.items()}  # I(x), (B, ...)
                forward_values = tuple(
                    synthetic[b.name].detach().requires_grad_(True) if b.name in synthetic else h
                    for b, h in zip(cut.boundary, received)
                )
            pending.append((cut, cs, preds, forward_values, received, synthetic))
            values = forward_values
        self._learn_synthesizers(pending, batch, result)
        self.step += 1
        return result

    def _step_group(self, group: int, ticks: list[bool]) -> None:
        for s in self.groups[group]:
            opt = self.optimizers[s]
            if opt is not None and ticks[s]:
                opt.step()
                if self.schedulers[s] is not None:
                    self.schedulers[s].step()

    def _learn_synthesizers(self, pending, batch: int, result: StepResult) -> None:
        for cut, _, preds, used, real, synthetic in pending:
            g_opt, i_opt = self.synth_optimizers[cut.index]
            losses, dots, pred_sq, true_sq = [], 0.0, 0.0, 0.0
            for b, leaf in zip(cut.boundary, used):
                if b.name not in preds:
                    continue
                delta = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                target = delta.detach() * batch
                pred = preds[b.name]
                losses.append(F.mse_loss(pred, target))
                p, t = pred.detach().flatten().double(), target.flatten().double()
                dots += float(p @ t)
                pred_sq += float(p @ p)
                true_sq += float(t @ t)
            if losses:
                loss = torch.stack(losses).sum()
                g_opt.zero_grad(set_to_none=True)
                loss.backward()
                g_opt.step()
                result.synth_loss[cut.name] = float(loss.detach())
                denom = (pred_sq * true_sq) ** 0.5
                result.cosine[cut.name] = dots / denom if denom > 0 else 0.0
            if synthetic is not None and i_opt is not None:
                in_losses = [
                    F.mse_loss(synthetic[b.name], h.detach()) for b, h in zip(cut.boundary, real) if b.name in synthetic
                ]
                in_loss = torch.stack(in_losses).sum()
                i_opt.zero_grad(set_to_none=True)
                in_loss.backward()
                i_opt.step()
                result.input_loss[cut.name] = float(in_loss.detach())

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
    outs = program.stages[-1].outputs
    if not outs:
        raise SpecError(
            f"{program.spec.where('cuts')}: condition_on_labels needs a tensor output (class scores) to size the "
            "one-hot labels."
        )
    return int(outs[0].shape[-1])
