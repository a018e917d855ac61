"""Tied parameters across ranks in the distributed runtime: replicated, gradients summed, copies kept equal.

In one process a tied tensor (Partition.tied) is simply shared: every stage's gradient lands in the same
`.grad` and the owner stage's optimizer updates it once. Across ranks each rank has its own copy. Here every
rank that holds one takes it out of its stage optimizers and gives it an optimizer of its own, built like the
owner stage's; at the end of each step the ranks sum their gradients for it (all_reduce over just those
ranks) and each steps its copy on the owner's clock. Same start, same summed gradient, same optimizer: the
copies stay equal, and equal to what the local runtime computes.

The all_reduce is a meeting point: ranks that share a tied tensor go through their steps together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import SpecError
from ..optim import build_optimizer


@dataclass
class _Replica:
    tensor: torch.nn.Parameter
    owner: int  # the stage whose clock decides when it steps
    group: object  # the process group of the ranks that hold it
    optimizer: object = None
    scheduler: object = None


class TiedReplicas:
    """The tied parameters this rank holds a copy of, shared with other ranks."""

    def __init__(self, program, rank: int, placement: list[tuple[int, int]], runtime):
        rank_of = {s: r for r, (a, b) in enumerate(placement) for s in range(a, b + 1)}
        self.replicas: list[_Replica] = []
        for tied in program.partition.tied:  # every rank checks the same program, so all refuse together
            if (
                tied.parameter
                and len({rank_of[s] for s in tied.stages}) > 1
                and program.stages[tied.owner].accumulate > 1
            ):
                raise SpecError(
                    f"{program.spec.where('stages')}: stage{tied.owner} accumulates gradients (`accumulate: "
                    f"{program.stages[tied.owner].accumulate}`) and owns `{tied.names[0]}`, which stages on other "
                    "workers share; their copies update every step. Place the stages that share it on one worker "
                    "(distributed.placement), or remove `accumulate`."
                )
            ranks = sorted({rank_of[s] for s in tied.stages})
            if not tied.parameter or len(ranks) < 2:
                continue
            group = dist.new_group(ranks)  # every rank takes part in creating every group, in the same order
            if rank not in ranks:
                continue
            tensor = program.model.get_parameter(tied.names[0])
            for s in tied.stages:  # no stage optimizer on this rank updates it: its own optimizer does
                program.stages[s].borrowed |= {id(tensor)}
            for stage in runtime.stages:
                stage.release(tensor)
            config = program.stages[tied.owner].optimizer_config
            optimizer, scheduler = build_optimizer([tensor], config, program.spec.where("stages"))
            self.replicas.append(_Replica(tensor, tied.owner, group, optimizer, scheduler))

    def zero_grad(self) -> None:
        for r in self.replicas:
            r.optimizer.zero_grad(set_to_none=True)

    def step(self, ticks: list[bool]) -> None:
        """Sum this step's gradients over the ranks that hold each tensor, then step on the owner's clock."""
        for r in self.replicas:
            if r.tensor.grad is None:
                r.tensor.grad = torch.zeros_like(r.tensor)
            dist.all_reduce(r.tensor.grad, group=r.group)
            if ticks[r.owner]:
                r.optimizer.step()
                if r.scheduler is not None:
                    r.scheduler.step()

    def state_dict(self) -> list[dict]:
        return [
            {"optimizer": r.optimizer.state_dict(), "scheduler": r.scheduler.state_dict() if r.scheduler else None}
            for r in self.replicas
        ]

    def load_state_dict(self, state: list[dict]) -> None:
        for r, s in zip(self.replicas, state):
            r.optimizer.load_state_dict(s["optimizer"])
            if r.scheduler is not None and s["scheduler"] is not None:
                r.scheduler.load_state_dict(s["scheduler"])
