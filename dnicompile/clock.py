"""Per-stage clocks: when a stage updates (every k-th step, or with probability p, from an offset on)."""

from __future__ import annotations

import random

from .spec import ClockConfig


class Clock:
    """Decides, step by step, whether a stage's optimizer steps. Reproducible for a given seed."""

    def __init__(self, config: ClockConfig, stage_index: int = 0):
        self.config = config
        seed = config.seed if config.seed is not None else 1_000_003 * (stage_index + 1)
        self._rng = random.Random(seed)
        self.ticks = 0

    def tick(self, step: int) -> bool:
        """True when the stage updates at `step` (0-based). Call once per step, in order."""
        c = self.config
        if c.probability is not None:
            draw = self._rng.random()  # drawn every step so that the sequence does not depend on the offset
            fired = step >= c.offset and draw < c.probability
        else:
            fired = step >= c.offset and (step - c.offset) % c.every == 0
        self.ticks += fired
        return fired

    def state_dict(self) -> dict:
        return {"rng": self._rng.getstate(), "ticks": self.ticks}

    def load_state_dict(self, state: dict) -> None:
        self._rng.setstate(state["rng"])
        self.ticks = state["ticks"]
