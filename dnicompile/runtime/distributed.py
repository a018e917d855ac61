"""The distributed runtime: a contiguous group of stages per rank, over torch.distributed.

The messages follow the stage graph ([Note: stage DAG] in compile/partition.py; [Note: a stage DAG across
ranks] below): in a chain a rank receives from the rank before and sends to the next; where branches are
independent each tensor goes straight from the rank of its producer to the ranks of the stages that read it.

Each rank builds the same program (same seed, same initial weights) and owns the stages that the
placement gives it. Every rank draws the same batches from the same seed, so only boundary tensors and
gradients travel:

- forward: the boundary tensors of batch t go to the next rank with non-blocking sends; the next rank
  posts its receive for batch t+1 as soon as batch t has arrived, so the transfer overlaps its compute;
- across a synthetic cut, a rank steps with its synthetic gradient and goes on to batch t+1; the true
  gradient of batch t comes back later (irecv) and trains the cut's synthesizer, paired with the h_t the
  rank kept (a queue of at most `queue_depth` batches; its age is reported as `staleness`);
- across a delayed cut ([Note: delayed gradients across ranks]), a rank sends h_t, posts the receive of its
  true gradient and steps with the gradient of batch t - delay, which the next rank sent while this one was
  working on later batches;
- across an exact cut, a rank waits for the true gradient of batch t: ordinary pipeline parallelism.
  A rank sends the gradient of its input back before it runs its optimizer, so the rank before it
  waits for one backward, not for a backward and an update. With `distributed.microbatches` the batch is
  split and run with a pipeline schedule ([Note: microbatch schedules]).

Per-cut statistics (cosine, synthesizer loss, staleness) reach the driver with non-blocking sends every
`log_every` steps; no rank waits for another to report them.

Every wait has a timeout (spec `distributed.timeout_s`), so a rank that dies or hangs makes the others
fail within that time instead of hanging. Launch with `dnicompile ... --train --workers N` (processes
on this host), or with `torchrun ... -m dnicompile ...` across hosts.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..checkpoint import Checkpoint, restore_worker, worker_entries, write_checkpoint
from ..checkpoint import find_checkpoint as _find
from ..errors import SpecError
from .local import LocalRuntime, StepResult
from .placement import plan_placement
from .state import FORMAT
from .tied import TiedReplicas
from .transport import P2P, emulated_link

STATS_TAG = 7  # p2p tag of the per-rank statistics sent to the driver (activations and gradients use 0)

# [Note: delayed gradients across ranks] A delayed cut between rank r and r+1 runs the local runtime's semantics
# ([Note: delayed gradients] in interfaces.py) over messages. Rank r runs its group's forward through the cut's
# interface, sends h_t and posts the receive of delta_t; rank r+1 sends delta_t at the end of its step t, as for
# a synthetic cut (or, where rank r+1's own stages end at a delayed cut, the input gradient of the batch its
# due backward ran: the delays add, as in one process). Deltas come back in batch order. With a fixed delay d,
# rank r at step t takes the gradient of batch t - d - lag (lag: the delays of the delayed cuts after this one
# that feed it), waiting for it if it has not come yet, and records it as arrived at step t - d, when it was
# computed: so the run is the local runtime's, step for step (a test compares the parameters). With `delay:
# auto` (only where lag is 0) rank r waits for nothing: each step it takes the deltas that have come and steps
# with the oldest, or skips its update when none has; it waits only when more than `queue_depth` batches (at
# least one) are owed a gradient. Draining (evaluation, checkpoints) takes every delta the next rank has sent by
# then; the interface's queue (with those deltas) is the checkpoint's, and a resumed rank posts receives for the
# batches still owed one. Delayed cuts inside a rank that also has a delayed cut at its edge are refused (their
# gradients would have to cross the same step's backward between ranks); put them between ranks.


# [Note: a stage DAG across ranks] What a rank receives is what its stages read from stages on other ranks
# (`inbound`: per producer stage, its rank and the tensors, in the order the stage graph gives them), and what it
# sends is what stages on other ranks read from its last stage (`outbound`: per rank, the tensors that rank reads).
# In a chain that is the cut before its first stage, from the rank before, and the cut after its last stage, to
# the next rank: the same messages as ever. In a DAG a tensor goes straight from its producer's rank to each rank
# that reads it, and a rank whose stages read only the program inputs (a tower) starts its step without waiting
# for anyone: the two towers of examples/two_tower.py on two ranks run at the same time. Gradients go back along
# the same edges: the kind of the cut after the producer (exact: the producer waits for the sum of its readers'
# gradients; synthetic: that sum comes later and trains the synthesizer; local: nothing). Delayed cuts and
# microbatch schedules need a chain; on a DAG a rank sends only from its last stage (what a contiguous placement
# of branches gives: a tower, then the next, then the head).


# [Note: microbatch schedules] With `distributed: {microbatches: M, schedule: 1f1b | gpipe}` and only exact cuts,
# a step splits the batch into M microbatches (torch.tensor_split along dim 0) and each rank runs its stages' forwards
# (F i) and backwards (B i) in the schedule's order (`schedule_order`): GPipe runs every forward, then every backward;
# 1F1B runs min(M, world - rank - 1) forwards, then alternates one forward and one backward, then the backwards
# left, so a rank keeps at most world - rank microbatches' activations. The receives of the step's activations and
# gradients are posted when the step starts; sends do not wait. The last rank weights microbatch i's loss by its
# share of the batch (n_i / N): for a loss that is a mean over the batch (torch's default reduction) the gradients
# accumulated over the microbatches are the whole batch's, and each rank steps once, so the parameters follow the
# local runtime's (to rounding). Batch norm normalizes each microbatch, as in torch.distributed.pipelining: such a
# model trains differently from the whole batch. The schedule is built on this runtime's transport rather than
# handed to torch.distributed.pipelining so that the same timeouts, statistics, checkpoints and link emulation
# ([Note: link emulation]) serve every kind of cut.


def check_microbatches(program) -> int:
    """`distributed.microbatches` of a program, refused where a cut is not exact ([Note: microbatch schedules])."""
    spec = program.spec
    m = spec.distributed.microbatches
    decoupled = [c for c in program.cuts if not program.runtime.interfaces[c.index].exact]
    if m > 1 and not program.chain:
        raise SpecError(
            f"{spec.where('distributed', 'microbatches')}: microbatch schedules run a chain of stages, and this "
            f"program's stage graph is not one ({program.describe_edges()}); remove `microbatches`."
        )
    if m > 1 and decoupled:
        cut = decoupled[0]
        raise SpecError(
            f"{spec.where('distributed', 'microbatches')}: microbatches run a pipeline schedule over exact cuts, and "
            f"cut `{cut.name}` is {program.runtime.interfaces[cut.index].kind}; remove `microbatches` or make every "
            "cut exact."
        )
    return m


def schedule_order(schedule: str, microbatches: int, rank: int, world: int) -> list[tuple[str, int]]:
    """One step's actions on `rank`, in order: ("F", i) forward of microbatch i, ("B", i) its backward."""
    m = microbatches
    if schedule == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warm = min(m, world - rank - 1)
    order = [("F", i) for i in range(warm)]
    for i in range(m):
        if warm + i < m:
            order.append(("F", warm + i))
        order.append(("B", i))
    return order


