"""The local runtime: one process, stages in topological order, the reference semantics of a step.

For a synthetic cut between stages A and B (DESIGN.md, "The training step"):
  1. A runs forward: h = A(x).
  2. g_hat = M(h.detach(), c) / batch; A runs backward from h with g_hat; A steps if its clock ticks.
  3. B runs on h.detach().requires_grad_() (or on the synthetic input I(x)), backward, steps;
     delta = h.grad is the gradient B sends back (it already holds B's own synthetic gradients).
  4. M learns from ||M(h, c) - batch * delta||^2; I (if any) from ||I(x) - h||^2.
Stages joined by exact cuts form one locked group: autograd flows through them and they all step
after the group's backward, which is plain backprop across those cuts.

[Note: running a stage DAG] Stages run in program order, a topological order of the stage graph ([Note: stage
DAG] in compile/partition.py). What stage i sends goes through the interface of the cut after it: across an exact
cut its readers get the tensors themselves (autograd flows back into stage i), across any other the detached
leaves (or synthetic inputs), one leaf per tensor whichever stages read it, so the leaf's .grad is the sum of
their gradients: the true gradient the cut learns from. A locked group (stages joined by exact edges of the
graph) may then have several ends whose gradients it waits for (two branches each ending at a synthetic cut): it
runs one backward from all of them once the last has run, then steps. In a chain each group has one end, and
this is the order of the text above.

Across a delayed cut ([Note: delayed gradients] in interfaces.py) the group before it runs forward through its
interface, which keeps the batch; the stage after it runs as behind a synthetic cut; and at the end of the step
(`learn_synthesizers`), from the last delayed cut to the first, the interface is handed the true gradient of
this step's batch and runs the backward that is due (the batch of `delay` steps ago), and the group steps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from ..errors import SpecError
from ..interfaces import DelayedGradientInterface, ForwardGroup, Interface, interface_for_cut, is_float
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
    staleness: dict[str, int] = field(default_factory=dict)  # delayed cut -> age in steps of the gradient applied
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
    delayed: list[tuple] = field(default_factory=list)  # (cut, what the stage after it ran on), in stage order
    roots: list[tuple] = field(default_factory=list)  # (tensor, gradient) the last group's backward starts from too


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
        self.label_shift = 0 if isinstance(spec.loss, str) else spec.loss.shift_labels
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
            sending = copy.copy(cut)  # the interface serves what the stage before it sends ([Note: stage DAG])
            sending.boundary = cut.sent
            self.interfaces.append(
                interface_for_cut(
                    sending, self.num_classes, in_shape, where, interfaces, self.local_loss_fn, self.per_token
                )
            )
        self.stages = [
            StageState(
                s.index, s.parameters(), s.optimizer_config, s.clock_config, spec.where("stages"), s.accumulate, s
            )
            for s in program.stages
        ]
        self.step = 0
        self._loss_checked = False
        self._delays_checked = False
        self.delayed_groups = self._bind_delayed_groups()  # first stage -> (delayed cut, the stages before it)
        # [Note: delayed gradients] the cosine between a delayed cut's stale gradient and the fresh one costs a
        # forward and a backward of the group: it is measured on every step that is a multiple of the cut's
        # `measure_every` (1-based, as the training loop's log lines: its default log_every is 10; the spec's
        # `delayed_gradient: {measure_every: N | null}`), or on every step with `measure_fresh`.
        self.measure_fresh = False

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
        if not self._delays_checked:
            self._check_delays()
        ctx = self.begin_step(inputs, target)
        outputs, open_group = self.run_stages(0, len(self.program.stages) - 1, self.program_inputs(inputs), ctx)
        self.apply_loss(outputs, ctx, open_group)
        self.learn_synthesizers(ctx)
        self.step += 1
        return ctx.result

    def _check_delays(self) -> None:
        """`delay: auto` means "as late as it arrives" across workers; in one process there is no such time."""
        spec = self.program.spec
        for cut, iface in zip(self.program.cuts, self.interfaces):
            if iface.kind == "delayed" and iface.delay == "auto":
                where = spec.where(
                    "cuts", self.program.partition.cuts[cut.index].spec_index, "delayed_gradient", "delay"
                )
                raise SpecError(
                    f"{where}: `delay: auto` on cut `{cut.name}` needs several workers (--workers N: the gradient is "
                    "used when it arrives); in one process give the delay in steps, e.g. `delay: 1`."
                )
        self._delays_checked = True

    def begin_step(self, inputs: tuple, target: torch.Tensor) -> StepContext:
        """Tick the clocks, clear gradients, and prepare the labels' one-hot context."""
        ticks = [stage.tick(self.step) for stage in self.stages]
        for stage in self.stages:
            stage.zero_grad()
        if target is None and self.labels_index is not None:
            target = inputs[self.labels_index]
        if self.label_shift and target is not None:
            target = self.shifted(target)
        context = one_hot_context(target, self.num_classes) if self.num_classes else None
        result = StepResult(loss=float("nan"), output=torch.empty(0), ticked=ticks)
        batch = (target if target is not None else inputs[0]).shape[0]
        return StepContext(self.step, tuple(inputs), target, context, batch, ticks, result)

    def shifted(self, labels: torch.Tensor) -> torch.Tensor:
        """`loss: {shift_labels: s}`: position t's label is labels[t + s]; the last s positions get -100 (ignored
        by cross-entropy, an all-zero cDNI context)."""
        s = self.label_shift
        if labels.dim() < 2 or labels.is_floating_point():
            raise SpecError(
                f"{self.program.spec.where('loss', 'shift_labels')}: shifts (B, T) integer labels along T; the "
                f"labels are {tuple(labels.shape)} {labels.dtype}. Remove `shift_labels`."
            )
        out = torch.full_like(labels, -100)
        out[:, : max(labels.shape[1] - s, 0)] = labels[:, s:]
        return out

    def program_inputs(self, inputs: tuple) -> dict[int, dict[str, torch.Tensor]]:
        """The program inputs as `run_stages` takes what is available: {-1: placeholder name -> value}."""
        return {-1: dict(zip(self.program.partition.input_names, inputs))}

    def stage_inputs(self, i: int, received: dict) -> tuple:
        """Stage i's inputs from `received` (stage -> tensor name -> value; -1: the program inputs)."""
        if i == 0:
            return tuple(received[-1].values())
        return self.program.gather(i, received)

    def locked_groups(self, first: int, last: int) -> dict[int, tuple[int, ...]]:
        """Stage -> the stages of first..last joined to it by exact edges of the stage graph ([Note: running a
        stage DAG]); in a chain, the runs of stages between the other cuts."""
        group = {i: (i,) for i in range(first, last + 1)}
        for u, v in self.program.stage_graph.edges:
            if first <= u and v <= last and self.interfaces[u].exact and group[u] is not group[v]:
                merged = tuple(sorted(group[u] + group[v]))
                for s in merged:
                    group[s] = merged
        return group

    def run_stages(self, first: int, last: int, received: dict, ctx: StepContext) -> tuple[tuple, list[int]]:
        """Run stages first..last on what is available (`received`: stage -> tensor name -> value, -1: the program
        inputs; filled in with what the stages send), crossing the synthetic and delayed cuts between them (steps
        1-3 of the training step). Returns the last stage's outputs and the stages whose backward is still to come
        (those joined to it by exact cuts; any other gradient that backward starts from is in `ctx.roots`)."""
        open_group: list[int] = []
        groups = self.locked_groups(first, last)
        waiting: dict[tuple, list] = {}  # a group -> (tensor, gradient) of its ends that have run
        k = first
        while k <= last:
            i = k
            delayed = self.delayed_groups.get(i) if not open_group else None
            if delayed is not None:  # a group that ends at a delayed cut: its interface runs it and keeps the batch
                cut, stages = delayed
                if not set(stages) <= set(range(first, last + 1)):
                    raise SpecError(
                        f"the stages before delayed cut `{cut.name}` ({', '.join(f'stage{j}' for j in stages)}) are "
                        "not all in this runtime's part of the program: a delayed cut needs them in one process."
                    )
                outputs = self.interfaces[cut.index].forward(ctx.step, self.stage_inputs(i, received))
                k += len(stages)
                if stages[-1] == last:
                    return outputs, []
                received[cut.index] = self.receive(cut, outputs, {}, ctx)
                continue
            outputs = self.program.stages[i](*self.stage_inputs(i, received))
            open_group.append(i)
            if i == last:
                return outputs, open_group
            cut = self.program.cut_after(i)
            k += 1
            if self.interfaces[cut.index].exact:
                received[i] = {b.name: h for b, h in zip(cut.sent, outputs)}
                continue
            group = groups[i]
            if last in group:  # the group's backward starts at the last stage: these ends join it
                preds = self.apply_synthetic_gradient(cut, outputs, ctx, [], roots=ctx.roots)
            elif i != group[-1]:  # another end of the group is still to run: one backward from all, later
                preds = self.apply_synthetic_gradient(cut, outputs, ctx, [], roots=waiting.setdefault(group, []))
            else:
                stepping = [s for s in open_group if s in group]
                preds = self.apply_synthetic_gradient(cut, outputs, ctx, stepping, waiting.pop(group, []))
                open_group = [s for s in open_group if s not in group]
            received[i] = self.receive(cut, outputs, preds, ctx)
        raise AssertionError("unreachable")

    def backward(self, ctx: StepContext, tensors: list, grads: list) -> None:
        """Backward from `tensors` with `grads` and from the other ends of the group kept in `ctx.roots`."""
        if ctx.roots:
            tensors = [t for t, _ in ctx.roots] + list(tensors)
            grads = [g for _, g in ctx.roots] + list(grads)
            ctx.roots = []
        if tensors:
            torch.autograd.backward(tensors, grads)

    def loss(self, outputs, target) -> torch.Tensor:
        """The spec's loss of the program's outputs (checked against the labels once, at the first step)."""
        if not self._loss_checked:  # once, at the first step: the output and labels fit a built-in loss
            check_loss_inputs(self.program.spec.loss, outputs, target, self.program.spec.where("loss"))
            self._loss_checked = True
        return self.loss_fn(outputs, target)

    def apply_loss(self, outputs, ctx: StepContext, open_group: list[int]) -> None:
        """The last stage: the true loss, backward through the open group, and its update."""
        loss = self.loss(outputs, ctx.target)
        if ctx.roots:  # [Note: running a stage DAG]
            self.backward(ctx, [loss], [None])
        else:
            loss.backward()
        ctx.result.loss = float(loss.detach())
        ctx.result.output = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, outputs)
        self.step_stages(open_group, ctx.ticks)

    def apply_synthetic_gradient(
        self, cut, outputs: tuple, ctx: StepContext, open_group: list[int], ends: list | None = None, roots=None
    ) -> dict:
        """Backward from the tensors the cut's stage sends with the interface's gradient (and from `ends`, the
        group's other ends: (tensor, gradient) pairs), then update the open group; with `roots` (a list) the
        backward is left for later: the pairs go there. Returns the interface's predictions (with graph), which
        learn once the true gradient is known."""
        iface = self.interfaces[cut.index]
        if iface.kind == "delayed":  # its group runs through the interface (run_stages, RankWorker.train_step)
            raise RuntimeError(f"delayed cut `{cut.name}` reached as a synthetic one")
        h = {b.name: t for b, t in zip(cut.sent, outputs)}
        context = ctx.target if iface.wants_target else ctx.context
        preds = iface.predict(h, context)
        grads = iface.gradient(h, context, preds, ctx.batch)
        pairs = [*(ends or []), *((h[name], grads[name]) for name in grads if h[name].requires_grad)]
        if roots is not None:
            roots.extend(pairs)
        elif pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        self.step_stages(open_group, ctx.ticks)
        if not iface.sends_back:  # its statistics are known now (a local head's loss and accuracy)
            ctx.result.synth_loss[cut.name] = iface.stats.loss
            if getattr(iface, "accuracy", None) is not None:
                ctx.result.head_accuracy[cut.name] = iface.accuracy
            iface.stats.reset()
        return preds

    def receive(self, cut, outputs: tuple, preds: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        """What the stages behind a synthetic cut run on, by tensor name: the detached tensors the stage before
        sends (leaves whose .grad becomes delta), or the synthetic inputs I(x) where the cut has them."""
        iface = self.interfaces[cut.index]
        names = [b.name for b in cut.sent]
        if not iface.sends_back:  # nothing goes back: the stage after needs no gradient for its input
            return {n: h.detach() for n, h in zip(names, outputs)}
        received = tuple(h.detach().requires_grad_(True) if is_float(h.dtype) else h.detach() for h in outputs)
        if iface.kind == "delayed":  # its gradient is handed over at the end of the step (apply_delayed_gradients)
            ctx.delayed.append((cut, received))
            return dict(zip(names, received))
        used, synthetic = received, None
        if iface.has_input:
            synthetic = iface.predict_input(ctx.inputs[0])  # I(x), (B, ...)
            used = tuple(
                synthetic[n].detach().requires_grad_(True) if n in synthetic else h for n, h in zip(names, received)
            )
        ctx.pending.append(PendingCut(cut, dict(zip(names, received)), preds, used, synthetic))
        return dict(zip(names, used))

    def step_stages(self, stages: list[int], ticks: list[bool]) -> None:
        for s in stages:
            if ticks[s]:
                self.stages[s].step()

    def learn_synthesizers(self, ctx: StepContext) -> None:
        """Step 4: each interface learns from the gradient the stage behind its cut produced (and the groups
        before delayed cuts run their due backward and step)."""
        self.apply_delayed_gradients(ctx)
        for p in ctx.pending:
            iface = self.interfaces[p.cut.index]
            deltas = {b.name: leaf.grad for b, leaf in zip(p.cut.sent, p.used) if b.name in p.preds}
            iface.stats.reset()
            loss = iface.learn(p.h, ctx.context, deltas, ctx.batch, preds=p.preds)
            if loss is not None:
                ctx.result.synth_loss[p.cut.name] = loss
                ctx.result.cosine[p.cut.name] = iface.stats.cosine
            if p.synthetic is not None:
                ctx.result.input_loss[p.cut.name] = iface.learn_input(p.synthetic, p.h)

    # ---------------------------------------------------------------- delayed cuts
    def _bind_delayed_groups(self) -> dict[int, tuple]:
        """For each delayed cut, the stage group before it (the stages joined to it by exact cuts), bound to its
        interface; keyed by the group's first stage. Refuses a group behind a synthetic cut and a tied tensor
        shared across the group's edge ([Note: delayed gradients])."""
        program, spec = self.program, self.program.spec
        groups: dict[int, tuple] = {}
        for cut in program.cuts:
            iface = self.interfaces[cut.index]
            if not isinstance(iface, DelayedGradientInterface):
                continue
            where = spec.where("cuts", program.partition.cuts[cut.index].spec_index)
            stages = [cut.index]
            before = program.cut_before(cut.index)
            while before is not None and self.interfaces[before.index].exact:
                stages.insert(0, before.index)
                before = program.cut_before(before.index)
            if before is not None and self.interfaces[before.index].kind == "synthetic":
                raise SpecError(
                    f"{where}: the stages before delayed cut `{cut.name}` start behind synthetic cut `{before.name}`, "
                    "whose synthesizer would learn from the gradients of older batches than its predictions. A "
                    "delayed cut's group must start at the program input, behind a local-loss cut or behind another "
                    "delayed cut (or an exact cut that joins it to one of these)."
                )
            for tied in getattr(program.partition, "tied", ()):
                if set(tied.stages) & set(stages) and not set(tied.stages) <= set(stages):
                    raise SpecError(
                        f"{where}: `{tied.names[0]}` is used by stages {list(tied.stages)}, inside and outside the "
                        f"group before delayed cut `{cut.name}`; a tied tensor across a delayed cut is not supported."
                    )
            iface.bind(self._forward_group(stages))
            groups[stages[0]] = (cut, stages)
        return groups

    def _forward_group(self, stages: list[int]) -> ForwardGroup:
        group = [self.program.stages[i] for i in stages]
        modules = [s.graph_module for s in group]
        params = {n: p for gm in modules for n, p in gm.named_parameters()}
        buffers = {n: b for gm in modules for n, b in gm.named_buffers()}
        names = [({n for n, _ in gm.named_parameters()} | {n for n, _ in gm.named_buffers()}) for gm in modules]

        def run(values: tuple, tensors: dict) -> tuple:
            for stage, own in zip(group, names):
                values = stage.run(values, {n: t for n, t in tensors.items() if n in own})
            return values

        return ForwardGroup(run, params, buffers)

    def apply_delayed_gradients(self, ctx: StepContext) -> None:
        """From the last delayed cut crossed in this step to the first: hand the interface this batch's true
        gradient (from the stage after the cut, or from the backward of the delayed group after it), run the
        backward that is due, and step the group where its clocks tick; a group with no gradient yet does not
        step ([Note: delayed gradients])."""
        if not ctx.delayed:
            return
        now = ctx.step
        fed: dict[int, tuple] = {}  # cut index -> (batch, gradient) from the delayed group behind it
        for cut, received in reversed(ctx.delayed):
            iface = self.interfaces[cut.index]
            if cut.index in fed:
                batch, grads = fed.pop(cut.index)
                iface.arrive(batch, {b.name: g for b, g in zip(cut.sent, grads)}, now)
            elif not self._feeds_delayed(cut):
                iface.arrive(now, {b.name: getattr(h, "grad", None) for b, h in zip(cut.sent, received)}, now)
            stages = next(st for c, st in self.delayed_groups.values() if c is cut)
            measure = self.measures(iface, now)
            done = iface.backward_due(now, measure=measure)
            if done is None:
                for s in stages:
                    ctx.result.ticked[s] = False
                continue
            self.step_stages(stages, ctx.ticks)
            ctx.result.staleness[cut.name] = iface.staleness
            if measure and iface.cosine is not None:
                ctx.result.cosine[cut.name] = iface.cosine
            before = self.program.cut_before(stages[0])
            if before is not None and self.interfaces[before.index].kind == "delayed":
                fed[before.index] = done

    def measures(self, iface, step: int) -> bool:
        """Whether a delayed cut measures its stale-fresh cosine at `step` ([Note: delayed gradients])."""
        every = iface.measure_every
        return self.measure_fresh or bool(every and (step + 1) % every == 0)

    def _feeds_delayed(self, cut) -> bool:
        """Whether the stage after `cut` starts a group that ends at a delayed cut (its gradient comes from
        that cut's interface, for an older batch, instead of from this step's backward)."""
        return (cut.index + 1) in self.delayed_groups

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
