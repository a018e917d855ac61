"""The point-to-point transport of the distributed runtimes: sends, receives and waits over torch.distributed.

[Note: waits and bounded sends] Every wait has the run's timeout, so a rank whose peer died or hangs fails
within it with a `PeerError` (which names what it waited for) instead of hanging; launchers tell such
failures apart from a rank's own failure by this type, not by the message text. Sends are non-blocking: a
rank posts `isend` and goes on; the tensor is kept alive until its send completes, and once more than `keep`
sends are in flight the oldest are waited for, which bounds memory and how far a rank can run ahead.
Receives are posted early where the schedule knows what comes next (`irecv` returns the work to wait on).
"""

from __future__ import annotations

from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist


class PeerError(RuntimeError):
    """A wait on another rank timed out or failed: the cause is probably that rank, not this one."""


class P2P:
    """Point-to-point messages of one rank, with one timeout for every wait and a queue of sends in flight."""

    def __init__(self, rank: int, who: str, timeout: timedelta) -> None:
        self.rank, self.who, self.timeout = rank, who, timeout
        self.sends: deque = deque()  # (work, tensor kept alive until the send completes)

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
            self.sends.append((dist.isend(t, dst, tag=tag), t))
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