# --------------------------------------------------------------------------- one rank
@dataclass
class _Awaiting:
    """A batch whose true gradient across the outgoing synthetic cut has not been used yet."""

    step: int
    batch: int
    h: dict  # tensor name -> h_t (detached)
    context: torch.Tensor | None
    works: list
    deltas: dict  # tensor name -> buffers the irecvs fill (one per rank that reads it: their sum is delta)


class _Arriving(Mapping):
    """The tensors of one inbound edge by name, waited for when a stage first reads one ([Note: a stage DAG across
    ranks]); floating-point ones require grad where the producer's cut sends a gradient back."""

    def __init__(self, names: list[str], bufs: list, wait, back: bool) -> None:
        self.names, self._bufs, self._wait, self._back = names, bufs, wait, back
        self._values: tuple | None = None

    def tensors(self) -> tuple:
        if self._values is None:
            self._wait()
            self._values = tuple(v.requires_grad_(self._back) if v.is_floating_point() else v for v in self._bufs)
        return self._values

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors()[self.names.index(name)]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class RankStats:
    staleness: list[int] = field(default_factory=list)
    result: StepResult | None = None
    cosine: dict[str, float] = field(default_factory=dict)  # the outgoing cut's latest, when asked for
    synth_loss: dict[str, float] = field(default_factory=dict)
    steps: int = 0  # training steps since the last report
    cpu_mark: float = field(default_factory=time.process_time)  # process CPU time at the last report
    paused_at: float = 0.0


