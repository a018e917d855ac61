"""Stage state: what one stage trains with (optimizer, scheduler, clock) and its checkpoint state.

Every runtime keeps one `StageState` per stage it runs. Which tensors a stage updates is decided when it is
built: `parameters` are the stage's own, without the tied tensors another stage owns (`Stage.borrowed`), so a
tensor that several stages read is stepped once, by its owner (in the distributed runtime, by the replica
optimizer of runtime/tied.py, which takes it out of the stage optimizers with `release`).
"""

from __future__ import annotations

import torch

from ..clock import Clock
from ..optim import build_optimizer


# [Note: accumulation] `stages: {...: {accumulate: k}}`: the stage updates on the clock {every: k, offset: k - 1}
# (Spec.stage_config), i.e. after steps k-1, 2k-1, ..., and its gradients are not cleared between: `zero_grad`
# clears them only at the first step of each window (step % k == 0), and `step` divides them by k before the
# optimizer (and its clip_grad_norm pre-hook) sees them, which is plain PyTorch's `(loss / k).backward()` over k
# batches. Whatever reaches the stage is accumulated: true gradients, synthetic ones, a local head's, a delayed
# cut's late ones. The synthesizers and heads still learn every step. A checkpoint taken inside a window keeps
# the gradients summed so far (`grads`), so a resumed run continues the window.
class StageState:
    """One stage's optimizer, lr scheduler, clock and gradient accumulation."""

    def __init__(
        self, index: int, parameters, optimizer_config, clock_config, where: str, accumulate: int = 1, stage=None
    ):
        self.index = index
        self.stage = stage  # the program's Stage, whose fp16 gradient scaler this state steps with
        self.optimizer_config = optimizer_config
        self.optimizer, self.scheduler = build_optimizer(parameters, optimizer_config, where)
        self.clock = Clock(clock_config, index)
        self.accumulate = accumulate
        self._window_start = True  # this step begins an accumulation window: its zero_grad clears

    def tick(self, step: int) -> bool:
        """Whether the stage updates at `step`; call once per step, in order."""
        self._window_start = step % self.accumulate == 0
        return self.clock.tick(step)

    def zero_grad(self) -> None:
        if self.optimizer is not None and self._window_start:
            self.optimizer.zero_grad(set_to_none=True)

    def _scaler(self):
        """The stage's fp16 gradient scaler ([Note: stage precision]), else None."""
        if self.stage is None or getattr(self.stage, "precision", "fp32") != "fp16":
            return None
        device = next((p.device.type for p in self._parameters()), "cpu")
        return self.stage.grad_scaler(device)

    def _parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self) -> bool:
        """Step the optimizer and its scheduler; False when the stage has nothing to update."""
        if self.optimizer is None:
            return False
        if self.accumulate > 1:
            for p in self._parameters():
                if p.grad is not None:
                    p.grad.div_(self.accumulate)
        scaler = self._scaler()
        if scaler is not None and any(p.grad is not None for p in self._parameters()):
            scaler.step(self.optimizer)  # unscales; skips the update where a gradient is not finite
            scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return True

    def release(self, tensor: torch.Tensor) -> None:
        """Take `tensor` out of this stage's optimizer (and its state): something else updates it."""
        if self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            group["params"] = [p for p in group["params"] if p is not tensor]
        self.optimizer.state.pop(tensor, None)

    def state_dict(self) -> dict:
        state = {
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "clock": self.clock.state_dict(),
        }
        scaler = self._scaler()
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if self.accumulate > 1 and self.optimizer is not None:  # the window's gradients so far
            state["grads"] = [None if p.grad is None else p.grad.detach().clone() for p in self._parameters()]
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.clock.load_state_dict(state["clock"])
        scaler = self._scaler()
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if self.accumulate > 1 and self.optimizer is not None and state.get("grads") is not None:
            params = self._parameters()
            if len(state["grads"]) != len(params):
                raise ValueError(
                    f"stage{self.index}: the checkpoint holds {len(state['grads'])} gradients, the stage "
                    f"has {len(params)} parameters"
                )
            for p, g in zip(params, state["grads"]):
                p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype).clone()


# [Note: checkpoint format] A runtime's state_dict carries `format`. Format 2 (this one): {"format": 2, "step",
# "stages": [StageState.state_dict()], "interfaces": {cut name: Interface.state_dict()}}, plus what a runtime
# adds (the recurrent runtime's stream time). Format 1 (before the interfaces) had parallel lists
# ("optimizers", "schedulers", "clocks", "synthesizers", "synth_optimizers"); `upgrade_state` turns it into
# format 2, so older checkpoints still resume.
FORMAT = 2


def upgrade_state(state: dict, interface_names: list[str | None]) -> dict:
    """A runtime state in the current format. `interface_names[i]` names the interface that was stored at
    position (or key) i of a format-1 state's synthesizer lists, None where a cut had none."""
    version = state.get("format", 1)
    if version == FORMAT:
        return state
    if version != 1:
        raise ValueError(
            f"checkpoint format {version} is newer than this dnicompile reads ({FORMAT}); upgrade dnicompile"
        )
    stages = [
        {"optimizer": o, "scheduler": s, "clock": c}
        for o, s, c in zip(state["optimizers"], state["schedulers"], state["clocks"])
    ]
    interfaces = {}
    synth, opts = state.get("synthesizers", []), state.get("synth_optimizers", [])
    if isinstance(synth, dict):  # the recurrent runtime's {"bptt": ..., "aux": ..., "upper": ...}
        if "bptt" in synth:
            interfaces["bptt"] = {"models": _grad_keys(synth["bptt"], "state"), "optimizer": opts.get("bptt")}
            if "aux" in synth:
                interfaces["bptt"].update(aux=synth["aux"], aux_optimizer=opts.get("aux"))
        if "upper" in synth:
            interfaces["upper"] = {"models": _grad_keys(synth["upper"], "message"), "optimizer": opts.get("upper")}
    else:
        for name, models, pair in zip(interface_names, synth, opts):
            if name is not None and models is not None:
                interfaces[name] = {"models": models, "optimizer": pair[0], "input_optimizer": pair[1]}
    rest = {
        k: v
        for k, v in state.items()
        if k not in ("optimizers", "schedulers", "clocks", "synthesizers", "synth_optimizers")
    }
    return {**rest, "format": FORMAT, "stages": stages, "interfaces": interfaces}


def _grad_keys(module_state: dict, tensor: str) -> dict:
    """A lone synthesizer's state_dict as the `grad.<tensor>.` entries of SyntheticModels."""
    return {f"grad.{tensor}.{k}": v for k, v in module_state.items()}
