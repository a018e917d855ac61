"""Event simulation of training steps on S pipeline stages (issue 17, item 3; BENCHMARKS.md, "Schedule simulator").

Contenders (`KINDS`):

  gpipe      torch.distributed.pipelining's ScheduleGPipe with M microbatches: every forward, then every
             backward; the sends' completion awaited as that code awaits it; then the gradients divided by M
             (its `scale_grads`) and the optimizer step.
  1f1b       Schedule1F1B: on rank r a warm-up of min(M, S - r) forwards, then backward / forward pairs, then the
             remaining backwards (the same order of work as "S - 1 - r forwards, then one forward one backward,
             then cool-down"); a send is fired with the next receive and both awaited, as in torch's code.
  exact      dnicompile's distributed runtime with exact cuts, no microbatches: rank r receives h, runs its
             forward, sends h on, waits for the true gradient, runs its backward, sends the gradient of its
             input back, then steps its optimizer. The ranks take turns.
  synthetic  (cDNI) rank r runs forward, sends h, predicts the gradient with the synthesizer, runs backward and
             steps: it never waits for the next rank. The true gradient comes back later and trains the
             synthesizer (one `learn` each, as soon as it has arrived, checked at the end of each step); the rank
             waits for the oldest only when more than `queue_depth` batches are owed one.
  delayed    rank r runs the forward of batch t (with stashed weights), sends h_t, then runs the backward of batch
             t - delay with the true gradient of that batch, waiting for it only if it has not come yet, and steps.
             (Across several delayed cuts the delays add: rank r uses batch t - delay * (S - 1 - r), as the
             runtime's `lag`.) Before a first gradient is due it neither runs a backward nor steps.
  local      an auxiliary head on h trains rank r (its forward, backward and step are `synth`); nothing is sent
             back, the rank after a local cut computes no gradient for its input, and no rank waits for the next.

What the model holds to (and what it leaves out):

- A rank computes one thing at a time: its forwards, backwards, optimizer steps, synthesizer and head work and
  per-step overheads run one after another on its own core. Ranks do not slow each other down (no shared
  cores, caches or memory bandwidth; measured for S = 2 on this machine in the `measure` part).
- A message from rank a to b sent at time s arrives at max(s + latency, posted, link free) + bytes / bandwidth:
  the latency first (as dnicompile's link emulation does: it posts the real send at s + latency), then the bytes,
  which move only once the receiver has posted its receive (`rendezvous`, the default, as gloo does; measured:
  a 1 MB receive posted late waits for the whole transfer) and once the link's direction is free. A link carries
  one message at a time in each direction (a -> b and b -> a are separate); the latency does not occupy it.
  Sends do not block the sender; a send "completes" when its message has arrived, and only the schedules that
  wait for a send's completion (torch's, dnicompile's bound of sends in flight) wait for it.
- dnicompile posts the receive of the next batch's activations as soon as the current one has arrived, and the
  receive of a true gradient when it sends h; torch's schedules post each receive right before they wait for it.
- Every per-stage time is a constant (no noise): forward, backward, optimizer step, per-step overhead (drawing
  the batch, the runtime's Python), per-microbatch overhead, the decoupled cut's extra work.
- Steady-state throughput is measured on the last rank (the driver, whose metrics throughput.py reads): samples
  between two step ends in the middle of the run over the time between them, so fill and drain are left out.

The simulation core (everything above `# measure`) is pure Python. Subcommands:

  python benchmarks/schedule_sim.py measure     per-stage times of examples/wide_mlp.py, the boundary bytes and
                                                the gloo link on this machine -> results/schedule_sim_inputs.json
  python benchmarks/schedule_sim.py validate    predicted against measured throughput at S = 2 (throughput.py's
                                                runs) -> results/schedule_sim_validation.json
  python benchmarks/schedule_sim.py predict     S = 2 ... 64, latency 0 ... 50 ms -> results/schedule_sim_*.json/png
  python benchmarks/schedule_sim.py timeline    print one simulated timeline
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):  # dnicompile and throughput.py, run from anywhere
    if _p not in sys.path:
        sys.path.insert(0, _p)
RESULTS = ROOT / "benchmarks" / "results"
INPUTS = RESULTS / "schedule_sim_inputs.json"
KINDS = ("gpipe", "1f1b", "exact", "synthetic", "delayed", "local", "mb_gpipe", "mb_1f1b")


# =========================================================================== inputs
@dataclass(frozen=True)
class Link:
    """Every link between neighbouring ranks: one-way latency (s) and bandwidth (bytes/s)."""

    latency_s: float = 0.0
    bandwidth_Bps: float = math.inf

    def transfer(self, nbytes: float) -> float:
        return nbytes / self.bandwidth_Bps if self.bandwidth_Bps != math.inf else 0.0


@dataclass
class StageTimes:
    """Seconds of one stage (the work of one rank). Microbatch times default to the batch's divided by M."""

    fwd: float  # forward of one batch (the last stage: with the loss)
    bwd: float  # backward of one batch (with the gradient of its input where it has an input)
    opt: float = 0.0  # optimizer step (and clearing the gradients)
    overhead: float = 0.0  # per training step: drawing the batch, the runtime's own Python
    fwd_mb: float | None = None  # forward of one microbatch
    bwd_mb: float | None = None  # backward of one microbatch (accumulating into the gradients)
    mb_overhead: float = 0.0  # per microbatch forward or backward: the schedule's Python, splitting the batch
    grad_scale: float = 0.0  # torch pipelining: dividing the accumulated gradients by M
    synth: float = 0.0  # the decoupled cut after this stage, per step (see below)
    learn: float = 0.0  # synthetic: the synthesizer learning from one true gradient
    bwd_no_input: float | None = None  # backward without the gradient of its input (behind a local cut)
    # `synth`: synthetic: M(h, c) and the synthetic gradient; local: the head's forward, backward and step;
    # delayed: what the kept forward and the delayed backward cost beyond fwd + bwd (weight stash, the
    # stale-fresh cosine's extra forward and backward every 10th step)


@dataclass
class Event:
    rank: int
    what: str  # "F", "B", "opt", "synth", "learn", "overhead", "scale"
    step: int
    mb: int
    start: float
    end: float


@dataclass
class Result:
    kind: str
    events: list[Event]
    step_end: list[list[float]]  # per rank, the time each step ended
    batch: int
    first: int = 0  # the steady-state window: step ends first .. last of the last rank
    last: int = 0
    messages: dict = field(default_factory=dict)  # key -> (sent, posted, arrival)

    @property
    def step_time(self) -> float:
        ends = self.step_end[-1]
        return (ends[self.last] - ends[self.first]) / (self.last - self.first)

    @property
    def throughput(self) -> float:
        """Samples/s in steady state, on the last rank."""
        return self.batch / self.step_time

    def timeline(self, rank: int | None = None, step: int | None = None) -> list[tuple]:
        """(rank, what, step, mb, start, end) of the compute events, by start time."""
        out = [
            (e.rank, e.what, e.step, e.mb, e.start, e.end)
            for e in self.events
            if (rank is None or e.rank == rank) and (step is None or e.step == step)
        ]
        return sorted(out, key=lambda t: (t[4], t[0]))


# =========================================================================== the engine
class _Msg:
    __slots__ = ("src", "dst", "nbytes", "sent", "posted", "arrival")

    def __init__(self) -> None:
        self.src = self.dst = -1
        self.nbytes = 0.0
        self.sent: float | None = None
        self.posted: float | None = None
        self.arrival: float | None = None


