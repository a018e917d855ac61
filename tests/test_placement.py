"""Placement of stages on ranks (runtime/placement.py): the balanced split against brute force, and the timing of
stages on a model whose output is a dict (the last stage returns the model's own output type)."""

from __future__ import annotations

import itertools
import random

import torch
import torch.nn as nn

from dnicompile import compile_decoupled
from dnicompile.runtime.placement import _balanced, measure_stage_costs


def _largest(costs, ranges):
    return max(sum(costs[a : b + 1]) for a, b in ranges)


def test_balanced_split_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 7)
        world = rng.randint(1, n)
        costs = [rng.choice([1.0, 2.0, 3.0, 0.5, 7.0]) for _ in range(n)]
        ranges = _balanced(costs, world)
        assert len(ranges) == world and ranges[0][0] == 0 and ranges[-1][1] == n - 1
        assert all(a <= b for a, b in ranges) and all(ranges[k][1] + 1 == ranges[k + 1][0] for k in range(world - 1))
        best = min(
            _largest(costs, [(a, b - 1) for a, b in zip((0, *cuts), (*cuts, n))])
            for cuts in itertools.combinations(range(1, n), world - 1)
        )
        assert _largest(costs, ranges) == best


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return {"logits": self.b(self.a(x).relu()), "hidden": x}


def test_stage_times_of_a_model_that_returns_a_dict():
    torch.manual_seed(0)
    model = DictOut()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    program = compile_decoupled(model, {"inputs": {"x": {"shape": [4, 8]}}, "cuts": [{"after": "a"}]})
    costs = measure_stage_costs(program, repeats=1)
    assert len(costs) == 2 and all(c > 0 for c in costs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # timing leaves the model as it was