class RankWorker:
    """The stages [first, last] of a program on one rank."""

    def __init__(self, program, rank: int, world: int, placement: list[tuple[int, int]], device, timeout_s: float):
        self.program = program
        self.rank, self.world = rank, world
        self.placement = placement
        self.first, self.last = placement[rank]
        self.device = device
        self.timeout = timedelta(seconds=timeout_s)
        self.rt: LocalRuntime = program.runtime
        self.tied = TiedReplicas(program, rank, placement, self.rt)  # tied tensors shared with other ranks
        self.depth = program.spec.distributed.queue_depth
        self.awaiting: deque[_Awaiting] = deque()
        self.stats = RankStats()
        self.prefetched: tuple[int, list] | None = None  # (step, [(buffers, works)] per inbound edge) posted early
        self.in_cut = program.cut_before(self.first)  # [Note: stage graph]; in a chain, what all comes in
        self.out_cut = program.cut_after(self.last)
        self.inbound, self.outbound = self._edges()  # [Note: a stage DAG across ranks]
        self.is_driver = rank == world - 1
        self.p2p = P2P(rank, self.stage_names, self.timeout, emulated_link(program.spec.distributed))
        self.delayed_out = self._delayed_out()  # the outgoing cut's DelayedGradientInterface, if it is one
        self.owed: deque = deque()  # (step, buffers, works): deltas of the delayed outgoing cut not taken yet
        self.lag = self._lag(self.out_cut) if self.delayed_out is not None else 0
        # the stages of this rank start a group that ends at its delayed outgoing cut: the gradient this rank
        # sends back is that of the batch its due backward ran, not of this step's batch
        self.sends_due = self.delayed_out is not None and self.rt.delayed_groups.get(self.first, (None,))[0] is (
            self.out_cut
        )
        self.microbatches = check_microbatches(program)
        self.order = schedule_order(program.spec.distributed.schedule, self.microbatches, rank, world)

    @property
    def stage_names(self) -> str:
        return ", ".join(s.name for s in self.program.stages[self.first : self.last + 1])

    def _edges(self) -> tuple[list, list]:
        """[Note: a stage DAG across ranks] inbound: (producer stage, its rank, tensors) for each stage on another
        rank that this rank's stages read; outbound: (rank, tensors) for each rank that reads this rank's last
        stage. Refuses a stage that is not this rank's last and is read on another rank."""
        program, mine = self.program, range(self.first, self.last + 1)
        rank_of = {s: r for r, (a, b) in enumerate(self.placement) for s in range(a, b + 1)}
        inbound: dict[int, list] = {}
        outbound: dict[int, list] = {}
        for v in range(program.num_stages):
            for b, src in program.partition.stage_inputs[v]:
                if v in mine and src >= 0 and src not in mine:
                    if b not in inbound.setdefault(src, []):
                        inbound[src].append(b)
                elif src in mine and v not in mine:
                    if src != self.last:
                        raise SpecError(
                            f"{program.spec.where('distributed', 'placement')}: stage{v} on rank {rank_of[v]} reads "
                            f"`{b.name}` from stage{src}, which is not the last stage of rank {self.rank} "
                            f"(stages {self.first}..{self.last}); a rank sends only from its last stage: place the "
                            "stages so that each rank's last stage is the one the others read."
                        )
                    if b not in outbound.setdefault(rank_of[v], []):
                        outbound[rank_of[v]].append(b)
        return (
            [(u, rank_of[u], tuple(ts)) for u, ts in sorted(inbound.items())],
            [(r, tuple(ts)) for r, ts in sorted(outbound.items())],
        )

    def _delayed_out(self):
        """The outgoing cut's interface if it is delayed; refuses what the runtime cannot run across ranks."""
        rt, cuts = self.rt, self.program.cuts
        mine = [c for c in cuts if self.first <= c.index < self.last and rt.interfaces[c.index].kind == "delayed"]
        edge = [c for c in (self.in_cut, self.out_cut) if c is not None and rt.interfaces[c.index].kind == "delayed"]
        spec = self.program.spec
        if mine and edge:
            raise SpecError(
                f"{spec.where('cuts')}: delayed cut `{mine[0].name}` is inside rank {self.rank}, which also has "
                f"delayed cut `{edge[0].name}` at its edge; put delayed cuts between ranks (`distributed.placement`) "
                "or all on one rank."
            )
        for c in mine:
            if rt.interfaces[c.index].delay == "auto":
                raise SpecError(
                    f"{spec.where('cuts')}: `delay: auto` on cut `{c.name}`, which is inside rank {self.rank}: auto "
                    "means as late as the gradient arrives from the next rank; give a delay in steps, or place the "
                    "cut between ranks."
                )
        if self.out_cut is None or rt.interfaces[self.out_cut.index].kind != "delayed":
            return None
        iface = rt.interfaces[self.out_cut.index]
        chain, nxt = [], rt.delayed_groups.get(self.out_cut.index + 1)
        while nxt is not None:  # the delayed cuts whose backward feeds this one
            chain.append(nxt[0])
            nxt = rt.delayed_groups.get(nxt[0].index + 1)
        warm = [c for c in [self.out_cut, *chain] if rt.interfaces[c.index].warmup]
        if chain and warm:
            raise SpecError(
                f"{spec.where('cuts')}: `warmup` on delayed cut `{warm[0].name}`, which is chained with delayed cut "
                f"`{(chain[0] if warm[0] is self.out_cut else self.out_cut).name}` across ranks; warm-up is supported on "
                "a delayed cut between ranks whose gradient comes straight from the next rank: remove `warmup` or the "
                "chain."
            )
        if iface.delay == "auto" and self._lag(self.out_cut):
            raise SpecError(
                f"{spec.where('cuts')}: `delay: auto` on cut `{self.out_cut.name}`, whose gradient comes from "
                "another delayed cut's backward; give it a delay in steps."
            )
        return iface

    def _lag(self, cut) -> int:
        """How many steps after its batch the true gradient at `cut` is computed: the delays of the delayed
        cuts that feed it ([Note: delayed gradients across ranks])."""
        rt = self.rt
        group = rt.delayed_groups.get(cut.index + 1)  # the stages after the cut end at a delayed cut
        if group is None:
            return 0
        nxt = group[0]
        delay = rt.interfaces[nxt.index].delay
        return (0 if delay == "auto" else int(delay)) + self._lag(nxt)

    # ---------------------------------------------------------------- messages
    def _shape(self, b, batch: int) -> tuple[int, ...]:
        example_batch = self.program.example_batch
        return (batch, *b.shape[1:]) if b.shape and b.shape[0] == example_batch else tuple(b.shape)

    def send(self, tensors, dst: int, tag: int = 0) -> None:
        """Send without waiting; at most 4 * queue_depth batches' sends in flight (see P2P.send)."""
        self.p2p.send(tensors, dst, tag, keep=4 * max(1, len(tensors)) * self.depth)

    def post_recv(self, tensors, batch: int, src: int) -> tuple[list, list]:
        bufs = [torch.empty(self._shape(b, batch), dtype=b.dtype, device=self.device) for b in tensors]
        return bufs, [self.p2p.irecv(buf, src) for buf in bufs]

    def recv(self, tensors, batch: int, src: int, what: str) -> tuple[torch.Tensor, ...]:
        bufs, works = self.post_recv(tensors, batch, src)
        for b, work in zip(tensors, works):
            self.p2p.wait(work, f"{what} of `{b.name}` from rank {src}")
        return tuple(bufs)

    def post_activations(self, batch: int) -> list[tuple[list, list]]:
        """Post the receives of one batch's tensors on every inbound edge."""
        return [self.post_recv(tensors, batch, src) for _, src, tensors in self.inbound]

    def recv_activations(self, step: int, batch: int, prefetch: bool = False) -> list[_Arriving]:
        """The tensors of batch `step` on each inbound edge (from the receives posted during the previous step, if
        any), each edge waited for when a stage first reads it; with `prefetch`, the next step's receives are
        posted too."""
        if self.prefetched is not None:
            pre_step, posted = self.prefetched
            self.prefetched = None
            if pre_step != step or any(p is None or p[0][0].shape[0] != batch for p in posted):
                raise RuntimeError(f"rank {self.rank}: posted a receive for batch {pre_step} but batch {step} came")
        else:
            posted = self.post_activations(batch)
        following: list = [None] * len(self.inbound)  # the next step's receives, each posted once this one's came
        if prefetch:
            self.prefetched = (step + 1, following)
        arriving = []
        for k, ((u, src, tensors), (bufs, works)) in enumerate(zip(self.inbound, posted)):

            def wait(k=k, tensors=tensors, works=works, src=src) -> None:
                for b, work in zip(tensors, works):
                    self.p2p.wait(work, f"activations of batch {step} (`{b.name}`) from rank {src}")
                if prefetch:  # one receive at a time per edge: the next is posted when this one has come
                    following[k] = self.post_recv(tensors, batch, src)

            arriving.append(_Arriving([b.name for b in tensors], bufs, wait, self.rt.interfaces[u].sends_back))
        return arriving

    def available(self, x: torch.Tensor, inbound: list) -> dict:
        """What this rank's stages may read (LocalRuntime.run_stages): the program inputs and the tensors
        received on each inbound edge (tuples, or _Arriving edges waited for when first read)."""
        received = self.rt.program_inputs((x,))
        for (u, _, tensors), values in zip(self.inbound, inbound):
            received[u] = values if isinstance(values, _Arriving) else {b.name: v for b, v in zip(tensors, values)}
        return received

    def send_outputs(self, outputs: tuple) -> None:
        """Send the last stage's outputs to each rank that reads them (the tensors it reads)."""
        by_name = {b.name: h for b, h in zip(self.out_cut.sent, outputs)}
        for dst, tensors in self.outbound:
            self.send([by_name[b.name] for b in tensors], dst)

    def float_boundary(self, cut):
        return [b for b in cut.boundary if b.dtype.is_floating_point]

    # ---------------------------------------------------------------- a training step
    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor, stats: bool = True, prefetch: bool = False):
        """One step of this rank's stages on batch `step`. `stats`: measure the outgoing cut's cosine and
        synthesizer loss (a few steps before each log line is enough); `prefetch`: the next step is a
        training step of the same batch size, so its activations may be received during this one."""
        rt = self.rt
        rt.step = step
        ctx = rt.begin_step((x,), y)
        self.tied.zero_grad()
        batch = x.shape[0]
        if self.microbatches > 1:
            return self.train_microbatches(ctx, x)
        # a stage that reads only the program inputs (a tower) runs before anything has come from other ranks
        arriving = self.recv_activations(step, batch, prefetch) if self.inbound else []
        outputs, open_group = rt.run_stages(self.first, self.last, self.available(x, arriving), ctx)
        inbound = [edge.tensors() for edge in arriving]
        due = None
        # the group's backward; its update waits until the gradient for the rank before is on its way
        if self.out_cut is None:
            rt.apply_loss(outputs, ctx, [])
        elif self.delayed_out is not None:
            self.send(outputs, self.rank + 1)
            self.owe(step, batch)
            due = self.delayed_backward(step, ctx)
        else:
            self.send_outputs(outputs)
            if self.out_cut.exact:
                floats = [(b, h) for b, h in zip(self.out_cut.sent, outputs) if h.requires_grad]
                grads = self.recv_grads(batch, f"the true gradient of batch {step}")
                rt.backward(ctx, [h for _, h in floats], [grads[b.name] for b, _ in floats])
            else:
                preds = rt.apply_synthetic_gradient(self.out_cut, outputs, ctx, [], ends=self.ends(ctx))
                if rt.interfaces[self.out_cut.index].sends_back:
                    self.await_delta(step, outputs, preds, ctx.context, batch)
        for (u, src, _), values in zip(self.inbound, inbound):
            if not self.rt.interfaces[u].sends_back:
                continue
            # the gradient this rank sends back: delta for the cut after stage u
            if not self.sends_due:
                grads = [v.grad if v.grad is not None else torch.zeros_like(v) for v in values]
            elif due is not None:  # that of the batch whose backward ran ([Note: delayed gradients across ranks])
                grads = [g if g is not None else torch.zeros_like(v) for g, v in zip(due[1], values)]
            else:
                grads = None
            if grads is not None:
                self.send([g for g, v in zip(grads, values) if v.is_floating_point()], src)
        rt.step_stages(open_group, ctx.ticks)
        self.tied.step(ctx.ticks)  # sum the gradients of tied tensors with the other ranks holding them; update
        rt.learn_synthesizers(ctx)  # cuts inside this rank
        self.use_deltas(block=False, stats=stats)
        self.stats.result = ctx.result
        self.stats.steps += 1
        return ctx.result

    def train_microbatches(self, ctx, x: torch.Tensor):
        """One step of this rank's stages as `self.order` runs the batch's microbatches ([Note: microbatch
        schedules])."""
        rt, m, batch = self.rt, self.microbatches, x.shape[0]
        if batch < m:
            raise SpecError(
                f"{self.program.spec.where('distributed', 'microbatches')}: {m} microbatches of a batch of {batch}; "
                f"use a batch of at least {m} samples or fewer microbatches."
            )
        xs = x.tensor_split(m)
        ys = ctx.target.tensor_split(m) if ctx.target is not None else [None] * m
        sizes = [len(t) for t in xs]
        acts = [self.post_recv(self.in_cut.sent, n, self.rank - 1) for n in sizes] if self.in_cut is not None else None
        grads = [self.post_grads(n) for n in sizes] if self.out_cut is not None else None
        kept: dict[int, tuple] = {}  # microbatch -> (what the stages ran on, their outputs or the weighted loss)
        loss, outputs = 0.0, [None] * m
        for action, i in self.order:
            if action == "F":
                if self.in_cut is None:
                    values = (xs[i],)
                else:
                    bufs, works = acts[i]
                    for b, work in zip(self.in_cut.sent, works):
                        self.p2p.wait(work, f"activations of microbatch {i} (`{b.name}`) from rank {self.rank - 1}")
                    values = tuple(v.requires_grad_(True) if v.is_floating_point() else v for v in bufs)
                out, _ = rt.run_stages(self.first, self.last, self.available(xs[i], [values] if acts else []), ctx)
                if self.out_cut is None:
                    weighted = rt.loss(out, ys[i]) * (sizes[i] / batch)
                    loss += float(weighted.detach())
                    outputs[i] = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)
                    kept[i] = (values, weighted)
                else:
                    self.send(out, self.rank + 1)
                    kept[i] = (values, out)
            else:
                values, out = kept.pop(i)
                if self.out_cut is None:
                    out.backward()
                else:
                    bufs, works = grads[i]
                    for b, work in zip(self.float_boundary(self.out_cut), works):
                        self.p2p.wait(
                            work, f"the true gradient of microbatch {i} (`{b.name}`) from rank {self.rank + 1}"
                        )
                    floats = [h for h in out if h.is_floating_point()]
                    pairs = [(h, g) for h, g in zip(floats, bufs) if h.requires_grad]
                    if pairs:
                        torch.autograd.backward([h for h, _ in pairs], [g for _, g in pairs])
                if self.in_cut is not None:
                    back = [
                        v.grad if v.grad is not None else torch.zeros_like(v) for v in values if v.is_floating_point()
                    ]
                    self.send(back, self.rank - 1)
        rt.step_stages(list(range(self.first, self.last + 1)), ctx.ticks)
        self.tied.step(ctx.ticks)
        if self.out_cut is None:
            ctx.result.loss = loss
            ctx.result.output = _concat(outputs)
        self.stats.result = ctx.result
        self.stats.steps += 1
        return ctx.result

    def post_grads(self, batch: int) -> tuple[list, list]:
        """Post the receives of a batch's gradients across the outgoing cut (its floating-point tensors)."""
        bufs = [
            torch.empty(self._shape(b, batch), dtype=b.dtype, device=self.device)
            for b in self.float_boundary(self.out_cut)
        ]
        return bufs, [self.p2p.irecv(buf, self.rank + 1) for buf in bufs]

    def outbound_grad_buffers(self, batch: int) -> list[tuple[int, object, torch.Tensor]]:
        """(rank, tensor, buffer) for the gradient of each floating-point tensor the last stage sends, from each
        rank that reads it ([Note: a stage DAG across ranks])."""
        return [
            (dst, b, torch.empty(self._shape(b, batch), dtype=b.dtype, device=self.device))
            for dst, tensors in self.outbound
            for b in tensors
            if b.dtype.is_floating_point
        ]

    def recv_grads(self, batch: int, what: str) -> dict:
        """The gradients of the last stage's outputs from each rank that reads them, summed by tensor."""
        grads: dict[str, torch.Tensor] = {}
        for dst, b, buf in self.outbound_grad_buffers(batch):
            self.p2p.recv(buf, dst, f"{what} (`{b.name}`) from rank {dst}")
            grads[b.name] = grads[b.name] + buf if b.name in grads else buf
        return grads

    def ends(self, ctx) -> list:
        """The other ends of the last group's backward, kept by run_stages ([Note: running a stage DAG])."""
        ends, ctx.roots = ctx.roots, []
        return ends

    # ---------------------------------------------------------------- a delayed outgoing cut
    def owe(self, step: int, batch: int) -> None:
        """Post the receive of batch `step`'s true gradient across the delayed outgoing cut."""
        bufs = [
            torch.empty(self._shape(b, batch), dtype=b.dtype, device=self.device)
            for b in self.float_boundary(self.out_cut)
        ]
        self.owed.append((step, bufs, [self.p2p.irecv(buf, self.rank + 1) for buf in bufs]))

    def take(self, upto: int | None, block: bool) -> None:
        """Hand the interface the deltas of the owed batches up to step `upto` (every owed one for None): those
        that have come, or, with `block`, waiting for them. Each is recorded as arrived when it was computed."""
        iface = self.delayed_out
        names = [b.name for b in self.float_boundary(self.out_cut)]
        while self.owed and (upto is None or self.owed[0][0] <= upto):
            step, bufs, works = self.owed[0]
            if not block and not all(w.is_completed() for w in works):
                return
            for w in works:
                self.p2p.wait(w, f"the true gradient of batch {step} from rank {self.rank + 1}")
            self.owed.popleft()
            arrived = self.rt.step if iface.delay == "auto" else step + self.lag
            iface.arrive(step, dict(zip(names, bufs)), arrived)

    def delayed_backward(self, step: int, ctx):
        """The backward that is due at step `step` across the delayed outgoing cut, and the group's update
        ([Note: delayed gradients across ranks]); returns (batch, gradient of the group's inputs) or None."""
        iface, rt = self.delayed_out, self.rt
        if step < iface.warmup:  # delay 0: wait for this batch's gradient, as across an exact cut
            self.take(step - self.lag, block=True)
        elif iface.delay == "auto":
            self.take(None, block=False)
            owed = sum(1 for e in iface.queue if e.arrived is None)
            if owed > max(1, self.depth):  # too far ahead: wait for the oldest
                self.take(self.owed[0][0], block=True)
        else:
            self.take(step - int(iface.delay) - self.lag, block=True)
        measure = rt.measures(iface, step)
        done = iface.backward_due(step, measure=measure)
        stages = rt.delayed_groups[self.first][1] if self.sends_due else []
        if done is None:
            for s in stages:
                ctx.result.ticked[s] = False
            return None
        rt.step_stages(stages, ctx.ticks)
        ctx.result.staleness[iface.name] = iface.staleness
        self.stats.staleness.append(iface.staleness)
        if measure and iface.cosine is not None:
            ctx.result.cosine[iface.name] = iface.cosine
        return done

    def post_owed(self) -> None:
        """After loading a checkpoint: receive the gradients its delayed cut's queue is still owed, in order."""
        if self.delayed_out is None:
            return
        for entry in self.delayed_out.queue:
            if entry.arrived is None:
                batch = entry.inputs[0].shape[0] if entry.inputs else self.program.example_batch
                self.owe(entry.step, batch)

    def await_delta(self, step: int, outputs, preds: dict, context, batch: int) -> None:
        deltas, works = {}, []
        for dst, b, buf in self.outbound_grad_buffers(batch):
            works.append(self.p2p.irecv(buf, dst))
            deltas.setdefault(b.name, []).append(buf)
        h = {b.name: t.detach() for b, t in zip(self.out_cut.sent, outputs) if b.name in preds}
        self.awaiting.append(_Awaiting(step, batch, h, context, works, deltas))

    def use_deltas(self, block: bool, stats: bool = True) -> None:
        """Train the outgoing cut's synthesizer on every true gradient that has arrived; wait for the
        oldest ones when the queue is longer than its depth (or for all of them when `block`)."""
        while self.awaiting:
            head = self.awaiting[0]
            must_wait = block or len(self.awaiting) > self.depth
            if not must_wait and not all(w.is_completed() for w in head.works):
                return
            for w in head.works:
                self.p2p.wait(w, f"the true gradient of batch {head.step} from the ranks after this one")
            self.awaiting.popleft()
            self.stats.staleness.append(self.rt.step - head.step)
            self.learn_from_delta(head, stats)

    def learn_from_delta(self, head: _Awaiting, stats: bool) -> None:
        """The outgoing cut's interface learns from the true gradient of a kept batch, with its models as they
        are now (the prediction is made again: see SyntheticInterface.learn); cosine and loss only when
        `stats`, the latest one reported."""
        iface = self.rt.interfaces[self.out_cut.index]
        if stats:
            iface.stats.reset()
        deltas = {name: bufs[0] if len(bufs) == 1 else torch.stack(bufs).sum(0) for name, bufs in head.deltas.items()}
        loss = iface.learn(head.h, head.context, deltas, head.batch, stats=stats)
        if stats and loss is not None:
            self.stats.cosine[iface.name] = iface.stats.cosine
            self.stats.synth_loss[iface.name] = loss

    def drain(self) -> None:
        """Use every outstanding true gradient and finish every send (before evaluation and checkpoints)."""
        self.use_deltas(block=True)
        if self.delayed_out is not None:  # what the next rank has sent by now: its batches up to step - lag
            self.take(self.rt.step - self.lag if self.delayed_out.delay != "auto" else None, block=True)
        if self.prefetched is not None:
            raise RuntimeError(f"rank {self.rank}: a receive for batch {self.prefetched[0]} is still posted")
        self.p2p.flush()

    # ---------------------------------------------------------------- statistics
    def reported_cuts(self, rank: int | None = None) -> list:
        """The synthetic cuts whose statistics rank `rank` (default: this one) reports: its outgoing cut
        and the cuts between its own stages."""
        first, last = self.placement[self.rank if rank is None else rank]
        cuts = self.program.cuts
        return [cuts[c] for c in range(first, min(last + 1, len(cuts))) if not cuts[c].exact]

    def stats_vector(self, result: StepResult) -> torch.Tensor:
        """[staleness sum, staleness count, CPU ms per step since the last report, then cosine and
        synthesizer loss of each reported cut] (NaN where not measured yet); starts a new report."""
        cosine = {**result.cosine, **self.stats.cosine}
        synth_loss = {**result.synth_loss, **self.stats.synth_loss}
        cpu = time.process_time()
        steps = self.stats.steps
        cpu_ms = 1e3 * (cpu - self.stats.cpu_mark) / steps if steps else math.nan
        values = [float(sum(self.stats.staleness)), float(len(self.stats.staleness)), cpu_ms]
        for cut in self.reported_cuts():
            values += [cosine.get(cut.name, math.nan), synth_loss.get(cut.name, math.nan)]
        self.stats.staleness, self.stats.steps, self.stats.cpu_mark = [], 0, cpu
        return torch.tensor(values, dtype=torch.float64)

    def pause_stats(self) -> None:
        """Leave what follows (evaluation, checkpoints) out of the CPU time per step."""
        self.stats.cpu_mark += time.process_time() - self.stats.paused_at

    def mark_pause(self) -> None:
        self.stats.paused_at = time.process_time()

    def gather_stats(self, result: StepResult) -> dict | None:
        """Every rank's statistics on the driver (None elsewhere). Other ranks send theirs without
        waiting; the driver receives them (they are never behind it: its batch comes through them)."""
        mine = self.stats_vector(result)
        if not self.is_driver:
            self.send([mine], self.world - 1, tag=STATS_TAG)
            return None
        vectors = {self.rank: mine}
        for r in range(self.world - 1):
            buf = torch.empty(3 + 2 * len(self.reported_cuts(r)), dtype=torch.float64)
            self.p2p.recv(buf, r, f"the statistics of rank {r}", tag=STATS_TAG)
            vectors[r] = buf
        stale_sum = sum(float(v[0]) for v in vectors.values())
        stale_n = sum(float(v[1]) for v in vectors.values())
        cosine, synth_loss = {}, {}
        for r, v in sorted(vectors.items()):
            for i, cut in enumerate(self.reported_cuts(r)):
                c, loss = float(v[3 + 2 * i]), float(v[4 + 2 * i])
                if not math.isnan(c):
                    cosine[cut.name] = c
                if not math.isnan(loss):
                    synth_loss[cut.name] = loss
        return {
            "cosine": cosine,
            "synth_loss": synth_loss,
            "staleness": stale_sum / stale_n if stale_n else 0.0,
            # process CPU time (all its threads) per training step of each rank: how the work is balanced
            "cpu_ms_per_step": [
                None if math.isnan(float(v[2])) else round(float(v[2]), 2) for _, v in sorted(vectors.items())
            ],
        }

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float] | None:
        """Test accuracy and loss, computed by the pipeline; returned on the driver, None elsewhere."""
        self.program.eval()
        correct, loss_sum = 0, 0.0
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size].to(self.device), y[i : i + batch_size].to(self.device)
            received = self.rt.program_inputs((xb,))
            for u, src, tensors in self.inbound:
                received[u] = dict(zip((b.name for b in tensors), self.recv(tensors, len(xb), src, "eval activations")))
            for s in range(self.first, self.last + 1):
                values = self.program.stages[s](*self.rt.stage_inputs(s, received))
                if s < self.last:
                    received[s] = {b.name: v for b, v in zip(self.program.cuts[s].sent, values)}
            if self.out_cut is not None:
                self.send_outputs(values)
            else:
                correct += int((values.argmax(-1) == yb).sum())
                loss_sum += float(torch.nn.functional.cross_entropy(values, yb, reduction="sum"))
        self.drain()
        self.program.train()
        return (correct / len(x), loss_sum / len(x)) if self.is_driver else None

    # ---------------------------------------------------------------- state
    def owned_state(self) -> dict:
        """This rank's stages' parameters and buffers, by the model's own state_dict keys."""
        state = {}
        for s in range(self.first, self.last + 1):
            for k, v in self.program.stages[s].graph_module.state_dict().items():
                state[k] = v.detach().cpu()
        return state

    def runtime_state(self) -> dict:
        """The state of this rank's stages (optimizer, scheduler, clock) and of its cuts' interfaces."""
        mine = range(self.first, self.last + 1)
        rt = self.rt
        return {
            "format": FORMAT,
            "stages": {s: rt.stages[s].state_dict() for s in mine},
            "interfaces": {
                rt.interfaces[c].name: rt.interfaces[c].state_dict() for c in mine if c < len(self.program.cuts)
            },
            "tied": self.tied.state_dict(),
        }

    def load_runtime_state(self, state: dict) -> None:
        rt = self.rt
        if state.get("format", 1) == 1:  # [Note: checkpoint format]
            names = {c: (None if rt.interfaces[c].exact else rt.interfaces[c].name) for c in state["synthesizers"]}
            state = {
                "stages": {
                    s: {"optimizer": state["optimizers"][s], "scheduler": state["schedulers"][s], "clock": c}
                    for s, c in state["clocks"].items()
                },
                "interfaces": {
                    names[c]: {
                        "models": m,
                        "optimizer": state["synth_optimizers"][c][0],
                        "input_optimizer": state["synth_optimizers"][c][1],
                    }
                    for c, m in state["synthesizers"].items()
                    if names[c] is not None and m is not None
                },
                "tied": state.get("tied", []),
            }
        self.tied.load_state_dict(state.get("tied", []))
        for s, v in state["stages"].items():
            rt.stages[s].load_state_dict(v)
        for iface in rt.interfaces:
            if iface.name in state["interfaces"]:
                iface.load_state_dict(state["interfaces"][iface.name])
        self.post_owed()


