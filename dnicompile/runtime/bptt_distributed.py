"""A hierarchical recurrent program on two processes: the lower core on rank 0, the upper core on rank 1.

Both ranks rebuild the same program (same seed, same weights) and read the same text streams, so only the
interface travels over torch.distributed (gloo):

- rank 0 runs the lower core exactly as the local runtime does (dnicompile.runtime.bptt); on each of the
  upper's ticks it sends the lower's output h_t to rank 1 and backpropagates the interface synthesizer's
  M_I(h_t) into its segment at once, without waiting;
- rank 1 receives h_t on its ticks, runs the upper core, and at the end of each of its segments (every
  `upper.truncation` ticks) backpropagates, steps its optimizer and sends back d(upper loss)/d h_t;
- rank 0 pairs each returned gradient with the h_t it kept and trains M_I; it runs at most
  `max(distributed.queue_depth, upper.truncation)` ticks ahead of the gradients it learns from.

At evaluation steps and at the end rank 1 sends its parameters to rank 0, which scores the whole program on
the held-out text and writes the metrics and the weights. Every wait has the spec's
`distributed.timeout_s`. The interface must have a synthetic gradient: an exact interface would lock the two
ranks step by step.

[Note: hierarchical checkpoints] A checkpoint of the two ranks has the one-process layout (runtime/bptt.py,
[Note: open upper segment]), so it resumes on two workers or in one process, and a one-process checkpoint on
two workers. Both ranks write it after the same step (the loop's, [Note: agreed stop]). First both call
`share_segment()`: rank 1 sends rank 0 the size, start state and statistics of the upper's open segment; rank 0
learns from the gradients of every segment rank 1 has closed, so that the ticks still waiting for theirs are
the open segment's, and writes them into the runtime part (each tick's message and targets, which it kept).
Rank 0 writes the lower core's tensors, stage 0, the interfaces, the task and the meta keys; rank 1 the upper's
tensors and stage 1 (checkpoint.Share). On a resume rank 1 runs the open segment again from its start, and
rank 0 waits again for the gradients of its ticks. The end of a run leaves a segment open too: there rank 1
answers its ticks with zeros that rank 0 does not learn from (`drain`), so that no receive is left waiting.
"""

from __future__ import annotations

from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

from ..losses import get_step_loss
from .bptt import BPTTRuntime, UpperSegment, upper_part
from .state import StageState
from .transport import P2P, emulated_link

TAG_MESSAGE, TAG_DELTA, TAG_PARAMS, TAG_STATS, TAG_SEGMENT = 11, 12, 13, 14, 15
PLACEMENT = [(0, 0), (1, 1)]  # the lower core (stage 0) on rank 0, the upper (stage 1) on rank 1