class Engine:
    """Runs one generator per rank. A generator yields operations (tuples):

    ("compute", what, seconds, step, mb)   busy for `seconds`
    ("send", dst, key, nbytes)             post a send (does not block)
    ("post", key)                          post the receive of message `key`
    ("wait", key)                          wait until message `key` has arrived (posting its receive now if not yet)
    ("sendwait", key)                      wait until this rank's message `key` has arrived at its destination
    ("poll", key)                          -> True if message `key` has arrived by now (the receive is posted)
    ("mark", step)                         the end of a training step

    Ranks run in order of their simulated time (a heap), so when a rank polls at time t every message that will
    ever be sent at or before t has been sent."""

    def __init__(self, link: Link, rendezvous: bool = True, cores: int | None = None, background: float = 0.0) -> None:
        self.link, self.rendezvous = link, rendezvous
        self.cores, self.background = cores, background
        self.busy: dict = {}  # cores given: rank -> [work left, version, what, step, mb, start]
        self.busy_t = 0.0  # when the work left was last brought up to date
        self.version = 0
        self.msgs: dict = defaultdict(_Msg)
        self.link_free: dict = defaultdict(float)
        self.waiters: dict = defaultdict(list)  # key -> ranks blocked on it
        self.heap: list = []
        self.seq = 0
        self.events: list[Event] = []

    def _push(self, t: float, rank: int, version: int = -1) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, rank, version))

    # processor sharing: with `cores` given, the computing ranks and `background` other busy processes share the
    # cores equally; each computing rank runs at min(1, cores / (computing ranks + background)) of a core
    def _rate(self) -> float:
        return min(1.0, self.cores / (len(self.busy) + self.background))

    def _update(self, t: float) -> None:
        if self.busy:
            done = (t - self.busy_t) * self._rate()
            for job in self.busy.values():
                job[0] -= done
        self.busy_t = t

    def _reschedule(self, t: float) -> None:
        rate = self._rate() if self.busy else 1.0
        for r, job in self.busy.items():
            self.version += 1
            job[1] = self.version
            self._push(t + max(0.0, job[0]) / rate, r, self.version)

    def _deliver(self, key) -> None:
        m = self.msgs[key]
        if m.arrival is not None or m.sent is None or m.posted is None:
            return
        # the latency first (dnicompile's link emulation posts the real send at sent + latency), then the bytes,
        # once the receive is posted (rendezvous) and the link's direction is free
        start = m.sent + self.link.latency_s
        if self.rendezvous:
            start = max(start, m.posted)
        start = max(start, self.link_free[(m.src, m.dst)])
        m.arrival = start + self.link.transfer(m.nbytes)
        self.link_free[(m.src, m.dst)] = m.arrival
        for r in self.waiters.pop(key, []):
            self._push(m.arrival, r)

    def run(self, programs: list) -> tuple[list[list[float]], dict]:
        gens = list(programs)
        marks: list[list[float]] = [[] for _ in gens]
        done = [False] * len(gens)
        for r in range(len(gens)):
            self._push(0.0, r)
        while self.heap:
            t, _, r, version = heapq.heappop(self.heap)
            if version >= 0:  # a shared-core computation: finished now, unless rescheduled since
                job = self.busy.get(r)
                if job is None or job[1] != version:
                    continue
                self._update(t)
                del self.busy[r]
                self.events.append(Event(r, job[2], job[3], job[4], job[5], t))
                self._reschedule(t)
            value = None
            while True:
                try:
                    op = gens[r].send(value)
                except StopIteration:
                    done[r] = True
                    break
                value = None
                kind = op[0]
                if kind == "compute":
                    _, what, dur, step, mb = op
                    if dur > 0 and self.cores is not None:
                        self._update(t)
                        self.busy[r] = [dur, 0, what, step, mb, t]
                        self._reschedule(t)
                        break
                    if dur > 0:
                        self.events.append(Event(r, what, step, mb, t, t + dur))
                        self._push(t + dur, r)
                        break
                elif kind == "send":
                    _, dst, key, nbytes = op
                    m = self.msgs[key]
                    m.src, m.dst, m.nbytes, m.sent = r, dst, nbytes, t
                    self._deliver(key)
                elif kind == "post":
                    m = self.msgs[op[1]]
                    if m.posted is None:
                        m.posted = t
                        self._deliver(op[1])
                elif kind in ("wait", "sendwait"):
                    key = op[1]
                    m = self.msgs[key]
                    if kind == "wait" and m.posted is None:
                        m.posted = t
                        self._deliver(key)
                    if m.arrival is None:
                        self.waiters[key].append(r)
                        break
                    if m.arrival > t:
                        self._push(m.arrival, r)
                        break
                elif kind == "poll":
                    m = self.msgs[op[1]]
                    value = m.arrival is not None and m.arrival <= t
                elif kind == "mark":
                    marks[r].append(t)
                else:
                    raise ValueError(f"unknown operation {op!r}")
        if not all(done):
            stuck = {r: [k for k, rs in self.waiters.items() if r in rs] for r in range(len(gens)) if not done[r]}
            raise RuntimeError(f"deadlock: ranks waiting for {stuck}")
        msgs = {k: (m.sent, m.posted, m.arrival) for k, m in self.msgs.items()}
        return marks, msgs


# =========================================================================== the contenders, one rank each
def _compute(what: str, dur: float, step: int, mb: int = -1):
    return ("compute", what, dur, step, mb)


def _pipe_rank(r: int, S: int, st: StageTimes, M: int, mb_bytes: list[float], steps: int, schedule: str):
    """torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B on rank r, as their code runs."""
    fwd = (st.fwd_mb if st.fwd_mb is not None else st.fwd / M) + st.mb_overhead
    bwd = (st.bwd_mb if st.bwd_mb is not None else st.bwd / M) + st.mb_overhead
    first, last = r == 0, r == S - 1

    def act(step, i):  # h of microbatch i across the cut after rank r
        return ("act", r, step, i)

    def act_in(step, i):
        return ("act", r - 1, step, i)

    def grad(step, i):  # the gradient coming back across the cut after rank r
        return ("grad", r, step, i)

    def grad_out(step, i):  # the gradient this rank sends back across the cut before it
        return ("grad", r - 1, step, i)

    for step in range(steps):
        yield _compute("overhead", st.overhead, step)
        if schedule == "gpipe":
            sends = []
            for i in range(M):
                if not first:
                    yield ("wait", act_in(step, i))
                yield _compute("F", fwd, step, i)
                if not last:
                    yield ("send", r + 1, act(step, i), mb_bytes[r])
                    sends.append(act(step, i))
            for key in sends:
                yield ("sendwait", key)
            sends = []
            for i in range(M):
                if not last:
                    yield ("wait", grad(step, i))
                yield _compute("B", bwd, step, i)
                if not first:
                    yield ("send", r - 1, grad_out(step, i), mb_bytes[r - 1])
                    sends.append(grad_out(step, i))
            for key in sends:
                yield ("sendwait", key)
        else:  # 1f1b, as Schedule1F1B._step_microbatches
            warmup = min(M, S - r)
            f = b = 0
            send_work: list = []
            fwd_sends: list = []
            for _ in range(warmup):
                if not first:
                    yield ("wait", act_in(step, f))
                yield _compute("F", fwd, step, f)
                for key in send_work:
                    yield ("sendwait", key)
                send_work = []
                fwd_sends = [] if last else [(r + 1, act(step, f), mb_bytes[r])]
                if f != warmup - 1:
                    for dst, key, n in fwd_sends:
                        yield ("send", dst, key, n)
                    send_work, fwd_sends = [k for _, k, _ in fwd_sends], []
                f += 1
            while True:
                for dst, key, n in fwd_sends:  # fire the held forward send with the backward's receive
                    yield ("send", dst, key, n)
                if not last:
                    yield ("post", grad(step, b))
                for _, key, _ in fwd_sends:
                    yield ("sendwait", key)
                fwd_sends = []
                if not last:
                    yield ("wait", grad(step, b))
                yield _compute("B", bwd, step, b)
                bwd_sends = [] if first else [(r - 1, grad_out(step, b), mb_bytes[r - 1])]
                b += 1
                if f == M:
                    break
                for dst, key, n in bwd_sends:  # fire the held backward send with the forward's receive
                    yield ("send", dst, key, n)
                if not first:
                    yield ("post", act_in(step, f))
                for _, key, _ in bwd_sends:
                    yield ("sendwait", key)
                if not first:
                    yield ("wait", act_in(step, f))
                yield _compute("F", fwd, step, f)
                fwd_sends = [] if last else [(r + 1, act(step, f), mb_bytes[r])]
                f += 1
            for dst, key, n in bwd_sends:
                yield ("send", dst, key, n)
            send_work = [k for _, k, _ in bwd_sends]
            while b < M:
                if not last:
                    yield ("wait", grad(step, b))
                yield _compute("B", bwd, step, b)
                for key in send_work:
                    yield ("sendwait", key)
                send_work = []
                if not first:
                    yield ("send", r - 1, grad_out(step, b), mb_bytes[r - 1])
                    send_work = [grad_out(step, b)]
                b += 1
            for key in send_work:
                yield ("sendwait", key)
        yield _compute("scale", st.grad_scale, step)
        yield _compute("opt", st.opt, step)
        yield ("mark", step)


