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
"""

from __future__ import annotations

from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

from ..losses import get_step_loss
from .bptt import BPTTRuntime
from .state import StageState
from .transport import P2P, emulated_link

TAG_MESSAGE, TAG_DELTA, TAG_PARAMS, TAG_STATS = 11, 12, 13, 14


# --------------------------------------------------------------------------- rank 0: the lower core
class LowerRuntime(BPTTRuntime):
    """The local runtime with the upper core replaced by messages to rank 1."""

    def __init__(self, program, timeout: timedelta):
        super().__init__(program)
        self.timeout = timeout
        self.depth = max(program.spec.distributed.queue_depth, program.upper.config.truncation)
        self.awaiting: deque = deque()  # (h_t detached, delta buffer, irecv work, time)
        self.p2p = P2P(0, "lower core", timeout, emulated_link(program.spec.distributed))

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
            buf = torch.empty_like(message)
            self.awaiting.append((message, buf, self.p2p.irecv(buf, 1, tag=TAG_DELTA), t))
        return []

    def _upper_backward(self, ticks, b, result) -> None:
        self.use_deltas(block_beyond=self.depth)

    def _flush_upper(self, b, result) -> None:
        pass  # rank 1 closes the upper's segments

    def use_deltas(self, block_beyond: int) -> None:
        """Train M_I on returned gradients: every one that has arrived, and by waiting while more than
        `block_beyond` ticks are outstanding."""
        while self.awaiting:
            message, buf, work, t = self.awaiting[0]
            if len(self.awaiting) > block_beyond:
                self.p2p.wait(work, f"the upper's gradient for the state sent at step {t}")
            elif not work.is_completed():
                break
            self.awaiting.popleft()
            self.iface.learn({"message": message}, None, {"message": buf}, message.shape[0])
        self.p2p.settle(4 * self.depth + 8, "a send to rank 1")

    def drain(self) -> None:
        self.use_deltas(block_beyond=0)
        self.p2p.flush()


# --------------------------------------------------------------------------- rank 1: the upper core
class UpperWorker:
    """Runs the upper core on the messages from rank 0, on its clock's ticks."""

    def __init__(self, program, timeout: timedelta):
        self.program, self.upper, self.timeout = program, program.upper, timeout
        spec = program.spec
        opt_cfg, clock_cfg = program.stage_configs[1]
        self.stage = StageState(1, program.stage_parameters(1), opt_cfg, clock_cfg, spec.where("stages"))
        self.loss_fn = get_step_loss(spec.loss, spec.where("loss"))
        self.state = None
        self.segment: list = []  # (weighted loss, message leaf)
        self.time = 0
        self.updates: list[int] = []
        self.loss_sum, self.loss_n = 0.0, 0
        self.p2p = P2P(1, "upper core", timeout, emulated_link(spec.distributed))

    def step(self, y: torch.Tensor, length: int, batch: int, start: bool) -> None:
        """Mirror one chunk of the stream: receive on the ticks, learn at the ends of the upper's segments."""
        u = self.upper
        if start:
            if self.segment:
                self._end_segment()
            self.state, self.time = None, 0
        if self.state is None:
            self.state = u.core.init_state(batch)
        for j in range(length):
            t = self.time + j
            if not self.stage.tick(t):
                continue
            message = torch.empty(batch, self._width(), dtype=self._dtype())
            self.p2p.recv(message, 0, f"the lower core's state at step {t}", tag=TAG_MESSAGE)
            message.requires_grad_(True)
            pred, self.state = u.step(message, self.state)
            tgt = y[:, j : j + u.horizon]
            n = tgt.shape[1]
            if n == 0:
                per = pred.sum() * 0.0
            else:
                per = self.loss_fn(pred[:, :n], tgt).sum(1).mean() / u.horizon
                self.loss_sum += float(per.detach()) * u.horizon / n
                self.loss_n += 1
            self.segment.append((u.config.loss_weight * per, message))
            if len(self.segment) >= u.config.truncation:
                self._end_segment(t)
        self.time += length

    def _end_segment(self, t: int | None = None) -> None:
        self.stage.zero_grad()
        torch.stack([loss for loss, _ in self.segment]).sum().backward()
        for _, message in self.segment:
            delta = message.grad if message.grad is not None else torch.zeros_like(message)
            self.p2p.send([delta], 0, tag=TAG_DELTA)
        self.stage.step()
        self.updates.append(t if t is not None else self.time)
        self.segment = []
        self.state = tuple(s.detach() for s in self.state)
        self.p2p.settle(64, "a send to rank 0")

    def _width(self) -> int:
        core = self.program.core
        with torch.no_grad():
            return int(core.step_output(core.init_state(1)).shape[1])

    def _dtype(self):
        p = next(iter(self.program.core.module.parameters()))
        return p.dtype

    def drain(self) -> None:
        self.p2p.flush()


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