# --------------------------------------------------------------------------- rank 0: the lower core
class LowerRuntime(BPTTRuntime):
    """The local runtime with the upper core replaced by messages to rank 1."""

    def __init__(self, program, timeout: timedelta):
        super().__init__(program)
        self.timeout = timeout
        self.depth = max(program.spec.distributed.queue_depth, program.upper.config.truncation)
        self.awaiting: deque = deque()  # (h_t detached, delta buffer, irecv work, time, the tick's targets)
        self.p2p = P2P(0, "lower core", timeout, emulated_link(program.spec.distributed))
        self.upper_segment = None  # rank 1 holds the upper's segment
        self.segment_state: dict | None = None  # as the last share_segment() brought it here, for state_dict

    def _reset_stats(self) -> None:
        """The upper interface's statistics run from one log line to the next (the loop reads and resets them)."""
        if self.boundary is not None:
            self.boundary.stats.reset()
            self.boundary.aux_stats.reset()

    def _upper_forward(self, out, target, a, b, roots, grads, result) -> list:
        scale = self.upper.config.synthetic_gradient.scale
        for j in range(out.shape[1]):
            t = self.time + j
            if not self.stages[1].tick(t):
                continue
            result.upper_ticks.append(t)
            h = out[:, j]
            message = h.detach().contiguous()
            self.p2p.send([message], 1, tag=TAG_MESSAGE)
            with torch.no_grad():
                g = self.iface.predict({"message": message}, None)["message"]
            roots.append(h)
            grads.append(g * (scale / b))
            self._await(message, t, target[:, a + j : a + j + self.upper.horizon])
        return []

    def _await(self, message: torch.Tensor, t: int, target: torch.Tensor) -> None:
        buf = torch.empty_like(message)
        self.awaiting.append((message, buf, self.p2p.irecv(buf, 1, tag=TAG_DELTA), t, target))

    def _upper_backward(self, ticks, b, result) -> None:
        self.use_deltas(block_beyond=self.depth)

    def _flush_upper(self, b, result) -> None:
        pass  # rank 1 closes the upper's segments

    def use_deltas(self, block_beyond: int) -> None:
        """Train M_I on returned gradients: every one that has arrived, and by waiting while more than
        `block_beyond` ticks are outstanding."""
        while self.awaiting:
            message, buf, work, t, _ = self.awaiting[0]
            if len(self.awaiting) > block_beyond:
                self.p2p.wait(work, f"the upper's gradient for the state sent at step {t}")
            elif not work.is_completed():
                break
            self.awaiting.popleft()
            self.iface.learn({"message": message}, None, {"message": buf}, message.shape[0])
        self.p2p.settle(4 * self.depth + 8, "a send to rank 1")

    def drain(self) -> None:
        """At the end (collective with UpperWorker.drain): learn from the gradients of every segment rank 1 has
        closed; the ticks of its open segment get an answer that is not learned from."""
        self._upper_segment()
        for _, _, work, t, _ in self.awaiting:
            self.p2p.wait(work, f"the upper's answer for the state sent at step {t}")
        self.awaiting.clear()
        self.p2p.flush()

    def _upper_segment(self) -> dict:
        """Rank 1's open segment (UpperWorker.share_segment): learn from the gradients of the segments closed
        before it, so that the ticks still waiting are its own; returns it in the one-process layout."""
        header = torch.empty(6, dtype=torch.float64)
        self.p2p.recv(header, 1, "the upper core's open segment", tag=TAG_SEGMENT)
        started, open_ticks, updates, loss_sum, loss_n, b = header.tolist()
        start = None
        if started:
            start = [torch.empty_like(s) for s in self.upper.core.init_state(int(b), device=self._device())]
            for s in start:
                self.p2p.recv(s, 1, "the upper core's state at its segment's start", tag=TAG_SEGMENT)
        self.use_deltas(block_beyond=int(open_ticks))
        ticks = [{"message": m, "target": y, "time": t} for m, _, _, t, y in self.awaiting]
        return {"start": start, "ticks": ticks, "updates": int(updates), "loss": [loss_sum, int(loss_n)]}

    # ---------------------------------------------------------------- checkpoints
    def share_segment(self) -> None:
        """Before a checkpoint, collective with UpperWorker.share_segment: the upper's open segment, for
        state_dict ([Note: hierarchical checkpoints])."""
        self.segment_state = self._upper_segment()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.segment_state is not None:
            state["upper"] = self.segment_state
        return state

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint of two ranks or of one process: the ticks of the upper's open segment wait for their
        gradients again."""
        super().load_state_dict(state)
        for tick in upper_part(state)["ticks"]:
            self._await(tick["message"].to(self._device()), int(tick["time"]), tick["target"])


# --------------------------------------------------------------------------- rank 1: the upper core
class UpperWorker:
    """Runs the upper core on the messages from rank 0, on its clock's ticks."""

    def __init__(self, program, timeout: timedelta):
        self.program, self.upper, self.timeout = program, program.upper, timeout
        spec = program.spec
        opt_cfg, clock_cfg = program.stage_configs[1]
        self.stage = StageState(1, program.stage_parameters(1), opt_cfg, clock_cfg, spec.where("stages"))
        self.segment = UpperSegment(program.upper, get_step_loss(spec.loss, spec.where("loss")))
        self.time, self.batch = 0, 0
        self.p2p = P2P(1, "upper core", timeout, emulated_link(spec.distributed))

    def step(self, y: torch.Tensor, length: int, batch: int, start: bool) -> None:
        """Mirror one chunk of the stream: receive on the ticks, learn at the ends of the upper's segments."""
        u, seg = self.upper, self.segment
        self.batch = batch
        if start:
            if seg.ticks:
                self._end_segment()
            seg.reset()
            self.time = 0
        for j in range(length):
            t = self.time + j
            if not self.stage.tick(t):
                continue
            seg.begin(batch)
            message = torch.empty(batch, self._width(), dtype=self._dtype())
            self.p2p.recv(message, 0, f"the lower core's state at step {t}", tag=TAG_MESSAGE)
            seg.tick(message.requires_grad_(True), y[:, j : j + u.horizon], t)
            if len(seg.ticks) >= u.config.truncation:
                self._end_segment()
        self.time += length

    def _end_segment(self) -> None:
        self.stage.zero_grad()
        self.p2p.send(self.segment.backward(), 0, tag=TAG_DELTA)
        self.stage.step()
        self.segment.close()
        self.p2p.settle(64, "a send to rank 0")

    def _width(self) -> int:
        core = self.program.core
        with torch.no_grad():
            return int(core.step_output(core.init_state(1)).shape[1])

    def _dtype(self):
        p = next(iter(self.program.core.module.parameters()))
        return p.dtype

    def drain(self) -> None:
        """At the end (collective with LowerRuntime.drain): the open segment's ticks are answered with zeros,
        which rank 0 does not learn from."""
        self.share_segment()
        self.p2p.send([torch.zeros_like(m) for _, m, _, _ in self.segment.ticks], 0, tag=TAG_DELTA)
        self.p2p.flush()

    def share_segment(self) -> None:
        """The open segment's size, start state and statistics, to rank 0 (LowerRuntime._upper_segment)."""
        seg = self.segment
        started = seg.start is not None
        header = [started, len(seg.ticks), seg.updates, seg.loss_sum, seg.loss_n, self.batch]
        self.p2p.send([torch.tensor(header, dtype=torch.float64), *(seg.start if started else [])], 0, tag=TAG_SEGMENT)
        self.p2p.flush()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Stage 1's state; rank 0 writes the open segment ([Note: hierarchical checkpoints])."""
        return {"stages": {1: self.stage.state_dict()}}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint of two ranks or of one process: stage 1, the stream's time and the upper's open segment,
        run again from its start ([Note: open upper segment])."""
        self.stage.load_state_dict(state["stages"][1])
        self.time = state["time"]
        self.segment.load_state_dict(upper_part(state))


# --------------------------------------------------------------------------- parameters and statistics
def _upper_params(program) -> list[torch.Tensor]:
    return [p for p in program.stage_parameters(1)]


def send_upper(program) -> None:
    for p in _upper_params(program):
        dist.send(p.detach().contiguous(), 0, tag=TAG_PARAMS)


def recv_upper(program) -> None:
    for p in _upper_params(program):
        buf = torch.empty_like(p)
        dist.recv(buf, 1, tag=TAG_PARAMS)
        with torch.no_grad():
            p.copy_(buf)