def _dni_rank(r: int, S: int, st: StageTimes, kind: str, nbytes: list[float], steps: int, queue_depth: int, delay: int):
    """dnicompile's RankWorker.train_step on rank r, with every cut of `kind`."""
    first, last = r == 0, r == S - 1
    inflight: deque = deque()  # P2P.send: at most 4 * queue_depth sends in flight
    keep = 4 * max(1, queue_depth)
    awaiting: deque = deque()  # synthetic: batches whose true gradient has not been used
    lag = delay * (S - 2 - r) if kind == "delayed" and not last else 0  # later delayed cuts feeding this one

    def send(dst, key, n):
        yield ("send", dst, key, n)
        inflight.append(key)
        while len(inflight) > keep:
            yield ("sendwait", inflight.popleft())

    for step in range(steps):
        yield _compute("overhead", st.overhead, step)
        if not first:
            yield ("wait", ("act", r - 1, step))
            if step + 1 < steps:  # prefetch: the next batch's receive is posted now
                yield ("post", ("act", r - 1, step + 1))
        back = kind != "local"  # whether a gradient goes back across the cut before this rank
        bwd = st.bwd if (first or back or st.bwd_no_input is None) else st.bwd_no_input
        if kind == "delayed" and not last:
            yield _compute("F", st.fwd, step)
            yield from send(r + 1, ("act", r, step), nbytes[r])
            yield ("post", ("grad", r, step))
            due = step - delay - lag
            if due >= 0:
                yield ("wait", ("grad", r, due))
                yield _compute("B", bwd + st.synth, due)
                yield _compute("opt", st.opt, step)
                if not first:
                    yield from send(r - 1, ("grad", r - 1, due), nbytes[r - 1])
            yield ("mark", step)
            continue
        yield _compute("F", st.fwd, step)
        if last:
            yield _compute("B", bwd, step)
        elif kind == "exact":
            yield from send(r + 1, ("act", r, step), nbytes[r])
            yield ("wait", ("grad", r, step))
            yield _compute("B", bwd, step)
        else:
            yield from send(r + 1, ("act", r, step), nbytes[r])
            yield _compute("synth", st.synth, step)
            yield _compute("B", bwd, step)
            if kind == "synthetic":
                yield ("post", ("grad", r, step))
                awaiting.append(step)
        if not first and back:
            yield from send(r - 1, ("grad", r - 1, step), nbytes[r - 1])
        yield _compute("opt", st.opt, step)
        while awaiting:  # use_deltas(block=False)
            head = awaiting[0]
            if len(awaiting) <= queue_depth and not (yield ("poll", ("grad", r, head))):
                break
            yield ("wait", ("grad", r, head))
            awaiting.popleft()
            yield _compute("learn", st.learn, head)
        yield ("mark", step)


def _dni_mb_rank(r: int, S: int, st: StageTimes, M: int, mb_bytes: list[float], steps: int, schedule: str, depth: int):
    """dnicompile's microbatched exact cuts (RankWorker.train_microbatches): every receive of the step posted at
    its start; forwards and backwards in `schedule_order`; sends never wait (up to P2P's bound in flight); one
    optimizer step."""
    first, last = r == 0, r == S - 1
    fwd = (st.fwd_mb if st.fwd_mb is not None else st.fwd / M) + st.mb_overhead
    bwd = (st.bwd_mb if st.bwd_mb is not None else st.bwd / M) + st.mb_overhead
    if schedule == "gpipe":
        order = [("F", i) for i in range(M)] + [("B", i) for i in range(M)]
    else:
        warm = min(M, S - r - 1)
        order = [("F", i) for i in range(warm)]
        for i in range(M):
            if warm + i < M:
                order.append(("F", warm + i))
            order.append(("B", i))
    inflight: deque = deque()
    keep = 4 * max(1, depth)
    for step in range(steps):
        yield _compute("overhead", st.overhead, step)
        for i in range(M):
            if not first:
                yield ("post", ("act", r - 1, step, i))
            if not last:
                yield ("post", ("grad", r, step, i))
        for action, i in order:
            if action == "F":
                if not first:
                    yield ("wait", ("act", r - 1, step, i))
                yield _compute("F", fwd, step, i)
                if not last:
                    key = ("act", r, step, i)
                    yield ("send", r + 1, key, mb_bytes[r])
                    inflight.append(key)
            else:
                if not last:
                    yield ("wait", ("grad", r, step, i))
                yield _compute("B", bwd, step, i)
                if not first:
                    key = ("grad", r - 1, step, i)
                    yield ("send", r - 1, key, mb_bytes[r - 1])
                    inflight.append(key)
            while len(inflight) > keep:
                yield ("sendwait", inflight.popleft())
        yield _compute("opt", st.opt, step)
        yield ("mark", step)


def simulate(
    kind: str,
    stages: list[StageTimes],
    cut_bytes: list[float],
    link: Link = Link(),
    batch: int = 256,
    steps: int = 40,
    microbatches: int = 4,
    queue_depth: int = 4,
    delay: int = 1,
    rendezvous: bool = True,
    cores: int | None = None,
    background: float = 0.0,
) -> Result:
    """Simulate `steps` training steps of `kind` on len(stages) ranks (one stage each). `cut_bytes[i]`: bytes of
    the boundary tensors crossing cut i (after stage i) for one whole batch (the gradient has as many); a
    microbatch sends cut_bytes / M."""
    S = len(stages)
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {KINDS}")
    if len(cut_bytes) != S - 1:
        raise ValueError(f"{S} stages need {S - 1} cut sizes, got {len(cut_bytes)}")
    if kind == "1f1b" and microbatches < S:
        raise ValueError(f"Schedule1F1B needs at least as many microbatches as stages ({microbatches} < {S})")
    engine = Engine(link, rendezvous, cores, background)
    if kind in ("mb_gpipe", "mb_1f1b"):
        mb_bytes = [b / microbatches for b in cut_bytes]
        programs = [
            _dni_mb_rank(r, S, st, microbatches, mb_bytes, steps, kind[3:], queue_depth) for r, st in enumerate(stages)
        ]
    elif kind in ("gpipe", "1f1b"):
        mb_bytes = [b / microbatches for b in cut_bytes]
        programs = [_pipe_rank(r, S, st, microbatches, mb_bytes, steps, kind) for r, st in enumerate(stages)]
    else:
        programs = [
            _dni_rank(r, S, st, kind, list(cut_bytes), steps, queue_depth, delay) for r, st in enumerate(stages)
        ]
    marks, msgs = engine.run(programs)
    first = steps // 4
    last = steps - 1 - steps // 4 if steps >= 4 else steps - 1
    return Result(kind, engine.events, marks, batch, first, max(last, first + 1), msgs)


def format_timeline(result: Result, steps: int | None = None, width: int = 100) -> str:
    """A text Gantt chart of the first `steps` steps of every rank."""
    events = [e for e in result.events if steps is None or e.step < steps]
    if not events:
        return ""
    end = max(e.end for e in events)
    scale = width / end
    lines = []
    for r in range(len(result.step_end)):
        row = [" "] * (width + 1)
        for e in events:
            if e.rank != r:
                continue
            a, b = int(e.start * scale), max(int(e.start * scale) + 1, int(e.end * scale))
            ch = {"F": "F", "B": "B", "opt": "o", "synth": "s", "learn": "l", "overhead": ".", "scale": "/"}[e.what]
            for i in range(a, min(b, width + 1)):
                row[i] = ch
        lines.append(f"rank {r}: |{''.join(row)}|")
    lines.append(f"0 .. {end * 1e3:.1f} ms (F forward, B backward, o optimizer, s synthesizer/head, l learn)")
    return "\n".join(lines)