# [Note: resuming on other workers] A checkpoint holds each stage's state by stage index (optimizer, scheduler,
# clock), each cut's interface by cut name and the model's tensors by their state_dict keys ([Note: dcp
# checkpoints] in checkpoint.py), so a run can resume on another number of workers, another placement, or in one
# process (and one process's checkpoint on several workers): each rank reads the keys of its stages; the task's
# state (data position) and the random state come from the rank that held the last stage (each rank's own where
# the placement is the same). Queues in flight were drained before the checkpoint was written (synthetic cuts' true
# gradients), so nothing travelling is lost. Two things are tied to the placement and are refused with the way
# out: tied tensors shared between ranks (their optimizer is a replica per rank, not a stage's) and delayed cuts
# (their pending batches wait for gradients from the rank after the cut).


def _concat(parts: list):
    """The microbatches' outputs joined into the batch's: tensors with a batch dimension are concatenated, a scalar
    (a loss the model returns) is the last microbatch's."""
    leaves, spec = tree_flatten(parts[0])
    columns = list(zip(*(tree_flatten(p)[0] for p in parts)))
    joined = [
        torch.cat(col) if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else col[-1]
        for leaf, col in zip(leaves, columns)
    ]
    return tree_unflatten(joined, spec)


def distributed_runtime(program, placement=None, device=None, timeout_s: float | None = None) -> RankWorker:
    """This process's part of `program` in the default process group, which must be initialized
    (`torch.distributed.init_process_group`, gloo on CPU or NCCL on GPU), the way `PipelineStage` takes a module
    and a group: the run of stages `placement` gives this rank (a list of [first, ..., last] stage lists, one per
    rank; default: the spec's `distributed.placement`, balanced by parameters). Every rank builds the same
    program and runtime from the same seed ([Note: seeds]) and calls `train_step(step, x, y)` on the same
    batches; only boundary tensors and gradients travel. `drain()` before reading the parameters."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distributed_runtime needs torch.distributed initialized: call init_process_group first")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = program.spec.distributed
    if placement is not None:
        config = config.model_copy(update={"placement": [list(g) for g in placement]})
    ranges = plan_placement(program, world, config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    return RankWorker(program, rank, world, ranges, device, timeout_s or config.timeout_s)


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(worker: RankWorker, out_dir: Path, step: int, keep: int = 2, task: dict | None = None) -> Path:
    """Every rank writes the keys of its stages into ckpt-<step>/ with torch.distributed.checkpoint; the driver
    finishes the folder (merged metadata, fsynced, renamed into place), points LATEST at it and keeps the newest
    `keep` checkpoints ([Note: dcp checkpoints], [Note: checkpoint files]). A crash at any moment leaves the
    checkpoints before whole. `task`: the training task's state (data position, running averages), as in one
    process. Drain the worker first."""
    return write_checkpoint(out_dir, step, worker_entries(worker, task, step), keep, worker.rank, worker.world)


def find_checkpoint(resume_dir: Path, world: int | None = None, say=None) -> Path:
    """The newest checkpoint folder in `resume_dir` that reads whole, for --resume on any number of workers
    ([Note: resuming on other workers]); `say(text)` hears which one and which newer ones were skipped as damaged.
    A file that asks to run code is refused (UnsafeFileError), not skipped. `world` is not needed: kept for callers."""
    return _find(Path(resume_dir), say).path


def load_checkpoint(worker: RankWorker, folder: Path, task=None) -> dict:
    """Load this rank's part of a checkpoint folder (written by any number of workers, or one process) into its
    stages and runtime, and `task`'s state into `task` where given ([Note: resuming on other workers]). Returns
    {"step": its step}."""
    return {"step": restore_worker(worker, task, Checkpoint(folder), worker.device)}
