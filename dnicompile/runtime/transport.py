"""The point-to-point transport of the distributed runtimes: sends, receives and waits over torch.distributed.

[Note: waits and bounded sends] Every wait has the run's timeout, so a rank whose peer died or hangs fails
within it with a `PeerError` (which names what it waited for) instead of hanging; launchers tell such
failures apart from a rank's own failure by this type, not by the message text. Sends are non-blocking: a
rank posts `isend` and goes on; the tensor is kept alive until its send completes, and once more than `keep`
sends are in flight the oldest are waited for, which bounds memory and how far a rank can run ahead.
Receives are posted early where the schedule knows what comes next (`irecv` returns the work to wait on).

[Note: link emulation] With `distributed: {link: {latency_ms: L, bandwidth_mb_s: B}}` every point-to-point
message of the runtime (activations, gradients, statistics) is delivered as a link with that latency and
bandwidth would deliver it, for experiments on one machine. The sender does not wait: `send` hands the tensor
to an `EmulatedLink`, whose thread posts the real `isend` at the delivery time, when the transfer over this
machine's loopback is short next to L. Each direction of each link carries one message at a time, so a message
starts when the link is free and is delivered at start + size / B + L (for a lone message: send time + L +
size / B). Collectives (tied weights, the agreed stop) are not delayed.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import Counter, deque
from datetime import timedelta

import torch
import torch.distributed as dist


class PeerError(RuntimeError):
    """A wait on another rank timed out or failed: the cause is probably that rank, not this one."""


class _LateSend:
    """A send that an EmulatedLink posts at its delivery time; waits like the work of an isend."""

    def __init__(self) -> None:
        self.posted = threading.Event()
        self.work = None
        self.error: BaseException | None = None

    def wait(self, timeout: timedelta | None = None) -> bool:
        if not self.posted.wait(None if timeout is None else timeout.total_seconds()):
            raise RuntimeError("the emulated link did not deliver the message in time")
        if self.error is not None:
            raise self.error
        return self.work.wait(timeout) if timeout is not None else self.work.wait()

    def is_completed(self) -> bool:
        return self.posted.is_set() and (self.error is not None or self.work.is_completed())


class EmulatedLink:
    """Delays the sends of one rank as links with `latency_s` and `bandwidth` (bytes/s, None: unlimited) would
    ([Note: link emulation]); `clock` and `post(tensor, dst, tag) -> work` are replaceable for tests."""

    def __init__(self, latency_s: float, bandwidth: float | None, post=None, clock=time.monotonic) -> None:
        self.latency_s, self.bandwidth = latency_s, bandwidth
        self.post = post or (lambda t, dst, tag: dist.isend(t, dst, tag=tag))
        self.clock = clock
        self.free: dict[int, float] = {}  # destination -> when its link is free to start the next message
        self.queue: list = []  # heap of (delivery time, sequence, tensor, dst, tag, _LateSend)
        self.order = itertools.count()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def delivery(self, nbytes: int, dst: int, now: float) -> float:
        """When a message of `nbytes` handed over at `now` reaches `dst`; reserves the link for its transfer."""
        start = max(now, self.free.get(dst, now))
        transfer = nbytes / self.bandwidth if self.bandwidth else 0.0
        self.free[dst] = start + transfer
        return start + transfer + self.latency_s

    def send(self, t: torch.Tensor, dst: int, tag: int = 0) -> _LateSend:
        late = _LateSend()
        with self.cond:
            due = self.delivery(t.numel() * t.element_size(), dst, self.clock())
            heapq.heappush(self.queue, (due, next(self.order), t, dst, tag, late))
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="dnicompile-link", daemon=True)
                self.thread.start()
            self.cond.notify()
        return late

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue or self.queue[0][0] > self.clock():
                    self.cond.wait(None if not self.queue else self.queue[0][0] - self.clock())
                _, _, t, dst, tag, late = heapq.heappop(self.queue)
            try:
                if t.is_cuda:
                    with torch.cuda.device(t.device):
                        late.work = self.post(t, dst, tag)
                else:
                    late.work = self.post(t, dst, tag)
            except BaseException as e:  # the sender sees it when it waits for this send
                late.error = e
            late.posted.set()


def emulated_link(config) -> EmulatedLink | None:
    """The EmulatedLink of a spec's `distributed.link`, or None where it is off."""
    link = getattr(config, "link", None)
    if link is None or (not link.latency_ms and not link.bandwidth_mb_s):
        return None
    return EmulatedLink(link.latency_ms / 1e3, link.bandwidth_mb_s * 1e6 if link.bandwidth_mb_s else None)


class P2P:
    """Point-to-point messages of one rank, with one timeout for every wait and a queue of sends in flight;
    `link` (an EmulatedLink) delays every send as a slower network would."""

    def __init__(self, rank: int, who: str, timeout: timedelta, link: EmulatedLink | None = None) -> None:
        self.rank, self.who, self.timeout = rank, who, timeout
        self.link = link
        self.sends: deque = deque()  # (work, tensor kept alive until the send completes)
        self.messages: Counter = Counter()  # destination rank -> tensors sent to it (each an isend)
        self.bytes: Counter = Counter()  # destination rank -> bytes sent to it

    def wait(self, work, what: str) -> None:
        try:
            work.wait(self.timeout)
        except Exception as e:
            raise PeerError(
                f"rank {self.rank} ({self.who}) timed out or failed waiting for {what} after "
                f"{self.timeout.total_seconds():.0f}s: {e}"
            ) from None

    def send(self, tensors, dst: int, tag: int = 0, keep: int | None = None) -> None:
        """isend each tensor to `dst`; then wait for the oldest sends while more than `keep` are in flight."""
        for t in tensors:
            t = t.detach().contiguous()
            self.messages[dst] += 1
            self.bytes[dst] += t.numel() * t.element_size()
            if self.link is not None:
                t = t.clone()  # the caller may reuse its memory before the late send is posted
            self.sends.append((self.link.send(t, dst, tag) if self.link else dist.isend(t, dst, tag=tag), t))
        if keep is not None:
            self.settle(keep, f"a send to rank {dst}")

    def settle(self, keep: int, what: str = "a send") -> None:
        while len(self.sends) > keep:
            work, _ = self.sends.popleft()
            self.wait(work, what)

    def flush(self) -> None:
        """Wait for every send in flight."""
        self.settle(0)

    def irecv(self, buf: torch.Tensor, src: int, tag: int = 0):
        return dist.irecv(buf, src, tag=tag)

    def recv(self, buf: torch.Tensor, src: int, what: str, tag: int = 0) -> torch.Tensor:
        self.wait(dist.irecv(buf, src, tag=tag), what)
        return buf
