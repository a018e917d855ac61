"""Recurrent programs: a core unrolled in time, cut into truncated-BPTT segments with synthetic gradients.

A feed-forward program is cut in its graph (`cuts:`); a recurrent program is cut in *time*. The spec names
the recurrent core and the modules around it,

    recurrent: {core: core, input: embed, output: readout}
    bptt: {truncation: T, synthetic_gradient: {model: linear, scale: 0.1}, aux: true}

and the compiled program runs `output(core(input(x)))` over a sequence, step by step, in segments of T
steps. At the end of each segment a synthesizer predicts the gradient of the future loss with respect to
the core's state (h, or h and c for an LSTM) and that prediction is added to the segment's truncated
backward (DESIGN.md, "RNNs"); `dnicompile.runtime.bptt` holds the training step. `recurrent.upper` adds a
second, slower core on its own clock that receives the lower core's state (hierarchical timescales).

The modules named by `input` and `output` run on whole (B, L, ...) sequences and must treat every time step
on its own (nn.Embedding, nn.Linear, nn.Dropout, nn.LayerNorm, ...). The core may be an nn.RNNCell,
nn.GRUCell, nn.LSTMCell (unrolled one step at a time), an nn.RNN, nn.GRU or nn.LSTM (run one segment at a
time, with the state carried between segments), or a cell of your own: `forward(x_t, state) -> state`,
where `state` is a tensor or a tuple of tensors whose first element is the step's output, and the cell has
`hidden_size` (state: one (B, hidden_size) tensor) or `initial_state(batch_size)`.

At compile time the program is checked against the model: `program(x)` must equal `model(x)` on the
spec's example `inputs`, so the roles named in the spec are the ones the model's own forward uses.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .compile.unroll import Core, flat_state  # noqa: F401  (flat_state: re-exported for users)
from .errors import DNIError, ModelError, SpecError, did_you_mean
from .losses import STEP_LOSSES, get_step_loss
from .program import ProgramBase
from .spec import ClockConfig, OptimizerConfig, Spec, load_spec


# --------------------------------------------------------------------------- the program
class UpperStage:
    """The slower core of a hierarchical program: runs on its clock's ticks on the lower core's output."""

    def __init__(self, core: Core, input_module, output_module, config, clock: ClockConfig, horizon: int):
        self.core, self.input, self.output, self.config = core, input_module, output_module, config
        self.clock_config, self.horizon = clock, horizon

    def ticks_at(self, t: int) -> bool:
        c = self.clock_config
        return t >= c.offset and (t - c.offset) % c.every == 0

    def step(self, message: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        """One tick: the lower's output `message` (B, H) -> (the upper's prediction (B, horizon, ...), state)."""
        u = self.input(message) if self.input is not None else message
        state = self.core.step(u, state)
        y = self.output(self.core.step_output(state))
        return y.reshape(y.shape[0], self.horizon, -1), state


class RecurrentProgram(ProgramBase):
    """A model compiled for truncated BPTT with synthetic gradients at the truncation boundaries.

    `program(x)` runs the whole (B, L, ...) sequence from a zero state and returns what the model returns;
    `program.train_step(x, y)` trains on a sequence segment by segment (see dnicompile.runtime.bptt).
    """

    is_recurrent = True

    def __init__(self, model: nn.Module, spec: Spec, core: Core, input_module, output_module, upper, stage_configs):
        super().__init__()
        self.model, self.spec = model, spec
        self.core, self.input, self.output, self.upper = core, input_module, output_module, upper
        self.truncation = spec.bptt.truncation
        self.stage_configs: list[tuple[OptimizerConfig, ClockConfig]] = stage_configs
        self.stage_names = ["lower", "upper"] if upper is not None else ["core"]

    # ---------------------------------------------------------------- running
    def lower_step_outputs(self, x: torch.Tensor, state=None):
        u = self.input(x) if self.input is not None else x
        if state is None:
            state = self.core.init_state(x.shape[0])
        out, state = self.core.run(u, state)
        return out, state

    def run(self, x: torch.Tensor, state=None, upper_state=None, time: int = 0):
        """The whole sequence from `state` (default zeros): (outputs, final state[, upper predictions])."""
        out, state = self.lower_step_outputs(x, state)
        y = self.output(out)
        if self.upper is None:
            return y, state
        preds = []
        if upper_state is None:
            upper_state = self.upper.core.init_state(x.shape[0])
        for t in range(out.shape[1]):
            if self.upper.ticks_at(time + t):
                p, upper_state = self.upper.step(out[:, t], upper_state)
                preds.append(p)
        upper_y = torch.stack(preds, 1) if preds else y.new_zeros(y.shape[0], 0, self.upper.horizon, y.shape[-1])
        return y, state, upper_y

    def __call__(self, x: torch.Tensor):
        result = self.run(x)
        return result[0] if self.upper is None else (result[0], result[2])

    forward = __call__

    def _new_runtime(self):
        from .runtime.bptt import BPTTRuntime

        return BPTTRuntime(self)

    @property
    def num_stages(self) -> int:
        return len(self.stage_names)

    def train_step(self, x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, **kwargs):
        """Train on one (B, L, ...) chunk in segments of T steps (see BPTTRuntime.train_step)."""
        return self.runtime.train_step(x, target, mask, **kwargs)

    # ---------------------------------------------------------------- modules, modes, state
    def stage_modules(self, index: int) -> list[nn.Module]:
        if index == 0:
            return [m for m in (self.input, self.core.module, self.output) if m is not None]
        u = self.upper
        return [m for m in (u.input, u.core.module, u.output) if m is not None]

    def stage_parameters(self, index: int) -> list[nn.Parameter]:
        seen, out = set(), []
        for m in self.stage_modules(index):
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def summary(self) -> str:
        cfg = self.spec.bptt
        sg = cfg.synthetic_gradient
        lines = [
            f"{type(self.model).__name__}: recurrent program, truncated BPTT with T = {cfg.truncation}",
            f"  core   {self.core.path}: {type(self.core.module).__name__}, state {self.core.state_sizes()} per sample",
        ]
        if self.input is not None:
            lines.append(f"  input  {self.spec.recurrent.input}: {type(self.input).__name__}")
        lines.append(f"  output {self.spec.recurrent.output}: {type(self.output).__name__}")
        if sg is None:
            lines.append("  boundary: plain truncated BPTT (no synthesizer)")
        else:
            lines.append(
                f"  boundary: synthetic gradient ({sg.model}, scale {sg.scale})" + (", aux task" if cfg.aux else "")
            )
        if self.upper is not None:
            u, c = self.upper, self.upper.clock_config
            kind = (
                "exact" if u.config.synthetic_gradient is None else f"synthetic ({u.config.synthetic_gradient.model})"
            )
            lines.append(
                f"  upper  {u.config.core}: {type(u.core.module).__name__} every {c.every} steps (offset {c.offset}), "
                f"predicts {u.horizon} steps ahead; interface {kind}"
            )
        n = sum(p.numel() for p in self.parameters())
        lines.append(f"  {n} parameters")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"RecurrentProgram({type(self.model).__name__}, T={self.truncation}, core={self.core.path})"


# --------------------------------------------------------------------------- compiling
def _submodule(model: nn.Module, path: str, where: str, role: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise SpecError(
            f"{where}: the model has no module `{path}` for the recurrent {role}{did_you_mean(path, names)}; "
            f"its modules are: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}."
        ) from None


def _example_inputs(spec: Spec) -> torch.Tensor | None:
    if not spec.inputs:
        return None
    if len(spec.inputs) != 1:
        raise SpecError(
            f"{spec.where('inputs')}: a recurrent program takes one input sequence (B, L, ...), but `inputs` names "
            f"{len(spec.inputs)}: {', '.join(spec.inputs)}."
        )
    name, t = next(iter(spec.inputs.items()))
    if len(t.shape) < 2:
        raise SpecError(
            f"{spec.where('inputs', name, 'shape')}: a recurrent program's input is a sequence, batch then time "
            f"first (B, L, ...), but the shape is {t.shape}."
        )
    dtype = getattr(torch, t.dtype)
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(t.shape, generator=gen).to(dtype)
    return torch.randint(t.low, t.high, t.shape, generator=gen).to(dtype)


def _check_equal(program: RecurrentProgram, model: nn.Module, x: torch.Tensor, spec: Spec) -> None:
    """program(x) must be model(x): the roles in the spec must be the ones the model's forward uses."""
    was = model.training
    model.eval()
    where = spec.where("recurrent")
    try:
        with torch.no_grad():
            try:
                expected = model(x)
            except Exception as e:
                raise ModelError(
                    f"{spec.where('inputs')}: running the model on the example input {tuple(x.shape)} raised "
                    f"{type(e).__name__}: {e}"
                ) from None
            try:
                got = program(x)
            except Exception as e:
                raise SpecError(
                    f"{where}: unrolling `{spec.recurrent.core}` on the example input {tuple(x.shape)} raised "
                    f"{type(e).__name__}: {e}. Check that `input`, `core` and `output` are the model's modules in the "
                    "order its forward applies them."
                ) from None
    finally:
        model.train(was)
    exp = expected if isinstance(expected, tuple) else (expected,)
    out = got if isinstance(got, tuple) else (got,)
    shapes = [tuple(t.shape) for t in exp if isinstance(t, torch.Tensor)]
    if len(exp) != len(out) or any(
        not isinstance(e, torch.Tensor) or e.shape != o.shape or not torch.allclose(e, o, rtol=1e-4, atol=1e-5)
        for e, o in zip(exp, out)
    ):
        got_shapes = [tuple(t.shape) for t in out]
        what = "the lower outputs and the upper predictions" if program.upper is not None else "its outputs"
        raise SpecError(
            f"{where}: the unrolled program does not compute what the model's forward computes on the example "
            f"input (model: {shapes}, program: {got_shapes}). dnicompile runs "
            f"`{spec.recurrent.output}({spec.recurrent.core}({spec.recurrent.input or 'x'}))` step by step from a "
            f"zero state and returns {what}; make `recurrent.input`, `core` and `output` name the modules the "
            "forward applies, per time step, in that order."
        )


