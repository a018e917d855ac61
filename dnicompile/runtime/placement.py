"""Placement: which contiguous run of stages each rank holds, balanced by parameters or measured time.

Runs in program order also place parallel branches: with stages top tower, bottom tower, head, `[[0], [1, 2]]`
puts the towers on two ranks, which then run at the same time ([Note: a stage DAG across ranks])."""

from __future__ import annotations

import copy
import itertools
import math
import time

import torch
from torch.utils._pytree import tree_leaves

from ..compile.auto import balance_chain
from ..errors import SpecError
from ..synthesizers import one_hot_context


# --------------------------------------------------------------------------- placement
def plan_placement(program, world: int, config, costs: list[float] | None = None) -> list[tuple[int, int]]:
    """(first, last) stage of each rank: from the spec's list, or balanced by parameters or time.

    For `placement: time` pass the measured `costs` (see `measure_stage_costs`; every rank must use the
    same, so one rank measures and broadcasts them); without them the placement is only checked and
    split by parameter count."""
    n = len(program.stages)
    where = program.spec.where("distributed", "placement")
    if world > n:
        raise SpecError(f"{where}: {world} workers but the program has only {n} stages; add cuts or use --workers {n}.")
    placement = config.placement
    if isinstance(placement, list):
        if len(placement) != world:
            raise SpecError(f"{where}: placement lists {len(placement)} ranks but {world} workers were asked for.")
        flat = [s for group in placement for s in group]
        if flat != list(range(n)) or any(not g for g in placement):
            raise SpecError(
                f"{where}: placement {placement} must give each rank a non-empty run of consecutive stages, "
                f"covering stages 0..{n - 1} once in order, e.g. {_even_split(n, world)}."
            )
        return [(g[0], g[-1]) for g in placement]
    if placement == "time" and costs is not None:
        return _balanced(costs, world, program)
    return _balanced([max(1, s.num_parameters()) for s in program.stages], world, program)


def _even_split(n: int, world: int) -> list[list[int]]:
    bounds = [round(i * n / world) for i in range(world + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(world)]


def measure_stage_costs(program, repeats: int = 3, device=None) -> list[float]:
    """Seconds per training step of each stage on the example inputs: forward, backward, and the
    synthetic-gradient model of its outgoing cut (forward and its own backward). The median of `repeats`
    timed runs after one warm-up. Parameters, gradients and buffers (batch-norm statistics) are left as
    they were."""
    rt = program.runtime
    saved = {k: v.detach().clone() for k, v in program.model.state_dict().items()}
    synth_saved = [copy.deepcopy(m.state_dict()) for m in rt.modules()]
    received = rt.program_inputs(tuple(v.to(device) if device is not None else v for v in program.example_inputs))
    batch = program.example_batch or 1
    context = None
    if rt.num_classes:
        device = next(iter(received[-1].values())).device
        context = one_hot_context(torch.zeros(batch, dtype=torch.long, device=device), rt.num_classes)
    costs = []
    try:
        for i, stage in enumerate(program.stages):
            cut = program.cut_after(i)
            times, out = [], None
            values = rt.stage_inputs(i, received)  # what the stages before it sent ([Note: stage DAG])
            for r in range(repeats + 1):
                ins = tuple(v.detach().requires_grad_(i > 0) if v.is_floating_point() else v for v in values)
                start = time.perf_counter()
                out = stage(*ins)
                outs = out if isinstance(out, tuple) else tuple(tree_leaves(out))  # the last: the model's output
                tensors = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
                if tensors:
                    torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
                if cut is not None and not cut.exact:
                    _time_synthesizer(rt.interfaces[cut.index], cut, outs, context)
                if device is not None and torch.device(device).type == "cuda":
                    torch.cuda.synchronize(device)
                if r:
                    times.append(time.perf_counter() - start)
            costs.append(sorted(times)[len(times) // 2])
            if cut is not None:
                received[i] = {b.name: o.detach() if isinstance(o, torch.Tensor) else o for b, o in zip(cut.sent, outs)}
    finally:
        program.model.load_state_dict(saved)
        for m, state in zip(rt.modules(), synth_saved):
            m.load_state_dict(state)
        for p in program.parameters():
            p.grad = None
        for m in rt.modules():
            for p in m.parameters():
                p.grad = None
    return costs


def _time_synthesizer(iface, cut, outs: tuple, context) -> None:
    """One forward and backward of the cut's interface models (the work they add to a stage)."""
    h = {b.name: t for b, t in zip(cut.sent, outs)}
    try:
        for pred in iface.predict(h, context).values():
            pred.square().sum().backward()
    except Exception:  # a custom synthesizer that needs other inputs: leave it out of the cost
        pass


def _balanced(costs: list[float], world: int, program=None) -> list[tuple[int, int]]:
    """Split the chain of stage costs into `world` contiguous runs minimising the largest run (the DP that
    automatic cuts use: compile.auto.balance_chain). On a stage graph that is not a chain, among the splits in
    which each rank sends only from its last stage ([Note: a stage DAG across ranks]), when there are few enough
    to try them all."""
    n = len(costs)
    if program is not None and not program.chain and math.comb(n - 1, world - 1) <= 100_000:
        edges = list(program.stage_graph.edges)
        best = None
        for ends in itertools.combinations(range(n - 1), world - 1):  # the last stage of each rank but the last
            if any(u not in ends and any(u <= b < v for b in ends) for u, v in edges):
                continue  # a stage read on a later rank is not its rank's last
            bounds = [-1, *ends, n - 1]
            worst = max(sum(costs[bounds[k] + 1 : bounds[k + 1] + 1]) for k in range(world))
            if best is None or worst < best[0]:
                best = (worst, bounds)
        if best is not None:
            return [(best[1][k] + 1, best[1][k + 1]) for k in range(world)]
    bounds = [-1, *balance_chain(costs, world), n - 1]
    return [(bounds[k] + 1, bounds[k + 1]) for k in range(world)]