# =========================================================================== scaling to S stages
def scaled_stages(inp: dict, kind: str, depth: int, S: int, M: int = 1) -> tuple[list[StageTimes], list[float]]:
    """Stage times for a model of `depth` hidden layers of width 1024 split into S stages of depth / S layers
    (fractional allowed), from the measured single layer (`per_layer`, at the batch and at the microbatch) and
    the measured per-step costs that do not depend on S: drawing the batch and the runtime's begin_step (every
    rank), the cut's synthesizer / head (synthetic, local), the boundary bytes (batch x 1024 floats). The head
    (1024 -> 10 and the loss) is left out (under 1% of a layer). Delayed: the stash and the stale-fresh cosine
    cost what they cost on the measured 8-layer stage, per layer. Pipeline schedules: microbatches of batch / M."""
    lay = inp["per_layer"]
    B = inp["batch"]
    n = depth / S
    mb = max(1, B // M)
    s0 = inp["stages"][0]
    itf = inp["interfaces"]
    overhead = inp["draw_batch"] + (0.0 if kind in ("gpipe", "1f1b", "backprop") else itf["backprop"]["begin_step"])
    torch_pipe = kind in ("gpipe", "1f1b")
    per_layer = s0["layers"]
    fwd, bwd = _interp(lay["fwd"], B), _interp(lay["bwd"], B)
    stages = []
    for r in range(S):
        st = StageTimes(fwd=n * fwd, bwd=n * bwd, opt=n * lay["opt"], overhead=overhead)
        if r > 0:  # the input's gradient: only the first layer of a stage computes one for the rank before
            st.bwd_no_input = st.bwd - (bwd - _interp(lay["bwd_no_input"], B))
        else:
            st.bwd = st.bwd - (bwd - _interp(lay["bwd_no_input"], B))
        if kind in ("gpipe", "1f1b", "mb_gpipe", "mb_1f1b"):
            st.fwd_mb = n * _interp(lay["fwd"], mb)
            st.bwd_mb = n * _interp(lay["bwd_acc"], mb)
            st.grad_scale = n * lay["grad_scale"] if torch_pipe else 0.0
        elif kind == "synthetic":
            st.synth, st.learn = itf["dni"]["synth"], itf["dni"]["learn"]
        elif kind == "local":
            st.synth = itf["local"]["synth"]
        elif kind == "delayed":
            d = itf["delayed"]
            extra = d["fwd"] - s0["fwd"] + d["bwd"] - s0["bwd"] + (d["bwd_measured"] - d["bwd"]) / 10
            st.synth = n * max(0.0, extra) / per_layer
        stages.append(st)
    return stages, [float(B * 1024 * 4)] * (S - 1)


def _interp(table: dict, size: int) -> float:
    """Linear interpolation in a {batch size: seconds} table (keys may be strings, from JSON)."""
    pts = sorted((int(k), v) for k, v in table.items())
    for (a, ta), (b, tb) in zip(pts, pts[1:]):
        if a <= size <= b:
            return ta + (tb - ta) * (size - a) / (b - a)
    if size < pts[0][0]:
        return pts[0][1] * size / pts[0][0]
    (a, ta), (b, tb) = pts[-2], pts[-1]
    return tb + (tb - ta) * (size - b) / (b - a)


PREDICT_KINDS = ("gpipe", "1f1b", "mb_1f1b", "exact", "synthetic", "delayed", "local")


def predict_grid(inp: dict, depth: int, sizes: list[int], latencies_ms: list[float], bandwidth: float) -> dict:
    """Samples/s of every contender for each S and latency (the pipeline schedules: the best M of 4 ... 64, at
    least S for torch's 1F1B), and one process of plain backprop on all `depth` layers (the reference)."""
    B = inp["batch"]
    one, _ = scaled_stages(inp, "backprop", depth, 1)
    base = simulate("exact", one, [], Link(), B, steps=8).throughput
    rows = []
    for S in sizes:
        for lat in latencies_ms:
            link = Link(lat / 1e3, bandwidth)
            row = {"S": S, "latency_ms": lat, "backprop_1": base}
            for kind in PREDICT_KINDS:
                if kind in ("gpipe", "1f1b", "mb_1f1b"):
                    best = None
                    for M in (4, 8, 16, 32, 64):
                        if M > B or (kind == "1f1b" and M < S):
                            continue
                        stages, cb = scaled_stages(inp, kind, depth, S, M)
                        t = simulate(kind, stages, cb, link, B, steps=8, microbatches=M).throughput
                        if best is None or t > best[0]:
                            best = (t, M)
                    row[kind], row[f"{kind}_M"] = best
                else:
                    stages, cb = scaled_stages(inp, kind, depth, S)
                    row[kind] = simulate(kind, stages, cb, link, B, steps=40).throughput
            rows.append(row)
            print(
                f"S={S:3d} latency {lat:4g} ms: "
                + ", ".join(f"{k} {row[k]:.0f}" + (f" (M={row[k + '_M']})" if k + "_M" in row else "") for k in PREDICT_KINDS),
                flush=True,
            )  # fmt: skip
    return {"depth": depth, "batch": B, "bandwidth_Bps": bandwidth, "backprop_1": base, "rows": rows}


# =========================================================================== measure (torch from here on)
_CPU_SHARE: list[float] = []  # CPU time over wall time of each timing: how much of a core this process got


def _timeit(fn, reps: int, warm: int = 2, setup=None) -> float:
    """Median CPU seconds of this process for fn() over `reps` runs (setup() before each, untimed): the work, as
    a dedicated core would take it. The CPU time over the wall time is kept (`_CPU_SHARE`): how much of a core
    the process got while measuring, from which the load of other processes is estimated."""
    import statistics
    import time

    walls, cpus = [], []
    for i in range(warm + reps):
        if setup is not None:
            setup()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i >= warm:
            walls.append(dt)
            cpus.append(dc)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    if wall > 1e-3:
        _CPU_SHARE.append(cpu / wall)
    return cpu


def _measure_stage(sub, r: int, last: bool, batch: int, microbatches: int, reps: int) -> dict:
    """Forward, backward (whole batch, microbatches), optimizer and gradient scaling of one stage `sub`."""
    import throughput as tp
    import torch
    import torch.nn.functional as F

    opt = tp._adam(sub.parameters())
    width = 784 if r == 0 else 1024
    y = torch.randint(0, 10, (batch,))
    mb = batch // microbatches
    holder: dict = {}

    def run_fwd(b, need_input_grad):
        x = torch.randn(b, width, requires_grad=need_input_grad)
        h = sub(x)
        return F.cross_entropy(h, y[:b]) if last else h

    def backward(out_):
        if last:
            out_.backward()
        else:
            out_.backward(torch.ones_like(out_) * 1e-3)

    def zero():
        opt.zero_grad(set_to_none=True)

    def prep(b, inp):
        zero()
        holder["o"] = run_fwd(b, inp)

    def prep_mb():  # M microbatches' backwards accumulate into the gradients (the first one allocates them)
        zero()
        holder["outs"] = [run_fwd(mb, r > 0) for _ in range(microbatches)]

    def prep_opt():
        backward(run_fwd(batch, r > 0))

    def scale():
        for p in sub.parameters():
            p.grad.div_(microbatches)

    rec: dict = {}
    for key, b in (("fwd", batch), ("fwd_mb", mb)):
        rec[key] = _timeit(lambda b=b: run_fwd(b, r > 0), reps)
    rec["bwd"] = _timeit(lambda: backward(holder["o"]), reps, setup=lambda: prep(batch, r > 0))
    rec["bwd_no_input"] = _timeit(lambda: backward(holder["o"]), reps, setup=lambda: prep(batch, False))
    rec["bwd_mb"] = _timeit(lambda: [backward(o) for o in holder["outs"]], reps, setup=prep_mb) / microbatches
    rec["opt"] = _timeit(lambda: (opt.step(), opt.zero_grad(set_to_none=True)), reps, setup=prep_opt)
    rec["grad_scale"] = _timeit(scale, reps, setup=prep_opt)
    return rec


def measure_stages(depth: int, batch: int, microbatches: int, reps: int, data: str, stages: int = 2) -> dict:
    """Per-stage times of examples/wide_mlp.py split as throughput.py splits it (S = `stages`), one thread."""
    import throughput as tp
    import torch
    import torch.nn as nn

    tp.DEPTH = depth
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tp._model(0)
    bounds = [0, *(i + 1 for i in tp.cut_layers(stages)), depth]
    out: dict = {"stages": []}
    for r in range(stages):
        last = r == stages - 1
        part = list(model.layers)[bounds[r] : bounds[r + 1]] + ([model.head] if last else [])
        rec = _measure_stage(nn.Sequential(*part), r, last, batch, microbatches, reps)
        out["stages"].append({"layers": bounds[r + 1] - bounds[r], "head": last, **rec})
    # drawing a batch (every rank of every contender draws each step's batch)
    _, batches = tp._data(data, batch, 0)
    out["draw_batch"] = _timeit(batches.next, max(20, reps))
    out["cut_bytes"] = [batch * 1024 * 4] * (stages - 1)
    return out


def measure_interfaces(depth: int, batch: int, reps: int, stages: int = 2) -> dict:
    """The decoupled cuts' own work on rank 0, through dnicompile's interfaces as the distributed runtime runs
    them (the shipped wide_mlp specs at this depth, the cut after stage 0)."""
    import tempfile

    import throughput as tp
    import torch

    from dnicompile import compile_decoupled
    from dnicompile.spec import load_spec

    tp.DEPTH = depth
    torch.set_num_threads(1)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("dni", "local", "delayed", "backprop"):
            spec = load_spec(tp.spec_for(kind, stages, 5, Path(tmp)))
            program = compile_decoupled(tp._model(0), spec)
            program.train()
            out[kind] = _measure_interface(program, kind, batch, reps)
    return out


def _measure_interface(program, kind: str, batch: int, reps: int) -> dict:
    import torch

    rt = program.runtime
    cut = program.cuts[0]
    name = cut.boundary[0].name
    stage0 = program.stages[0]
    x = torch.randn(batch, 784)
    y = torch.randint(0, 10, (batch,))
    iface = rt.interfaces[cut.index]
    rec: dict = {}
    if kind == "backprop":  # the local runtime's whole step, one process (its overhead over the parts)
        rec["local_step"] = _timeit(lambda: rt.train_step((x,), y), reps)
        rec["begin_step"] = _timeit(lambda: rt.begin_step((x,), y), reps)
    elif kind == "dni":
        context = rt.begin_step((x,), y).context
        h = {name: _first(stage0(x))}

        def predict():
            preds = iface.predict(h, context)
            iface.gradient(h, context, preds, batch)

        rec["synth"] = _timeit(predict, reps)
        delta = {name: torch.randn(batch, 1024) * 1e-4}
        rec["learn"] = _timeit(lambda: iface.learn(h, context, delta, batch, stats=False), reps)
    elif kind == "local":
        h = {name: _first(stage0(x)).detach()}
        rec["synth"] = _timeit(lambda: iface.gradient(h, y, {}, batch), reps)
    else:  # delayed, stash: the kept forward and the due backward
        holder = {"step": 0}

        def fwd():
            holder["out"] = iface.forward(holder["step"], (x,))

        def arrive():
            s = holder["step"]
            fwd()
            iface.arrive(s, {name: torch.randn(batch, 1024) * 1e-4}, s)

        def bwd():
            s = holder["step"]
            iface.backward_due(s + 1, measure=holder.get("measure", False))
            for p in stage0.parameters():
                p.grad = None
            holder["step"] = s + 1

        rec["fwd"] = _timeit(fwd, reps, setup=lambda: iface.queue.clear())
        iface.queue.clear()
        rec["bwd"] = _timeit(bwd, reps, setup=arrive)
        holder["measure"] = True
        rec["bwd_measured"] = _timeit(bwd, reps, setup=arrive)
        iface.queue.clear()
    return rec


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _ping_rank(rank: int, port: int, sizes: list[int], reps: int, out: str) -> None:
    import time

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    res = {}
    for n in sizes:
        buf = torch.zeros(n // 4)
        times = []
        for i in range(reps + 3):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        times.sort()
        res[n] = times[len(times) // 2] / 2  # one way
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def measure_link(reps: int = 30) -> dict:
    """One-way time of a gloo message between two processes on this host (ping-pong, median)."""
    import tempfile

    import throughput as tp
    import torch.multiprocessing as mp

    sizes = [4, 65536, 262144, 1048576, 4194304]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "ping.json")
        mp.start_processes(_ping_rank, args=(tp._free_port(), sizes, reps, out), nprocs=2, start_method="spawn")
        one_way = {int(k): v for k, v in json.loads(Path(out).read_text()).items()}
    latency = one_way[4]
    bw = (sizes[-1] - sizes[1]) / (one_way[sizes[-1]] - one_way[sizes[1]])
    return {"one_way_s": one_way, "latency_s": latency, "bandwidth_Bps": bw}


def measure_all(depth: int, batch: int, microbatches: int, reps: int, data: str, layer: bool = True) -> dict:
    import os
    import platform

    import torch

    _CPU_SHARE.clear()
    load0 = os.getloadavg()[0]
    res = {"depth": depth, "batch": batch, "microbatches": microbatches, "torch": torch.__version__}
    res["python"] = platform.python_version()
    res.update(measure_stages(depth, batch, microbatches, reps, data))
    if layer:
        res["per_layer"] = measure_layer(reps)
    res["interfaces"] = measure_interfaces(depth, batch, reps)
    res["link"] = measure_link()
    res["load"] = [load0, os.getloadavg()[0]]
    res["cpu_share"] = sorted(_CPU_SHARE)[len(_CPU_SHARE) // 2] if _CPU_SHARE else None
    res["clock"] = "cpu"  # every time above is the process's CPU time (the link's: wall time)
    return res


def cmd_measure(args) -> int:
    res = {"command": "python benchmarks/schedule_sim.py measure " + " ".join(sys.argv[2:])}
    res.update(measure_all(args.depth, args.batch_size, args.microbatches, args.reps, args.data))
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "per_layer"}, indent=1))
    return 0


