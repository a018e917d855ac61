"""Unrolling a recurrent core: a uniform view of RNN cells, sequence modules and user cells, batch first."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import SpecError

CELLS = (nn.RNNCell, nn.GRUCell, nn.LSTMCell)
SEQUENCE_MODULES = (nn.RNN, nn.GRU, nn.LSTM)


# --------------------------------------------------------------------------- the core
class Core:
    """A uniform view of a recurrent core.

    The state is a tuple of (B, ...) tensors, batch first whatever the module's own layout; `run` takes a
    (B, T, F) segment and a state and returns the (B, T, H) outputs and the new state.
    """

    def __init__(self, module: nn.Module, path: str, where: str):
        self.module, self.path, self.where = module, path, where
        if isinstance(module, nn.LSTMCell):
            self.kind = "lstm_cell"
        elif isinstance(module, CELLS):
            self.kind = "cell"
        elif isinstance(module, SEQUENCE_MODULES):
            if module.bidirectional:
                raise SpecError(
                    f"{where}: core `{path}` is bidirectional; a bidirectional RNN reads the future, so it cannot be "
                    "unrolled forward in time with truncated BPTT. Use bidirectional=False."
                )
            self.kind = "sequence"
        else:
            if not (hasattr(module, "initial_state") or hasattr(module, "hidden_size")):
                raise SpecError(
                    f"{where}: core `{path}` is a {type(module).__name__}, not an nn.RNNCell, nn.GRUCell, nn.LSTMCell, "
                    "nn.RNN, nn.GRU or nn.LSTM; a cell of your own needs `hidden_size` (its state is one "
                    "(B, hidden_size) tensor) or `initial_state(batch_size)` returning the (tuple of) state tensors."
                )
            self.kind = "user"
        self._user_tuple = True

    # ---------------------------------------------------------------- state
    def _param(self) -> torch.Tensor | None:
        return next(iter(self.module.parameters()), None)

    def init_state(self, batch: int, device=None, dtype=None) -> tuple[torch.Tensor, ...]:
        p = self._param()
        device = device if device is not None else (p.device if p is not None else "cpu")
        dtype = dtype if dtype is not None else (p.dtype if p is not None else torch.float32)
        m = self.module
        if self.kind in ("cell", "lstm_cell"):
            h = torch.zeros(batch, m.hidden_size, device=device, dtype=dtype)
            return (h, torch.zeros_like(h)) if self.kind == "lstm_cell" else (h,)
        if self.kind == "sequence":
            proj = getattr(m, "proj_size", 0) or m.hidden_size
            h = torch.zeros(batch, m.num_layers * proj, device=device, dtype=dtype)
            if isinstance(m, nn.LSTM):
                return (h, torch.zeros(batch, m.num_layers * m.hidden_size, device=device, dtype=dtype))
            return (h,)
        if hasattr(m, "initial_state"):
            state = m.initial_state(batch)
            if isinstance(state, torch.Tensor):
                self._user_tuple = False
                return (state.to(device),)
            self._user_tuple = True
            return tuple(s.to(device) for s in state)
        self._user_tuple = False
        return (torch.zeros(batch, m.hidden_size, device=device, dtype=dtype),)

    # ---------------------------------------------------------------- running
    def run(self, u: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Unroll over a (B, T, F) segment from `state`: ((B, T, H) outputs, final state)."""
        m = self.module
        if self.kind == "sequence":
            b = u.shape[0]
            layers = m.num_layers
            hx = tuple(s.reshape(b, layers, -1).transpose(0, 1).contiguous() for s in state)
            seq = u if m.batch_first else u.transpose(0, 1)
            out, new = m(seq, hx if isinstance(m, nn.LSTM) else hx[0])
            out = out if m.batch_first else out.transpose(0, 1)
            new = new if isinstance(new, tuple) else (new,)
            return out, tuple(s.transpose(0, 1).reshape(b, -1) for s in new)
        outs = []
        for t in range(u.shape[1]):
            state = self.step(u[:, t], state)
            outs.append(state[0])
        return torch.stack(outs, 1), state

    def step(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """One time step of a cell (or of a sequence module on a length-1 segment)."""
        m = self.module
        if self.kind == "lstm_cell":
            return tuple(m(x, state))
        if self.kind == "cell":
            return (m(x, state[0]),)
        if self.kind == "sequence":
            return self.run(x[:, None], state)[1]
        new = m(x, state if self._user_tuple else state[0])
        return tuple(new) if isinstance(new, (tuple, list)) else (new,)

    def step_output(self, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The output of a step from the state it produced (the last layer's h for nn.RNN/GRU/LSTM)."""
        if self.kind == "sequence":
            h = state[0]
            return h.reshape(h.shape[0], self.module.num_layers, -1)[:, -1]
        return state[0]

    def state_sizes(self, batch: int = 2) -> list[int]:
        """Per-sample number of elements of each state tensor."""
        with torch.no_grad():
            return [int(math.prod(s.shape[1:])) for s in self.init_state(batch)]


def flat_state(state: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """All state tensors of a batch, flattened and concatenated per sample: (B, D)."""
    b = state[0].shape[0]
    return torch.cat([s.reshape(b, -1) for s in state], dim=1)
