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

from .bptt import BPTTRuntime, _Stats

TAG_MESSAGE, TAG_DELTA, TAG_PARAMS, TAG_STATS = 11, 12, 13, 14


# --------------------------------------------------------------------------- rank 0: the lower core
class LowerRuntime(BPTTRuntime):
    """The local runtime with the upper core replaced by messages to rank 1."""

    def __init__(self, program, timeout: timedelta):
        super().__init__(program)
        self.timeout = timeout
        self.depth = max(program.spec.distributed.queue_depth, program.upper.config.truncation)
        self.awaiting: deque = deque()  # (h_t detached, delta buffer, irecv work, time)
        self.sends: deque = deque()
        self.istats = _Stats()

    def _wait(self, work, what: str) -> None:
        try:
            work.wait(self.timeout)
        except Exception as e:
            raise RuntimeError(
                f"rank 0 (lower core) timed out or failed waiting for {what} after "
                f"{self.timeout.total_seconds():.0f}s: {e}"
            ) from None

    def _upper_forward(self, out, target, a, b, roots, grads, result, istats) -> list:
        scale = self.upper.config.synthetic_gradient.scale
        for j in range(out.shape[1]):
            t = self.time + j
            if not self.clocks[1].tick(t):
                continue
            result.upper_ticks.append(t)
            h = out[:, j]
            message = h.detach().contiguous()
            self.sends.append((dist.isend(message, 1, tag=TAG_MESSAGE), message))
            with torch.no_grad():
                g = self.iface(message)
            roots.append(h)
            grads.append(g * (scale / b))
            buf = torch.empty_like(message)
            self.awaiting.append((message, buf, dist.irecv(buf, 1, tag=TAG_DELTA), t))
        return []

    def _upper_backward(self, ticks, b, istats, result) -> None:
        self.use_deltas(block_beyond=self.depth)

    def _flush_upper(self, b, istats, result) -> None:
        pass  # rank 1 closes the upper's segments

    def use_deltas(self, block_beyond: int) -> None:
        """Train M_I on returned gradients: every one that has arrived, and by waiting while more than
        `block_beyond` ticks are outstanding."""
        while self.awaiting:
            message, buf, work, t = self.awaiting[0]
            if len(self.awaiting) > block_beyond:
                self._wait(work, f"the upper's gradient for the state sent at step {t}")
            elif not work.is_completed():
                break
            self.awaiting.popleft()
            self._learn(self.iface, self.iface_opt, message, buf, message.shape[0], self.istats)
        while len(self.sends) > 4 * self.depth + 8:
            work, _ = self.sends.popleft()
            self._wait(work, "a send to rank 1")

    def drain(self) -> None:
        self.use_deltas(block_beyond=0)
        while self.sends:
            work, _ = self.sends.popleft()
            self._wait(work, "a send to rank 1")


# --------------------------------------------------------------------------- rank 1: the upper core
class UpperWorker:
    """Runs the upper core on the messages from rank 0, on its clock's ticks."""

    def __init__(self, program, timeout: timedelta):
        from ..clock import Clock
        from ..losses import get_step_loss
        from ..optim import build_optimizer

        self.program, self.upper, self.timeout = program, program.upper, timeout
        spec = program.spec
        opt_cfg, clock_cfg = program.stage_configs[1]
        self.optimizer, self.scheduler = build_optimizer(program.stage_parameters(1), opt_cfg, spec.where("stages"))
        self.clock = Clock(clock_cfg, 1)
        self.loss_fn = get_step_loss(spec.loss, spec.where("loss"))
        self.state = None
        self.segment: list = []  # (weighted loss, message leaf)
        self.time = 0
        self.updates: list[int] = []
        self.loss_sum, self.loss_n = 0.0, 0
        self.sends: deque = deque()

    def _wait(self, work, what: str) -> None:
        try:
            work.wait(self.timeout)
        except Exception as e:
            raise RuntimeError(
                f"rank 1 (upper core) timed out or failed waiting for {what} after "
                f"{self.timeout.total_seconds():.0f}s: {e}"
            ) from None

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
            if not self.clock.tick(t):
                continue
            message = torch.empty(batch, self._width(), dtype=self._dtype())
            self._wait(dist.irecv(message, 0, tag=TAG_MESSAGE), f"the lower core's state at step {t}")
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
        self.optimizer.zero_grad(set_to_none=True)
        torch.stack([loss for loss, _ in self.segment]).sum().backward()
        for _, message in self.segment:
            delta = message.grad if message.grad is not None else torch.zeros_like(message)
            delta = delta.detach().contiguous()
            self.sends.append((dist.isend(delta, 0, tag=TAG_DELTA), delta))
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.updates.append(t if t is not None else self.time)
        self.segment = []
        self.state = tuple(s.detach() for s in self.state)
        while len(self.sends) > 64:
            work, _ = self.sends.popleft()
            self._wait(work, "a send to rank 0")

    def _width(self) -> int:
        core = self.program.core
        with torch.no_grad():
            return int(core.step_output(core.init_state(1)).shape[1])

    def _dtype(self):
        p = next(iter(self.program.core.module.parameters()))
        return p.dtype

    def drain(self) -> None:
        while self.sends:
            work, _ = self.sends.popleft()
            self._wait(work, "a send to rank 0")


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