# =========================================================================== inputs -> stage times (S = 2)
def measured_stages(inp: dict, kind: str) -> tuple[list[StageTimes], list[float], int]:
    """The measured stages of a 2-stage split for contender `kind` ("backprop": both on one rank), the cut's
    bytes and the batch. Per-step overhead: drawing the batch (every rank draws it), plus dnicompile's
    begin_step for its runtime."""
    s0, s1 = inp["stages"]
    itf = inp["interfaces"]
    draw = inp["draw_batch"]
    begin = itf["backprop"]["begin_step"]
    if kind == "backprop":
        st = StageTimes(s0["fwd"] + s1["fwd"], s0["bwd"] + s1["bwd"], s0["opt"] + s1["opt"], overhead=draw)
        return [st], [], inp["batch"]
    if kind in ("gpipe", "1f1b", "mb_gpipe", "mb_1f1b"):
        torch_pipe = kind in (
            "gpipe",
            "1f1b",
        )  # torch divides the accumulated gradients by M; dnicompile weights the loss
        sts = [
            StageTimes(
                s["fwd"], s["bwd"], s["opt"], overhead=draw + (0.0 if torch_pipe else begin), fwd_mb=s["fwd_mb"],
                bwd_mb=s["bwd_mb"], grad_scale=s["grad_scale"] if torch_pipe else 0.0,
            )
            for s in (s0, s1)
        ]  # fmt: skip
        return sts, inp["cut_bytes"], inp["batch"]
    r0 = StageTimes(s0["fwd"], s0["bwd"], s0["opt"], overhead=draw + begin)
    r1 = StageTimes(s1["fwd"], s1["bwd"], s1["opt"], overhead=draw + begin, bwd_no_input=s1["bwd_no_input"])
    if kind == "synthetic":
        r0.synth, r0.learn = itf["dni"]["synth"], itf["dni"]["learn"]
    elif kind == "local":
        r0.synth = itf["local"]["synth"]
    elif kind == "delayed":
        d = itf["delayed"]
        r0.fwd, r0.bwd = d["fwd"], d["bwd"]
        r0.synth = (d["bwd_measured"] - d["bwd"]) / 10  # the stale-fresh cosine every 10th step
    return [r0, r1], inp["cut_bytes"], inp["batch"]


def cpu_per_step(result: Result) -> list[float]:
    """Each rank's busy seconds per step over the steady window (compare the runs' cpu_ms_per_step)."""
    S = len(result.step_end)
    busy = [0.0] * S
    for r in range(S):
        a, b = result.step_end[r][result.first], result.step_end[r][result.last]
        for e in result.events:
            if e.rank == r:
                busy[r] += max(0.0, min(e.end, b) - max(e.start, a))
        busy[r] /= result.last - result.first
    return busy