def compile_recurrent(model: nn.Module, spec) -> RecurrentProgram:
    """Check the spec's `recurrent` and `bptt` sections against `model` and build the recurrent program."""
    spec = load_spec(spec)
    if spec.recurrent is None:
        raise SpecError(
            f"{spec.where('bptt')}: `bptt` needs a `recurrent:` section naming the core to unroll, e.g. "
            "`recurrent: {core: lstm, output: readout}`."
        )
    if spec.bptt is None:
        raise SpecError(
            f"{spec.where('recurrent')}: a recurrent program needs `bptt: {{truncation: T}}` (add a "
            "`synthetic_gradient` for DNI at the truncation boundaries)."
        )
    rc = spec.recurrent
    if not isinstance(spec.loss, str):
        raise SpecError(
            f"{spec.where('loss')}: a recurrent program scores every time step itself, so `loss` names a per-step loss "
            f"({', '.join(STEP_LOSSES)} or 'package.module:function'), not a loss the model returns."
        )
    get_step_loss(spec.loss, spec.where("loss"))
    sg = spec.bptt.synthetic_gradient
    if sg is not None and sg.condition_on_labels:
        raise SpecError(
            f"{spec.where('bptt', 'synthetic_gradient', 'condition_on_labels')}: a synthetic gradient at a truncation "
            "boundary predicts the future's gradient, whose labels are not known yet; remove condition_on_labels."
        )
    core = Core(
        _submodule(model, rc.core, spec.where("recurrent", "core"), "core"), rc.core, spec.where("recurrent", "core")
    )
    inp = _submodule(model, rc.input, spec.where("recurrent", "input"), "input") if rc.input else None
    out = _submodule(model, rc.output, spec.where("recurrent", "output"), "output")
    num_stages = 2 if rc.upper is not None else 1
    _check_stage_keys(spec, num_stages)
    configs = [spec.stage_config(i, f"stage{i}") for i in range(num_stages)]
    for i in range(num_stages):
        if spec.stage_precision(i, f"stage{i}") != "fp32":
            raise SpecError(
                f"{spec.where('stages')}: `precision` runs a feed-forward stage under autocast; a recurrent program's "
                "cores run in fp32. Remove `precision`."
            )
        if spec.stage_compile(i, f"stage{i}") is not None:
            raise SpecError(
                f"{spec.where('stages')}: `compile` applies to a feed-forward program's stages; a recurrent "
                "program's cores run eagerly step by step. Remove `compile`."
            )
        if spec.stage_accumulate(i, f"stage{i}") != 1:
            raise SpecError(
                f"{spec.where('stages')}: `accumulate` averages a feed-forward stage's gradients over steps; a "
                "recurrent program's cores update per truncation segment on their clocks. Use `clock: {every: k}` "
                "for fewer updates, or remove `accumulate`."
            )
    upper = None
    if rc.upper is not None:
        uc = rc.upper
        where_u = spec.where("recurrent", "upper")
        if uc.synthetic_gradient is not None and uc.synthetic_gradient.condition_on_labels:
            raise SpecError(
                f"{spec.where('recurrent', 'upper', 'synthetic_gradient', 'condition_on_labels')}: the lower core "
                "sends its state before the upper's targets are known; remove condition_on_labels."
            )
        clock = configs[1][1]
        if clock.probability is not None:
            raise SpecError(
                f"{spec.where('stages')}: the upper core of a hierarchical program ticks on a fixed schedule; give "
                "stage 1 a clock `{every: k}` (with an optional offset), not a probability."
            )
        ucore = Core(
            _submodule(model, uc.core, spec.where("recurrent", "upper", "core"), "upper core"), uc.core, where_u
        )
        uin = (
            _submodule(model, uc.input, spec.where("recurrent", "upper", "input"), "upper input") if uc.input else None
        )
        uout = _submodule(model, uc.output, spec.where("recurrent", "upper", "output"), "upper output")
        shared = {id(p) for m in (inp, core.module, out) if m is not None for p in m.parameters()}
        if any(id(p) in shared for m in (uin, ucore.module, uout) if m is not None for p in m.parameters()):
            raise SpecError(
                f"{where_u}: the upper stage shares parameters with the lower one; the two stages update on their own "
                "clocks, so each parameter must belong to one of them."
            )
        upper = UpperStage(ucore, uin, uout, uc, clock, uc.horizon or clock.every)
    program = RecurrentProgram(model, spec, core, inp, out, upper, configs)
    x = _example_inputs(spec)
    if x is not None:
        param = next(iter(model.parameters()), None)
        if x.is_floating_point() and param is not None:
            x = x.to(param.dtype)
        _check_equal(program, model, x, spec)
    return program


def _check_stage_keys(spec: Spec, num_stages: int) -> None:
    """`stages:` keys of a recurrent program: `default`, 0 (the core, or the lower core) and 1 (the upper)."""
    names = ["default"] + [f"stage{i}" for i in range(num_stages)]
    for key in spec.stages:
        text = str(key)
        index = (
            int(text)
            if text.lstrip("-").isdigit()
            else (int(text[5:]) if text.startswith("stage") and text[5:].isdigit() else None)
        )
        if text == "default" or (index is not None and 0 <= index < num_stages):
            continue
        what = "stage 0 (the core)" if num_stages == 1 else "stage 0 (the lower core) and stage 1 (the upper core)"
        raise SpecError(
            f"{spec.where('stages', key)}: `stages` has an entry `{text}`, but this recurrent program has {what}"
            f"{did_you_mean(text, names)}. Use `default`, "
            + ("0 or stage0." if num_stages == 1 else "0/stage0 or 1/stage1.")
        )


def require_recurrent(program) -> None:
    if not getattr(program, "is_recurrent", False):
        raise DNIError("this needs a recurrent program (a spec with `recurrent:` and `bptt:`).")
