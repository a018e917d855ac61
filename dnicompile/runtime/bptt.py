"""Truncated BPTT with synthetic gradients at the truncation boundaries (Jaderberg et al. 2017, section 3.2).

A chunk of a sequence (B, L, ...) is processed in segments of T steps. For the segment from state s_k to
state s_{k+1}:

  1. forward: the core unrolls T steps from s_k (a detached leaf), the output module scores every step;
     the segment's loss is sum_t mean_b loss_{b,t} / T (every segment divides by T, so the segments' losses
     add up to the sequence's loss over T);
  2. backward from the loss plus, at s_{k+1}, the synthetic gradient g = scale * M(s_{k+1}) / B (M predicts
     per-sample gradients; all state tensors, h and c for an LSTM, are concatenated into one vector);
     with no synthesizer this is plain truncated BPTT;
  3. the core's optimizer steps (if its clock ticks);
  4. delta_k = d(loss_k + discount * <M(s_{k+1}) / B, s_{k+1}>) / d s_k, the gradient that reached the
     segment's first state from inside the segment plus the next boundary's prediction (at `discount`, 1 by
     default, whatever `scale` the segment used it at), is the target of the prediction made at s_k: M
     learns from ||M(s_k) - B * delta_k||^2 (bootstrapped, as in TD learning; discount < 1 is TD's gamma);
  5. aux (the paper's auxiliary task): from the core's output after the segment's first step, a head
     predicts the synthetic gradient the segment's end will receive; its loss (weighted `aux_weight`) is
     backpropagated into the core, after delta_k was read, so the synthesizer's target is the task's alone.

A chunk that ends its sequence (`end=True`, e.g. an episode of the copy task) gets no synthetic gradient
at its last state: nothing comes after it. A chunk with `end=False` keeps its state and its last boundary's
prediction for the next call (a stream, e.g. a text), whose first segment supplies that prediction's target.

With an upper core (hierarchical timescales), the upper's clock is asked at every time step; on a tick it
reads the lower core's output at that step and predicts the next `horizon` targets. Through a synthetic
interface, the lower backpropagates M_I(h_t) / B into h_t at once, and M_I learns from the gradient the
upper computes later for the h_t it received; through an exact interface (no synthesizer) the upper's loss
joins the lower segment's backward. The upper updates at the end of its own segments of `truncation` ticks,
so its parameters change only on its ticks.

[Note: open upper segment] Between two chunks the upper core's truncation segment may be open: ticks that
have computed their losses but not yet backpropagated them (the segment ends after `upper.truncation`
ticks). Their graph cannot be written to a checkpoint, but everything it was built from can: the upper's
state at the segment's start, and each tick's message (the lower's output it read, a leaf) and targets. The
upper's parameters have not changed since the segment began (it updates only at segment ends), so running
those ticks again from that state on a resume (`UpperSegment.load_state_dict`) rebuilds the same graph, to
the bit, and the resumed run ends with the parameters of one that never stopped. This was chosen over
checkpointing only at the upper's segment boundaries, which would move the checkpoint's step (a SIGTERM, the
end of a run and `checkpoint_every` all name theirs) and needs the ranks of a two-worker run to agree on
one. It adds to a checkpoint at most `truncation - 1` messages of (B, H) and their targets. A two-worker run
writes the same state: rank 1 sends rank 0 the segment's start state, and rank 0 holds the messages and
targets of the ticks whose gradients have not come back (runtime/bptt_distributed.py), so a checkpoint of
either resumes in one process or on two workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..compile.unroll import flat_state
from ..errors import DNIError
from ..interfaces import BoundaryInterface, SyntheticInterface
from ..losses import get_step_loss
from .state import FORMAT, StageState, upgrade_state


class UpperSegment:
    """The upper core's open truncation segment ([Note: open upper segment]): the state it started from (a
    leaf), its ticks (weighted loss, message, time, targets) and the state after the last; the number of
    segments it has closed (the upper's updates) and its loss since the caller last read it."""

    def __init__(self, upper, loss_fn):
        self.upper, self.loss_fn = upper, loss_fn
        self.start = self.state = None
        self.ticks: list = []
        self.updates = 0
        self.loss_sum, self.loss_n = 0.0, 0

    def begin(self, batch: int, device=None) -> None:
        """Before a tick: a zero state where the stream has none, and the segment's start as a leaf."""
        if self.state is None:
            self.state = self.upper.core.init_state(batch, device=device)
        if self.start is None:
            self.start = self.state = tuple(s.detach().requires_grad_(True) for s in self.state)

    def tick(self, message: torch.Tensor, target: torch.Tensor, time: int, count: bool = True) -> torch.Tensor:
        """One tick on the lower's output `message` (B, H), predicting `target` (B, n <= horizon, ...); it joins
        the segment. Returns its weighted loss; `count` adds it to the loss statistics."""
        u = self.upper
        pred, self.state = u.step(message, self.state)
        n = target.shape[1]
        if n == 0:
            per = pred.sum() * 0.0
        else:
            per = self.loss_fn(pred[:, :n], target).sum(1).mean() / u.horizon
            if count:
                self.loss_sum += float(per.detach()) * u.horizon / n
                self.loss_n += 1
        weighted = u.config.loss_weight * per
        self.ticks.append((weighted, message, time, target))
        return weighted

    def backward(self) -> list[torch.Tensor]:
        """Backpropagate the segment's loss; returns the gradient that reached each tick's message."""
        torch.stack([loss for loss, _, _, _ in self.ticks]).sum().backward()
        return [m.grad if m.grad is not None else torch.zeros_like(m) for _, m, _, _ in self.ticks]

    def close(self) -> None:
        """The segment has learned: the next one starts from its last state, detached."""
        self.ticks = []
        self.updates += 1
        self.start = self.state = tuple(s.detach().requires_grad_(True) for s in self.state)

    def reset(self) -> None:
        """The stream starts over: no state, no segment."""
        self.start = self.state = None
        self.ticks = []

    def state_dict(self) -> dict:
        return {
            "start": [s.detach() for s in self.start] if self.start is not None else None,
            "ticks": [{"message": m.detach(), "target": y, "time": t} for _, m, t, y in self.ticks],
            "updates": self.updates,
            "loss": [self.loss_sum, self.loss_n],
        }

    def load_state_dict(self, state: dict, device=None) -> None:
        """Restore the segment, running its ticks again from its start ([Note: open upper segment])."""
        self.reset()
        self.updates = int(state.get("updates", 0))
        loss_sum, loss_n = state.get("loss", (0.0, 0))
        self.loss_sum, self.loss_n = float(loss_sum), int(loss_n)
        if state.get("start") is None:
            return

        def here(t: torch.Tensor) -> torch.Tensor:
            return (t if device is None else t.to(device)).detach()

        self.start = self.state = tuple(here(s).requires_grad_(True) for s in state["start"])
        for tick in state["ticks"]:
            self.tick(here(tick["message"]).requires_grad_(True), here(tick["target"]), int(tick["time"]), count=False)


@dataclass
class RecurrentStepResult:
    """What one chunk measured: averages over its segments."""

    loss: float  # mean per-step loss (sum over the chunk's steps and mean over the batch, / steps)
    step_losses: torch.Tensor = field(repr=False)  # (B, L) per-step losses, detached
    output: torch.Tensor = field(repr=False)  # (B, L, ...) outputs, detached
    segments: int = 0
    synth_loss: dict[str, float] = field(default_factory=dict)
    cosine: dict[str, float] = field(default_factory=dict)  # cos(M(s_k), B * delta_k), over the chunk
    aux_loss: float | None = None
    upper_loss: float | None = None  # mean per-target loss of the upper's predictions
    upper_ticks: list[int] = field(default_factory=list)  # time steps (stream time) the upper ticked on
    updates: list[tuple[int, int]] = field(default_factory=list)  # (stage, time step) of each optimizer step


class BPTTRuntime:
    """Trains a RecurrentProgram: optimizers, clocks, the boundary synthesizer, the aux head, the upper core."""

    def __init__(self, program):
        self.program = program
        spec = program.spec
        cfg = spec.bptt
        self.T = cfg.truncation
        self.loss_fn = get_step_loss(spec.loss, spec.where("loss"))
        self.stages = [
            StageState(i, program.stage_parameters(i), opt_cfg, clock_cfg, spec.where("stages"))
            for i, (opt_cfg, clock_cfg) in enumerate(program.stage_configs)
        ]
        d = sum(program.core.state_sizes())
        self.sg = cfg.synthetic_gradient
        self.boundary: BoundaryInterface | None = None  # the truncation boundary's interface
        if self.sg is not None:
            self.boundary = BoundaryInterface(
                "bptt",
                d,
                self.sg,
                spec.where("bptt", "synthetic_gradient"),
                cfg.discount,
                aux_input=self._output_size() if cfg.aux else None,
                aux_where=spec.where("bptt", "aux"),
            )
        self.aux_weight = cfg.aux_weight
        self.discount = cfg.discount
        self.upper = program.upper
        self.iface: SyntheticInterface | None = None  # between the lower core and the upper, when synthetic
        if self.upper is not None and self.upper.config.synthetic_gradient is not None:
            isg = self.upper.config.synthetic_gradient
            w = spec.where("recurrent", "upper", "synthetic_gradient")
            self.iface = SyntheticInterface("upper", [("message", (self._output_size(),))], isg, 0, w)
        param = next(iter(program.core.module.parameters()), None)
        if param is not None:  # the synthesizers live where the core does, in its precision
            for m in self.modules():
                m.to(device=param.device, dtype=param.dtype)
        self.state = None  # the lower core's state between chunks of a stream
        self.pending = None  # (flat s_k, detached): the input of the prediction whose target comes next
        self.upper_segment = UpperSegment(self.upper, self.loss_fn) if self.upper is not None else None
        self.time = 0  # stream time: steps since the stream started
        self.step = 0  # chunks trained
        self.segments = 0  # segments trained: the lower clock's steps

    @property
    def interfaces(self) -> list:
        return [i for i in (self.boundary, self.iface) if i is not None]

    def _output_size(self) -> int:
        core = self.program.core
        with torch.no_grad():
            return int(core.step_output(core.init_state(2)).shape[1])

    # ---------------------------------------------------------------- modes and devices
    def modules(self) -> list[nn.Module]:
        return [m for iface in self.interfaces for m in iface.modules()]

    def train(self, mode: bool = True) -> None:
        for iface in self.interfaces:
            iface.train(mode)

    def to(self, device) -> None:
        for iface in self.interfaces:
            iface.to(device)

    def reset(self) -> None:
        """Forget the stream: the next chunk starts from a zero state."""
        self.state = self.pending = None
        if self.upper_segment is not None:
            self.upper_segment.reset()

    # ---------------------------------------------------------------- the step
    def train_step(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None = None,
        start: bool = True,
        end: bool = True,
    ) -> RecurrentStepResult:
        """Train on a (B, L, ...) chunk with (B, L, ...) targets (more columns where an upper core looks
        ahead) and optional (B, L) per-step weights. `start` begins a new sequence from a zero state; `end`
        closes it (no synthetic gradient after its last state)."""
        program = self.program
        core = program.core
        b, length = x.shape[0], x.shape[1]
        need = length + (self.upper.horizon - 1 if self.upper is not None else 0)
        if target.shape[:1] != x.shape[:1] or target.shape[1] < length:
            raise DNIError(
                f"targets {tuple(target.shape)} do not fit inputs {tuple(x.shape)}: a recurrent program needs one "
                f"target per time step, (B, L, ...) batch first"
                + (f", and {need - length} more for the upper core's look-ahead" if need > length else "")
                + "."
            )
        self._reset_stats()
        losses, outputs = [], []
        result = RecurrentStepResult(loss=float("nan"), step_losses=torch.empty(0), output=torch.empty(0))
        if start or self.state is None:
            if self.upper_segment is not None and self.upper_segment.ticks:
                # a stream that starts over: the upper's open segment still learns
                self._flush_upper(self.upper_segment.ticks[-1][1].shape[0], result)
            self.reset()
            self.time = 0
            self.state = core.init_state(b, device=x.device)
        state = self.state
        for a in range(0, length, self.T):
            e = min(a + self.T, length)
            last = e == length
            s0 = tuple(s.detach().requires_grad_(True) for s in state)
            u = program.input(x[:, a:e]) if program.input is not None else x[:, a:e]
            out, s1 = core.run(u, s0)
            y = program.output(out)
            per_step = self.loss_fn(y, target[:, a:e])
            if mask is not None:
                per_step = per_step * mask[:, a:e].to(per_step.dtype)
            loss = per_step.sum(1).mean() / self.T
            roots, grads = [loss], [torch.ones_like(loss)]
            # the upper core: ticks within this segment
            ticks = self._upper_forward(out, target, a, b, roots, grads, result)
            boundary = None
            if self.boundary is not None and not (last and end):
                boundary = flat_state(s1)
                with torch.no_grad():
                    g = self.boundary.predict({"state": boundary}, None)["state"]
                roots.append(boundary)
                grads.append(g * (self.sg.scale / b))
            for stage in self.stages:
                stage.zero_grad()
            rest_weight = self.discount - self.sg.scale if boundary is not None else 0.0
            aux = self.boundary is not None and self.boundary.aux is not None
            keep = boundary is not None and (aux or rest_weight != 0.0)
            torch.autograd.backward(roots, grads, retain_graph=keep)
            delta = flat_state(tuple(s.grad if s.grad is not None else torch.zeros_like(s) for s in s0))
            if rest_weight != 0.0:
                # `scale` is how far the segment trusts the prediction; `discount` is how much of it the target
                # carries: the segment's backward sent J^T g * scale, the target wants J^T g * discount
                rest = torch.autograd.grad(boundary, s0, g * (rest_weight / b), retain_graph=aux, allow_unused=True)
                delta = delta + flat_state(tuple(r if r is not None else torch.zeros_like(s) for r, s in zip(rest, s0)))
            if aux and boundary is not None:
                self.boundary.learn_aux(out[:, 0], g, self.aux_weight)
            if self.stages[0].tick(self.segments):
                self._step_stage(0, result, self.time + e - a - 1)
            self.segments += 1
            # the prediction made at s_k learns from delta_k
            if self.pending is not None and self.boundary is not None:
                self.boundary.learn({"state": self.pending}, None, {"state": delta}, b)
            self.pending = boundary.detach() if boundary is not None else None
            # the upper core's own segments end on its ticks
            self._upper_backward(ticks, b, result)
            losses.append(per_step.detach())
            outputs.append(y.detach())
            state = tuple(s.detach() for s in s1)
            self.time += e - a
            result.segments += 1
        self.state = None if end else state
        if end:
            self.pending = None
            self._flush_upper(b, result)
        result.step_losses = torch.cat(losses, 1)
        counted = float(mask.sum()) if mask is not None else float(b * length)
        result.loss = float(result.step_losses.sum()) / max(counted, 1.0)
        result.output = torch.cat(outputs, 1)
        for iface in self.interfaces:
            if iface.stats.count:
                result.synth_loss[iface.name] = iface.stats.loss
                result.cosine[iface.name] = iface.stats.cosine
        if self.boundary is not None and self.boundary.aux_stats.count:
            result.aux_loss = self.boundary.aux_stats.loss
        seg = self.upper_segment
        if seg is not None and seg.loss_n:
            result.upper_loss = seg.loss_sum / seg.loss_n
        if seg is not None:
            seg.loss_sum, seg.loss_n = 0.0, 0
        self.step += 1
        return result

    def _step_stage(self, stage: int, result: RecurrentStepResult, time: int) -> None:
        if self.stages[stage].step():
            result.updates.append((stage, time))

    def _reset_stats(self) -> None:
        """Start the statistics of a chunk (the result reports each interface's over the chunk)."""
        for iface in self.interfaces:
            iface.stats.reset()
        if self.boundary is not None:
            self.boundary.aux_stats.reset()

    # ---------------------------------------------------------------- the upper core
    def _upper_forward(self, out, target, a: int, b: int, roots: list, grads: list, result) -> list:
        """Run the upper core on its ticks in this lower segment; returns [(time, message leaf)] of the ticks."""
        upper, seg = self.upper, self.upper_segment
        if upper is None:
            return []
        seg.begin(b, device=out.device)
        ticks = []
        exact = self.iface is None
        for j in range(out.shape[1]):
            t = self.time + j
            if not self.stages[1].tick(t):
                continue
            result.upper_ticks.append(t)
            h = out[:, j]
            if exact:
                message = h
            else:
                message = h.detach().requires_grad_(True)
                with torch.no_grad():
                    g = self.iface.predict({"message": h}, None)["message"]
                roots.append(h)
                grads.append(g * (upper.config.synthetic_gradient.scale / b))
            k = a + j  # targets t .. t + horizon - 1 of this chunk, as far as it has them
            weighted = seg.tick(message, target[:, k : k + upper.horizon], t)
            if exact:
                roots.append(weighted)
                grads.append(torch.ones_like(weighted))
            ticks.append(t)
            if not exact and len(seg.ticks) >= upper.config.truncation:
                # a synthetic interface decouples the upper: its segment ends on this tick
                self._end_upper_segment(t, b, result, backward=True)
        return ticks

    def _upper_backward(self, ticks: list, b: int, result) -> None:
        """After the lower segment: end the upper's segment when it holds `truncation` ticks."""
        if self.upper is None or not ticks or self.iface is not None:
            return
        # exact interface: the upper's loss went back with the lower segment; its segment ends with the lower's
        self._end_upper_segment(ticks[-1], b, result, backward=False)

    def _flush_upper(self, b: int, result) -> None:
        seg = self.upper_segment
        if seg is not None and seg.ticks:
            self._end_upper_segment(seg.ticks[-1][2], b, result, backward=self.iface is not None)
        if seg is not None:
            seg.reset()

    def _end_upper_segment(self, time: int, b: int, result, backward: bool) -> None:
        seg = self.upper_segment
        if backward:
            self.stages[1].zero_grad()
            for (_, message, _, _), delta in zip(seg.ticks, seg.backward()):
                self.iface.learn({"message": message.detach()}, None, {"message": delta}, b)
        # the upper's clock ticked on every step of its segment: it updates at the segment's last tick
        self._step_stage(1, result, time)
        seg.close()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Optimizers, clocks and interfaces, and the stream between chunks: the lower core's state, the boundary
        prediction's input waiting for its target, the segment count the lower clock ticks on, and the upper
        core's open segment (`upper`: its start state, and each tick's message and targets; [Note: open upper
        segment])."""
        state = {
            "format": FORMAT,
            "step": self.step,
            "time": self.time,
            "stages": [s.state_dict() for s in self.stages],
            "interfaces": {i.name: i.state_dict() for i in self.interfaces},
            "stream": {
                "state": [t.detach() for t in self.state] if self.state is not None else None,
                "pending": self.pending,
                "segments": self.segments,
            },
        }
        if self.upper_segment is not None:
            state["upper"] = self.upper_segment.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        state = upgrade_state(state, [])
        self.step, self.time = state["step"], state["time"]
        for stage, s in zip(self.stages, state["stages"]):
            stage.load_state_dict(s)
        for iface in self.interfaces:
            iface.load_state_dict(state["interfaces"][iface.name])
        stream = state.get("stream")  # absent in checkpoints written before it was saved: a fresh stream
        if stream is not None:
            self.state = tuple(stream["state"]) if stream["state"] is not None else None
            self.pending = stream["pending"]
            self.segments = stream["segments"]
        if self.upper_segment is not None:
            self.upper_segment.load_state_dict(upper_part(state), device=self._device())

    def _device(self):
        param = next(iter(self.program.core.module.parameters()), None)
        return param.device if param is not None else None


def upper_part(state: dict) -> dict:
    """A runtime state's upper segment; a checkpoint written before it was kept (the upper's state where its
    segment was closed, else none) as one."""
    if "upper" in state:
        return state["upper"]
    closed = (state.get("stream") or {}).get("upper_state")
    return {"start": closed, "ticks": []}