def work_inputs(inp: dict) -> dict:
    """The inputs in CPU seconds (the work): files measured before `clock: cpu` hold wall times, converted with
    the measuring process's CPU share."""
    if inp.get("clock") == "cpu":
        return inp
    share = inp["cpu_share"]
    out = json.loads(json.dumps(inp))
    for st in out["stages"]:
        for k in ("fwd", "fwd_mb", "bwd", "bwd_no_input", "bwd_mb", "opt", "grad_scale"):
            st[k] *= share
    out["draw_batch"] *= share
    for rec in out["interfaces"].values():
        for k in rec:
            rec[k] *= share
    out["clock"] = "cpu"
    return out


def background_load(inp: dict, cores: int = 2) -> float:
    """Other busy processes while the inputs were measured: a lone busy process gets cores / (1 + background) of
    a core (at most 1), so background = cores / share - 1 (0 when it got a whole core)."""
    share = inp.get("cpu_share") or 1.0
    return max(0.0, cores / min(1.0, share) - 1.0)


def predict_s2(
    inp: dict, steps: int = 40, cores: int | None = None, background: float = 0.0, only: str | None = None
) -> dict:
    """Predicted samples/s and busy ms per step of each rank, per validation contender, at S = 2: on dedicated
    cores (cores None), or sharing `cores` with `background` other busy processes."""
    inp = work_inputs(inp)
    out = {}
    for name, kind, latency_ms, M in VALIDATION:
        if only is not None and name != only:
            continue
        link = Link(inp["link"]["latency_s"] + latency_ms / 1e3, inp["link"]["bandwidth_Bps"])
        sim_kind = "exact" if kind == "backprop" else kind
        stages, cut_bytes, batch = measured_stages(inp, kind)
        res = simulate(
            sim_kind, stages, cut_bytes, link, batch, steps, microbatches=M, cores=cores, background=background
        )
        out[name] = {"samples_per_s": res.throughput, "busy_ms": [1e3 * b for b in cpu_per_step(res)]}
    return out


VALIDATION = [  # (name, simulated kind, emulated latency ms, microbatches): the contenders validate measures
    ("a_backprop", "backprop", 0, 1),
    ("c_gpipe", "gpipe", 0, 4),
    ("c_1f1b", "1f1b", 0, 4),
    ("e_exact", "exact", 0, 1),
    ("e_cdni", "synthetic", 0, 1),
    ("e_local", "local", 0, 1),
    ("e_delayed", "delayed", 0, 1),
    ("e_mb_gpipe", "mb_gpipe", 0, 4),
    ("e_mb_1f1b", "mb_1f1b", 0, 4),
    ("e_exact_10ms", "exact", 10, 1),
    ("e_cdni_10ms", "synthetic", 10, 1),
    ("e_mb_1f1b_10ms", "mb_1f1b", 10, 4),
]


def _variant(spec: Path, extra: str, tag: str) -> Path:
    """throughput.py's spec with more `distributed:` settings (the lead's microbatches and link emulation)."""
    text = spec.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("distributed: {"))
    out = spec.with_name(f"{spec.stem}_{tag}.yaml")
    out.write_text(text.replace(line, line[:-1] + ", " + extra + "}"))
    return out


def summarize(reps: list[dict]) -> dict:
    """Medians over the reps of measured and predicted samples/s (dedicated and shared cores), the error of each
    prediction, and each rank's measured CPU ms per step against the simulated busy ms (CPU time: the work)."""
    import statistics

    med = statistics.median
    out = {}
    names = [n for n, *_ in VALIDATION if all(n in r["measured"] for r in reps)]
    for name in names:
        m = med(r["measured"][name]["samples_per_s"] for r in reps)
        p = med(r["predicted"][name]["samples_per_s"] for r in reps)
        ps = med(r["predicted_shared"][name]["samples_per_s"] for r in reps)
        cpu = [
            med(r["measured"][name]["cpu_ms"][i] for r in reps) for i in range(len(reps[0]["measured"][name]["cpu_ms"]))
        ]
        busy = [med(r["predicted"][name]["busy_ms"][i] for r in reps) for i in range(len(cpu))]
        if all("predicted_run" in r and name in r["predicted_run"] for r in reps):
            pr = med(r["predicted_run"][name]["samples_per_s"] for r in reps)
            bgs = [r["measured"][name]["background"] for r in reps]
        else:
            pr, bgs = float("nan"), []
        out[name] = {
            "predicted_run": pr, "error_run": pr / m - 1, "backgrounds": bgs,
            "measured": m, "predicted": p, "error": p / m - 1, "predicted_shared": ps, "error_shared": ps / m - 1,
            "cpu_ms": cpu, "busy_ms": busy, "loads": [r["measured"][name]["load"] for r in reps],
        }  # fmt: skip
    return out


def _descends(pid: int, root: int, parents: dict) -> bool:
    for _ in range(64):
        if pid == root:
            return True
        pid = parents.get(pid, 0)
        if pid <= 1:
            return False
    return False


