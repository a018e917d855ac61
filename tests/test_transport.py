"""The link emulation of the distributed runtime's transport ([Note: link emulation]): delivery times worked by
hand, on the emulator itself with a fake clock, then in real time (a message is posted no sooner than its latency
and not much later, and the sender does not wait). That the delay holds through gloo between two processes, and that
a run over a slow link trains exactly as one without it, is in tests/test_distributed_api.py."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch

from dnicompile.runtime.transport import EmulatedLink, emulated_link
from dnicompile.spec import DistributedConfig


def test_delivery_times_worked_by_hand():
    # 10 ms latency, 1000 bytes/s: a message of 100 bytes takes 0.1 s on the link, then 0.01 s to arrive
    link = EmulatedLink(0.010, 1000.0, post=lambda *a: None)
    assert link.delivery(100, dst=1, now=0.0) == 0.11
    # the link to rank 1 is busy until 0.1: the next message starts then, 0.2 s of transfer
    assert abs(link.delivery(200, dst=1, now=0.05) - 0.31) < 1e-12
    # another destination has its own link
    assert abs(link.delivery(100, dst=2, now=0.05) - 0.16) < 1e-12
    # once the link is idle, a message waits only for itself: send time + latency + size / bandwidth
    assert abs(link.delivery(50, dst=1, now=1.0) - 1.06) < 1e-12
    unlimited = EmulatedLink(0.5, None, post=lambda *a: None)
    assert unlimited.delivery(10**9, dst=1, now=2.0) == 2.5


class _Work:
    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True


def test_messages_are_posted_after_their_latency_in_order_without_blocking_the_sender():
    posted = []
    lock = threading.Lock()

    def post(t, dst, tag):
        with lock:
            posted.append((time.monotonic(), int(t[0]), dst, tag))
        return _Work()

    latency = 0.2
    link = EmulatedLink(latency, None, post=post)
    sent, handles = [], []
    for i in range(5):
        start = time.monotonic()
        handles.append(link.send(torch.tensor([i]), dst=1, tag=3))
        sent.append(start)
        assert time.monotonic() - start < 0.05  # handing a message over does not wait for its delivery
        time.sleep(0.01)
    for h in handles:
        h.wait(timedelta(seconds=10))
        assert h.is_completed()
    assert [p[1] for p in posted] == [0, 1, 2, 3, 4]  # the order of the sends
    assert all(p[2:] == (1, 3) for p in posted)
    for (at, *_), start in zip(posted, sent):
        assert latency <= at - start < latency + 0.5  # the tolerance a loaded machine needs


def test_a_failed_post_reaches_the_sender():
    def post(t, dst, tag):
        raise RuntimeError("peer gone")

    handle = EmulatedLink(0.0, None, post=post).send(torch.zeros(1), dst=1)
    try:
        handle.wait(timedelta(seconds=10))
    except RuntimeError as e:
        assert "peer gone" in str(e)
    else:
        raise AssertionError("the failure of the late send was lost")


def test_the_spec_turns_it_on():
    assert emulated_link(DistributedConfig()) is None
    link = emulated_link(DistributedConfig(link={"latency_ms": 10, "bandwidth_mb_s": 100}))
    assert link.latency_s == 0.01 and link.bandwidth == 1e8
    assert emulated_link(DistributedConfig(link={"latency_ms": 0})) is None