class BackgroundMonitor:
    """Counts, while a run runs, the runnable tasks (threads in state R, from /proc/*/task/*/stat) that are not this
    process or its descendants: the other load the run shares the cores with. `mean` after `stop()`."""

    def __init__(self, interval: float = 0.25) -> None:
        import threading

        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else float("nan")

    def _run(self) -> None:
        import os

        me = os.getpid()
        while not self._stop.wait(self.interval):
            parents, running = {}, []
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    parents[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
                    for tid in os.listdir(f"/proc/{pid}/task"):
                        if Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "R":
                            running.append(int(pid))
                except (OSError, IndexError, ValueError):
                    continue

            self.samples.append(sum(1 for pid in running if not _descends(pid, me, parents)))


def cmd_validate(args) -> int:
    """Interleaved reps: measure the inputs, then run every contender once with throughput.py's runners."""
    import os
    import tempfile
    import time
    from types import SimpleNamespace

    import throughput as tp

    tp.DEPTH, tp.QUEUE_DEPTH = args.depth, 4
    targs = SimpleNamespace(data=args.data, batch_size=args.batch_size, warmup=args.warmup, steps=args.steps)
    began = time.perf_counter()
    chosen = [n for n, *_ in VALIDATION if not args.only or n in args.only.split(",")]
    reps: list = []
    res = {"command": "python benchmarks/schedule_sim.py validate " + " ".join(sys.argv[2:]), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="schedule-sim-") as tmp_name:
        tmp = Path(tmp_name)
        specs = {k: tp.spec_for(k, 2, 5, tmp) for k in ("backprop", "dni", "local", "delayed")}
        M = args.microbatches
        specs["mb_gpipe"] = _variant(specs["backprop"], f"microbatches: {M}, schedule: gpipe", "mb_gpipe")
        specs["mb_1f1b"] = _variant(specs["backprop"], f"microbatches: {M}, schedule: 1f1b", "mb_1f1b")
        link = "link: {latency_ms: 10}"
        specs["exact_10ms"] = _variant(specs["backprop"], link, "10ms")
        specs["dni_10ms"] = _variant(specs["dni"], link, "10ms")
        specs["mb_1f1b_10ms"] = _variant(specs["backprop"], f"microbatches: {M}, schedule: 1f1b, {link}", "mb_10ms")
        dist = {
            "e_exact": "backprop", "e_cdni": "dni", "e_local": "local", "e_delayed": "delayed", "e_mb_gpipe": "mb_gpipe",
            "e_mb_1f1b": "mb_1f1b", "e_exact_10ms": "exact_10ms", "e_cdni_10ms": "dni_10ms",
            "e_mb_1f1b_10ms": "mb_1f1b_10ms",
        }  # fmt: skip
        runners = {
            "a_backprop": lambda: tp.run_child("plain", targs, threads=1),
            "c_gpipe": lambda: tp.run_child("pipe", targs, workers=2, schedule="gpipe", microbatches=M),
            "c_1f1b": lambda: tp.run_child("pipe", targs, workers=2, schedule="1f1b", microbatches=M),
            **{n: (lambda k=k: tp.run_distributed(specs[k], 2, targs, tmp)) for n, k in dist.items()},
        }
        for rep in range(args.reps):
            inp = measure_all(args.depth, args.batch_size, M, args.mreps, args.data, layer=False)
            bg = background_load(inp)
            row = {"inputs": inp, "background": bg, "predicted": predict_s2(inp), "measured": {}}
            row["predicted_shared"] = predict_s2(inp, cores=2, background=bg)
            print(f"rep {rep + 1}: inputs (load {inp['load']}, CPU share {inp['cpu_share']:.2f})", flush=True)
            for name in chosen:
                load = os.getloadavg()[0]
                with BackgroundMonitor() as mon:
                    got = runners[name]()
                got["load"], got["background"] = load, mon.mean
                kind, lat, m = next((k, la, mm) for n, k, la, mm in VALIDATION if n == name)
                run = predict_s2(inp, cores=2, background=mon.mean, only=name)[name]
                row.setdefault("predicted_run", {})[name] = run
                row["measured"][name] = got
                pred, pred_s = row["predicted"][name], row["predicted_shared"][name]
                cpu = "/".join(f"{c:.0f}" for c in got["cpu_ms"])
                busy = "/".join(f"{c:.0f}" for c in pred["busy_ms"])
                print(
                    f"rep {rep + 1} {name}: measured {got['samples_per_s']:.0f} samples/s (CPU ms {cpu}, load "
                    f"{load:.2f}); predicted {pred['samples_per_s']:.0f} dedicated, {pred_s['samples_per_s']:.0f} "
                    f"shared, {run['samples_per_s']:.0f} with the run's background {mon.mean:.1f} (busy ms {busy})",
                    flush=True,
                )
            reps.append(row)
            res.update(reps=reps, summary=summarize(reps), total_s=time.perf_counter() - began)
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")  # after every rep
    for name, v in res["summary"].items():
        print(
            f"{name:15s} measured {v['measured']:6.0f}  predicted {v['predicted']:6.0f} ({100 * v['error']:+5.1f}%), "
            f"shared cores {v['predicted_shared']:6.0f} ({100 * v['error_shared']:+5.1f}%)"
        )
    return 0


def measure_layer(reps: int) -> dict:
    """One hidden layer (Linear 1024 -> 1024 + ReLU) at several batch sizes, for the scaling to S stages:
    forward, backward (with the input's gradient; accumulating into existing gradients; without the input's
    gradient), fused Adam and the division of the gradients by M."""
    import throughput as tp
    import torch
    import torch.nn as nn

    torch.set_num_threads(1)
    layer = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU())
    opt = tp._adam(layer.parameters())
    holder: dict = {}

    def prep(b: int, inp: bool = True, zero: bool = True):
        if zero:
            opt.zero_grad(set_to_none=True)
        holder["o"] = layer(torch.randn(b, 1024, requires_grad=inp))

    def bwd():
        holder["o"].backward(torch.ones_like(holder["o"]))

    res: dict = {"fwd": {}, "bwd": {}, "bwd_acc": {}, "bwd_no_input": {}}
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        res["fwd"][b] = _timeit(lambda b=b: layer(torch.randn(b, 1024, requires_grad=True)), reps)
        res["bwd"][b] = _timeit(bwd, reps, setup=lambda b=b: prep(b))
        res["bwd_acc"][b] = _timeit(bwd, reps, setup=lambda b=b: prep(b, zero=False))
        res["bwd_no_input"][b] = _timeit(bwd, reps, setup=lambda b=b: prep(b, inp=False))
    prep(256)
    bwd()
    res["opt"] = _timeit(lambda: opt.step(), reps)
    res["grad_scale"] = _timeit(lambda: [p.grad.div_(4) for p in layer.parameters()], reps)
    return res


# =========================================================================== predictions and plots
COLORS = {"F": "tab:blue", "B": "tab:orange", "opt": "tab:green", "synth": "tab:purple", "learn": "tab:pink",
          "overhead": "tab:gray", "scale": "tab:olive"}  # fmt: skip
LABELS = {
    "gpipe": "GPipe (best M)",
    "1f1b": "1F1B (best M)",
    "mb_1f1b": "dnicompile exact, 1F1B (best M)",
    "exact": "exact cuts, no microbatches",
    "synthetic": "synthetic (cDNI)",
    "delayed": "delayed (1 step)",
    "local": "local loss",
}


def plot_grid(grid: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = grid["rows"]
    lats = sorted({r["latency_ms"] for r in rows})
    fig, axes = plt.subplots(1, len(lats), figsize=(4.2 * len(lats), 4.2), sharey=True)
    for ax, lat in zip(axes, lats):
        sel = sorted((r for r in rows if r["latency_ms"] == lat), key=lambda r: r["S"])
        xs = [r["S"] for r in sel]
        for kind in PREDICT_KINDS:
            ax.plot(xs, [r[kind] for r in sel], marker="o", label=LABELS[kind])
        base = grid["backprop_1"]
        ax.plot(xs, [base * x for x in xs], ":", color="black", label="S x one-process backprop")
        ax.axhline(base, color="black", linestyle="--", linewidth=1, label="one-process backprop")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_title(f"latency {lat:g} ms")
        ax.set_xlabel("stages S (one rank each)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("predicted samples/s")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"Simulated steady-state throughput: {grid['depth']} layers of width 1024 split in S, batch {grid['batch']}, "
        f"bandwidth {grid['bandwidth_Bps'] / 1e6:.0f} MB/s (per-layer times measured on this CPU)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timelines(results: list[tuple[str, Result]], path: Path, title: str, steps: int = 3) -> None:
    """Gantt charts of `steps` steady-state steps (from the last rank's window start) of each result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(11, 1.1 + 0.75 * len(results) * 2), squeeze=False)
    for ax, (name, res) in zip(axes[:, 0], results):
        t0 = res.step_end[-1][res.first]
        t1 = res.step_end[-1][res.first + steps]
        S = len(res.step_end)
        for e in res.events:
            if e.end <= t0 or e.start >= t1:
                continue
            ax.barh(S - 1 - e.rank, min(e.end, t1) - max(e.start, t0), left=max(e.start, t0) - t0, height=0.7,
                    color=COLORS[e.what], edgecolor="white", linewidth=0.3)  # fmt: skip
        ax.set_yticks(range(S), [f"rank {S - 1 - i}" for i in range(S)], fontsize=7)
        ax.set_xlim(0, t1 - t0)
        ax.set_title(f"{name}: {res.throughput:.0f} samples/s, {1e3 * res.step_time:.0f} ms per step", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("seconds from the start of a steady-state step (last rank)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    fig.legend(handles, ["forward", "backward", "optimizer", "synthesizer / head / stash", "synthesizer learns",
                         "per-step overhead", "grad / M"], loc="lower center", ncol=7, fontsize=7)  # fmt: skip
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_validation(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(11, 4))
    xs = list(range(len(names)))
    bars = (("measured", "measured (median)"), ("predicted", "predicted, a core per rank"),
            ("predicted_run", "predicted, sharing 2 cores with the measured background"))  # fmt: skip
    for j, (key, label) in enumerate(bars):
        ax.bar([x + (j - 1) * 0.27 for x in xs], [summary[n][key] for n in names], 0.27, label=label)
    for x, n in zip(xs, names):
        for j, key in ((1, "error"), (2, "error_run")):
            ax.annotate(f"{100 * summary[n][key]:+.0f}%", (x + (j - 1) * 0.27, summary[n][bars[j][0]]),
                        ha="center", va="bottom", fontsize=6)  # fmt: skip
    ax.set_xticks(xs, names, fontsize=7, rotation=20)
    ax.set_ylabel("samples/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_predict(args) -> int:
    inp = work_inputs(json.loads(Path(args.inputs).read_text()))
    bandwidth = args.bandwidth_mb_s * 1e6 if args.bandwidth_mb_s else inp["link"]["bandwidth_Bps"]
    sizes = [int(x) for x in args.stages.split(",")]
    lats = [float(x) for x in args.latency_ms.split(",")]
    grid = predict_grid(inp, args.depth, sizes, lats, bandwidth)
    grid["command"] = "python benchmarks/schedule_sim.py predict " + " ".join(sys.argv[2:])
    grid["inputs"] = (
        str(Path(args.inputs).resolve().relative_to(ROOT))
        if ROOT in Path(args.inputs).resolve().parents
        else args.inputs
    )
    out = Path(args.out)
    out.write_text(json.dumps(grid, indent=1) + "\n")
    plot_grid(grid, out.with_name("schedule_sim_throughput.png"))
    # timelines: S = 4 of the same model at 1 ms, and S = 2 with the measured stages and link
    res = []
    for kind in PREDICT_KINDS:
        M = 8 if kind in ("gpipe", "1f1b", "mb_1f1b") else 1
        stages, cb = scaled_stages(inp, kind, args.depth, 4, M)
        r = simulate(kind, stages, cb, Link(1e-3, bandwidth), inp["batch"], steps=12, microbatches=M)
        res.append((LABELS[kind].replace("best M", f"M = {M}"), r))
    plot_timelines(res, out.with_name("schedule_sim_timeline_s4.png"),
                   f"S = 4, {args.depth} layers (16 per stage), latency 1 ms: 3 steady-state steps")  # fmt: skip
    link = Link(inp["link"]["latency_s"], inp["link"]["bandwidth_Bps"])
    res = []
    for name, kind, latency_ms, M in VALIDATION[1:]:
        if latency_ms == 0:
            stages, cb, B = measured_stages(inp, kind)
            res.append((name, simulate(kind, stages, cb, link, B, steps=12, microbatches=M)))
    plot_timelines(res, out.with_name("schedule_sim_timeline_s2.png"),
                   f"S = 2, the measured depth-{inp['depth']} stages and gloo link: 3 steady-state steps")  # fmt: skip
    return 0


def cmd_timeline(args) -> int:
    inp = work_inputs(json.loads(Path(args.inputs).read_text()))
    link = Link(args.latency_ms / 1e3 if args.latency_ms is not None else inp["link"]["latency_s"],
                inp["link"]["bandwidth_Bps"])  # fmt: skip
    if args.stages == 2 and args.depth == inp["depth"]:
        stages, cb, B = measured_stages(inp, args.kind)
    else:
        stages, cb = scaled_stages(inp, args.kind, args.depth, args.stages, args.microbatches)
        B = inp["batch"]
    kind = "exact" if args.kind == "backprop" else args.kind
    r = simulate(kind, stages, cb, link, B, steps=args.steps, microbatches=args.microbatches)
    print(format_timeline(r, steps=args.show))
    print(f"{r.throughput:.0f} samples/s, {1e3 * r.step_time:.1f} ms per step (steady state, last rank)")
    return 0


# =========================================================================== report
def report(validation: dict | None, grid: dict | None) -> str:
    """Markdown tables of a validation file and a predictions file (for BENCHMARKS.md)."""
    lines = []
    if validation:
        lines += [
            "| contender | measured samples/s (median) | predicted, a core per rank | error | predicted, 2 cores shared "
            "with the background measured during each run | error | background (other runnable tasks, mean per run) "
            "| CPU ms per step per rank, measured | simulated busy ms per rank | error of the busiest rank | load (1 min) "
            "before each run |",
            "|---|---:|---:|---:|---:|---:|---|---|---|---:|---|",
        ]
        for name, v in validation["summary"].items():
            cpu_err = max(v["busy_ms"]) / max(v["cpu_ms"]) - 1
            lines.append(
                f"| {name} | {v['measured']:.0f} | {v['predicted']:.0f} | {100 * v['error']:+.0f}% | "
                f"{v['predicted_run']:.0f} | {100 * v['error_run']:+.0f}% | "
                + ", ".join(f"{b:.1f}" for b in v["backgrounds"])
                + " | "
                + " / ".join(f"{c:.0f}" for c in v["cpu_ms"])
                + " | "
                + " / ".join(f"{c:.0f}" for c in v["busy_ms"])
                + f" | {100 * cpu_err:+.0f}% | "
                + ", ".join(f"{x:.1f}" for x in v["loads"])
                + " |"
            )
        lines.append("")
    if grid:
        kinds = [k for k in PREDICT_KINDS if k in grid["rows"][0]]
        lines += [
            "| S | latency ms | " + " | ".join(LABELS[k] for k in kinds) + " |",
            "|---:|---:|" + "---:|" * len(kinds),
        ]
        base = grid["backprop_1"]
        for r in grid["rows"]:
            cells = []
            for k in kinds:
                m = f", M={r[k + '_M']}" if k + "_M" in r else ""
                cells.append(f"{r[k]:.0f} ({r[k] / base:.1f}x{m})")
            lines.append(f"| {r['S']} | {r['latency_ms']:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def repredict(validation: dict) -> dict:
    """The validation's predictions made again with this file's model, from each rep's measured inputs and each
    run's measured background (nothing taken from the runs' throughput)."""
    for row in validation["reps"]:
        row["predicted"] = predict_s2(row["inputs"])
        row["predicted_shared"] = predict_s2(row["inputs"], cores=2, background=row["background"])
        row["predicted_run"] = {
            name: predict_s2(row["inputs"], cores=2, background=got["background"], only=name)[name]
            for name, got in row["measured"].items()
        }
    validation["summary"] = summarize(validation["reps"])
    return validation


def cmd_report(args) -> int:
    validation = json.loads(Path(args.validation).read_text()) if args.validation else None
    if validation and args.repredict:
        validation = repredict(validation)
        if args.write:
            Path(args.write).write_text(json.dumps(validation, indent=1) + "\n")
    grid = json.loads(Path(args.predictions).read_text()) if args.predictions else None
    print(report(validation, grid))
    if validation and args.plot:
        plot_validation(validation["summary"], Path(args.plot), args.title)
    return 0


# =========================================================================== main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="time the stages of examples/wide_mlp.py")
    m.add_argument("--depth", type=int, default=16)
    m.add_argument("--batch-size", type=int, default=256)
    m.add_argument("--microbatches", type=int, default=4)
    m.add_argument("--reps", type=int, default=15)
    m.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fashion-mnist"))
    m.add_argument("--out", default=str(INPUTS))
    v = sub.add_parser("validate", help="predicted against measured throughput at S = 2 (throughput.py's runners)")
    v.add_argument("--depth", type=int, default=16)
    v.add_argument("--batch-size", type=int, default=256)
    v.add_argument("--microbatches", type=int, default=4)
    v.add_argument("--reps", type=int, default=3, help="interleaved repetitions (measure, then every contender)")
    v.add_argument("--mreps", type=int, default=7, help="timings per input in each repetition")
    v.add_argument("--warmup", type=int, default=10)
    v.add_argument("--steps", type=int, default=40)
    v.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fashion-mnist"))
    v.add_argument("--out", default=str(RESULTS / "schedule_sim_validation.json"))
    v.add_argument("--only", help="comma-separated contender names (default: all of VALIDATION)")
    q = sub.add_parser("predict", help="predictions for S stages and latencies, plots")
    q.add_argument("--inputs", default=str(INPUTS))
    q.add_argument("--depth", type=int, default=64, help="total hidden layers, split into S stages")
    q.add_argument("--stages", default="2,4,8,16,64")
    q.add_argument("--latency-ms", default="0,1,10,50")
    q.add_argument("--bandwidth-mb-s", type=float, help="default: the measured gloo link on this host")
    q.add_argument("--out", default=str(RESULTS / "schedule_sim_predictions.json"))
    t = sub.add_parser("timeline", help="print one simulated timeline")
    t.add_argument("kind", choices=(*KINDS, "backprop"))
    t.add_argument("--inputs", default=str(INPUTS))
    t.add_argument("--stages", type=int, default=2)
    t.add_argument("--depth", type=int, default=16)
    t.add_argument("--microbatches", type=int, default=4)
    t.add_argument("--latency-ms", type=float)
    t.add_argument("--steps", type=int, default=12)
    t.add_argument("--show", type=int, default=3, help="steps shown")
    w = sub.add_parser("report", help="markdown tables of a validation and a predictions file")
    w.add_argument("--validation")
    w.add_argument("--predictions")
    w.add_argument("--plot", help="write the validation bar chart here")
    w.add_argument("--repredict", action="store_true", help="predict the validation again with this model")
    w.add_argument("--write", help="with --repredict: write the validation file with the new predictions here")
    w.add_argument("--title", default="S = 2, depth 16: predicted against measured")
    args = p.parse_args(argv)
    if args.cmd == "report":
        return cmd_report(args)
    if args.cmd == "predict":
        return cmd_predict(args)
    if args.cmd == "timeline":
        return cmd_timeline(args)
    if args.cmd == "measure":
        return cmd_measure(args)
    if args.cmd == "validate":
        return cmd_validate(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
