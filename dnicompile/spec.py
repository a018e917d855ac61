"""The cut spec: pydantic models of the YAML file, and loading with file:line:column errors."""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import SpecError, close_matches, did_you_mean

# Bounds on what a spec may ask for: a spec is data, and reading it must take bounded time and memory.
MAX_SPEC_BYTES = 1 << 20  # a spec file is a few hundred bytes; refuse more than 1 MiB unread
MAX_DEPTH = 32  # nesting of mappings and lists (a spec needs about 6)
MAX_ALIAS_NODES = 10_000  # values that YAML aliases (`*name`) may add in all, counting what they expand to
MAX_SEED = 2**32 - 1  # what torch, numpy and random all accept
MAX_EXAMPLE_ELEMENTS = 1 << 28  # per example input (1 GiB of float32): a small batch is enough to trace
# torch.nn.functional losses a spec may name without --allow-imports ('torch.nn.functional:smooth_l1_loss')
TORCH_LOSS_MODULE = "torch.nn.functional"
ALLOW_IMPORTS_ENV = "DNICOMPILE_ALLOW_IMPORTS"  # how --allow-imports reaches worker processes

# how the labels' one-hot joins a boundary tensor under cDNI ([Note: label context] in synthesizers.py)
LABEL_CONTEXTS = ("auto", "token", "sample", "batch", "none")
DType = Literal["float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"]


class _Strict(BaseModel):
    """Unknown keys are errors, so a typo never silently becomes a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TensorSpec(_Strict):
    """An example input: its shape (batch first) and dtype; integer inputs draw from [low, high)."""

    shape: list[int] = Field(description="Shape of the example tensor, batch dimension first.")
    dtype: DType = Field("float32", description="Element type.")
    low: int = Field(0, ge=-(2**63), lt=2**63, description="Smallest value drawn for integer dtypes.")
    high: int = Field(
        2,
        ge=-(2**63),
        lt=2**63,
        description="One past the largest value drawn for integer dtypes (e.g. the vocabulary size).",
    )

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(d <= 0 for d in v):
            raise ValueError(f"every dimension must be a positive integer, got {v}")
        if math.prod(v) > MAX_EXAMPLE_ELEMENTS:
            raise ValueError(
                f"{v} is {math.prod(v):,} elements, more than the {MAX_EXAMPLE_ELEMENTS:,} an example input may have; "
                "tracing needs only a small batch (e.g. 2)"
            )
        return v

    @model_validator(mode="after")
    def _range(self) -> TensorSpec:
        if self.low >= self.high:
            raise ValueError(
                f"`low` ({self.low}) must be below `high` ({self.high}): values are drawn from [low, high)"
            )
        return self


class TraceConfig(_Strict):
    """How the model is turned into a graph."""

    frontend: Literal["fx", "export", "auto"] = Field(
        "auto",
        description="Tracing front end: fx (torch.fx symbolic trace), export (torch.export), or auto: fx, and "
        "torch.export where fx fails.",
    )
    leaf_modules: list[str] = Field(
        default_factory=list,
        description="Module paths or class names to keep as single nodes instead of tracing through them.",
    )
    concrete_args: dict[str, Any] = Field(
        default_factory=dict, description="Arguments of forward() fixed to a constant while tracing (e.g. flags)."
    )


class SchedulerConfig(BaseModel):
    """A torch.optim.lr_scheduler class by name; other keys are its arguments."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(description="Class name in torch.optim.lr_scheduler, e.g. StepLR or CosineAnnealingLR.")


class OptimizerConfig(BaseModel):
    """A torch.optim class by name; other keys (momentum, weight_decay, ...) are its arguments."""

    model_config = ConfigDict(extra="allow")
    name: str = Field("Adam", description="Class name in torch.optim, e.g. Adam, SGD, AdamW.")
    lr: float = Field(1e-3, gt=0, description="Learning rate.")
    scheduler: SchedulerConfig | None = Field(None, description="Optional learning-rate scheduler, stepped on ticks.")
    clip_grad_norm: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Before each step, scale the gradients of this optimizer's parameters (a stage's, a "
        "synthesizer's, a head's) down to this total 2-norm (torch.nn.utils.clip_grad_norm_); null: no clipping.",
    )

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments for the optimizer class (everything but name and scheduler)."""
        return {"lr": self.lr, **(self.model_extra or {})}


class ClockConfig(_Strict):
    """When a stage updates: every k-th step, or with probability p per step, from `offset` on."""

    every: int = Field(1, ge=1, description="Update on every k-th step.")
    probability: float | None = Field(None, gt=0, le=1, description="Update with this probability per step.")
    offset: int = Field(0, ge=0, description="First step on which the clock may tick.")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Seed of a probability clock (default: derived from the stage index)."
    )

    @model_validator(mode="after")
    def _one_rule(self) -> ClockConfig:
        if self.probability is not None and self.every != 1:
            raise ValueError("give either `every` or `probability`, not both")
        return self


class SyntheticGradientConfig(_Strict):
    """A model M(h, c) that predicts dL/dh at a cut."""

    model: str = Field("linear", description="linear, mlp, conv, or a class of your own as 'package.module:ClassName'.")
    hidden: int | None = Field(
        None, ge=1, description="Hidden width (mlp, default 1024) or channels (conv, default: the tensor's)."
    )
    layers: int = Field(2, ge=0, description="Number of hidden layers (mlp, conv).")
    kernel_size: int = Field(5, ge=1, description="Convolution kernel size (conv), 'same' padding.")
    condition_on_labels: bool = Field(False, description="Feed the one-hot labels too (cDNI).")
    label_context: dict[str, str] = Field(
        default_factory=dict,
        description="With condition_on_labels: how the labels join a boundary tensor, by the tensor's name (as "
        "the stage table and `cut.boundary` show it): token (per token; the tensor's tokens are the labels'), "
        "sample (the mean of the sample's one-hots), batch (the mean over the batch: a tensor without a batch "
        "dimension), none (no labels); a tensor not named here gets `auto` ([Note: label context] in "
        "dnicompile/synthesizers.py).",
    )
    scale: float = Field(
        1.0,
        description="Multiplies the synthetic gradient before it is used. Across feed-forward cuts the scaled "
        "gradient is what the stage sends back, so the cut before learns it; at truncation boundaries the "
        "target takes the prediction at `bptt.discount` instead.",
    )
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(name="Adam", lr=1e-4), description="The synthesizer's own optimizer."
    )

    @field_validator("label_context")
    @classmethod
    def _known_label_context(cls, v: dict[str, str]) -> dict[str, str]:
        for tensor, how in v.items():
            if how not in LABEL_CONTEXTS:
                raise ValueError(
                    f"tensor {tensor!r}: unknown label context {how!r}{did_you_mean(how, LABEL_CONTEXTS)}; use "
                    f"{', '.join(LABEL_CONTEXTS)}"
                )
        return v

    @model_validator(mode="after")
    def _label_context_needs_labels(self) -> SyntheticGradientConfig:
        if self.label_context and not self.condition_on_labels:
            raise ValueError(
                "`label_context` says how the labels join the tensors, and `condition_on_labels` is false: set "
                "`condition_on_labels: true` or drop `label_context`"
            )
        return self


class SyntheticInputConfig(_Strict):
    """A model I(x) that predicts the boundary tensors of a cut from the program's input."""

    model: str = Field("mlp", description="linear, mlp, or 'package.module:ClassName'.")
    hidden: int = Field(1024, ge=1, description="Hidden width (mlp).")
    layers: int = Field(1, ge=0, description="Number of hidden layers (mlp).")
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(name="Adam", lr=1e-4), description="The synthesizer's own optimizer."
    )


class LocalLossConfig(_Strict):
    """An auxiliary head on the cut's boundary tensors, trained on the labels with the spec's loss; the stage
    before the cut learns from it alone, and nothing is sent back across the cut (DGL, InfoPro)."""

    head: str = Field(
        "linear",
        description="linear, mlp, conv (for (B, C, H, W) tensors: convolutions, then average pooling, then linear), "
        "or a class of your own as 'package.module:ClassName'.",
    )
    hidden: int = Field(256, ge=1, description="Hidden width (mlp) or channels (conv).")
    layers: int = Field(1, ge=0, description="Number of hidden layers (mlp, conv).")
    kernel_size: int = Field(3, ge=1, description="Convolution kernel size (conv), 'same' padding.")
    weight: float = Field(1.0, gt=0, description="Multiplies the head's loss in the gradient the stage steps with.")
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(name="Adam", lr=1e-3), description="The head's own optimizer."
    )


class DelayedGradientConfig(_Strict):
    """The true gradient, `delay` steps late: the stage before the cut never waits for it, and steps with the
    gradient of the batch it ran `delay` steps ago (DDG, Features Replay, FDG, PipeDream)."""

    delay: int | Literal["auto"] = Field(
        1,
        description="Steps between a batch's forward and the update with its gradient (0: an exact cut, one step "
        "later); `auto` (several workers only): as late as it arrives, without waiting.",
    )
    weights: Literal["stash", "current", "recompute"] = Field(
        "stash",
        description="The weights of the late backward: stash (those of the batch's forward, PipeDream), current "
        "(today's, on the kept activations, DDG), recompute (keep only the inputs and run the forward again with "
        "today's weights, Features Replay; least memory).",
    )
    shrink: float = Field(1.0, gt=0, description="Multiplies the stale gradient (FDG's gradient shrinking).")
    predict: Literal["none", "linear"] = Field(
        "none",
        description="`linear` (with `weights: stash`): the forward runs on the weights extrapolated `delay` steps "
        "ahead along their last change, w + delay * (w - w_before), the weights the late gradient will update "
        "(linear weight prediction, Kosson et al. 2021).",
    )
    warmup: int = Field(
        0,
        ge=0,
        le=10**9,
        description="Steps at the start that wait for the true gradient (an exact cut, delay 0) before the delay "
        "begins: the first steps, where the gradient turns fastest, are not taken late.",
    )
    measure_every: int | None = Field(
        10,
        ge=1,
        le=10**9,
        description="Every N-th step, measure the cosine between the stale gradient and the fresh one (one more "
        "forward and backward of the stages before the cut); null: never.",
    )

    @field_validator("delay", mode="before")
    @classmethod
    def _delay(cls, v: Any) -> Any:
        if isinstance(v, bool) or not (v == "auto" or (isinstance(v, int) and v >= 0)):
            raise ValueError(f"`delay` is a whole number of steps >= 0 or `auto`, got {v!r}")
        return v

    @model_validator(mode="after")
    def _predict_stash(self) -> DelayedGradientConfig:
        if self.predict != "none" and self.weights != "stash":
            raise ValueError(
                f"`predict: {self.predict}` needs `weights: stash` (the forward runs on predicted weights, which the "
                f"late backward must use); got `weights: {self.weights}`: set `weights: stash` or drop `predict`"
            )
        return self


class CutKind(_Strict):
    """What happens at a cut: the one of `synthetic_gradient`, `delayed_gradient` or `local_loss` it has; with
    none it is exact (the true gradient crosses it)."""

    synthetic_gradient: SyntheticGradientConfig | None = Field(
        None, description="The synthetic-gradient model; null (or absent) makes an exact cut."
    )
    synthetic_input: SyntheticInputConfig | None = Field(
        None, description="Optional synthetic-input model: lets the next stage start before this one is done."
    )
    delayed_gradient: DelayedGradientConfig | None = Field(
        None, description="The stage before the cut steps with the true gradient of an earlier batch; never waits."
    )
    local_loss: LocalLossConfig | None = Field(
        None, description="An auxiliary head trains the stage before the cut on the labels; nothing is sent back."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> CutKind:
        given = [k for k in ("synthetic_gradient", "delayed_gradient", "local_loss") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(
                f"a cut has one kind: give it one of `synthetic_gradient`, `delayed_gradient` or `local_loss`, not "
                f"{' and '.join(f'`{k}`' for k in given)} (none: an exact cut)"
            )
        if self.synthetic_input is not None and self.synthetic_gradient is None and given:
            raise ValueError(f"`synthetic_input` goes with a `synthetic_gradient` cut, not with `{given[0]}`")
        return self


class CutSpec(CutKind):
    """A cut after a module path (`layers.1`) or fx node name (`add_3`). Its kind is the one of
    `synthetic_gradient`, `delayed_gradient` or `local_loss` it has; with none it is exact (the true gradient
    crosses it)."""

    after: str = Field(description="Module path or fx node name; the cut comes after the last node computed in it.")
    name: str | None = Field(None, description="Name shown in tables (default: the `after` value).")

    @field_validator("after", "name", mode="before")
    @classmethod
    def _int_path(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # `after: 0` in an nn.Sequential

    @property
    def label(self) -> str:
        return self.name or self.after


class AutoCutsConfig(_Strict):
    """Cuts dnicompile places itself: at points of the graph every path from the inputs to the outputs passes
    through, chosen so that the largest stage costs least (compile/auto.py). `--nodes` prints the cuts chosen,
    as a `cuts:` list to paste in their place."""

    stages: int = Field(ge=2, le=4096, description="Number of stages (the cuts are one fewer).")
    balance: Literal["time", "flops", "params"] = Field(
        "flops",
        description="The cost to balance: flops (from the traced shapes), params (parameters per stage) or time "
        "(forward and backward measured on the example inputs; can differ from run to run).",
    )
    kind: CutKind = Field(
        default_factory=CutKind,
        description="The kind of every cut chosen, as in a `cuts:` entry without `after` (e.g. "
        "{synthetic_gradient: {model: linear}}); empty or absent: exact cuts.",
    )

    @field_validator("kind", mode="before")
    @classmethod
    def _empty_kind(cls, v: Any) -> Any:
        return {} if v is None else v


class AutoCuts(_Strict):
    """`cuts: {auto: {stages: S, balance: ..., kind: ...}}`: the cut points are chosen by dnicompile."""

    auto: AutoCutsConfig = Field(description="Number of stages, the cost to balance, and the kind of the cuts.")


CutsSpec = Annotated[
    Union[Annotated[list[CutSpec], Tag("list")], Annotated[AutoCuts, Tag("dict")]],  # noqa: UP007
    Discriminator(lambda v: "dict" if isinstance(v, (dict, AutoCuts)) else "list"),
]


class CompileConfig(_Strict):
    """`compile: {...}`: torch.compile's options for a stage ([Note: compiled stages])."""

    backend: str = Field("inductor", description="torch.compile backend: inductor, aot_eager, eager, ...")
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    dynamic: bool | None = Field(None, description="Dynamic shapes: None lets torch decide after a recompile.")
    fullgraph: bool = Field(False, description="Refuse graph breaks.")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if v not in known:
            raise ValueError(f"unknown torch.compile backend {v!r}{did_you_mean(v, known)}; known: {', '.join(known)}")
        return v


class StageConfig(_Strict):
    """Per-stage optimizer, clock and precision; unset fields fall back to `default`."""

    optimizer: OptimizerConfig | None = None
    clock: ClockConfig | None = None
    precision: Literal["fp32", "bf16", "fp16"] | None = Field(
        None,
        description="fp32 (the default), bf16 or fp16: the stage's forward (and so its backward) runs under "
        "torch.autocast in that type (parameters and optimizer stay fp32; what leaves the stage is fp32); fp16 with "
        "a gradient scaler of the stage's own.",
    )
    compile: bool | CompileConfig | None = Field(
        None,
        description="Run the stage's forward (and so its backward) through torch.compile: true, or {backend, mode, "
        "dynamic, fullgraph} as torch.compile takes them.",
    )
    accumulate: int | None = Field(
        None,
        ge=1,
        description="Gradient accumulation: the stage steps once every `accumulate` training steps, with the mean "
        "of those steps' gradients (as `loss / k` summed over k batches in plain PyTorch); it replaces `clock`.",
    )


class DataConfig(_Strict):
    """The training data set: a built-in one by `name`, or your own function as `loader`."""

    name: Literal["fashion-mnist", "copy", "repeat_copy", "text"] = Field(
        "fashion-mnist",
        description="Data set name: fashion-mnist, or for recurrent programs copy, repeat_copy (generated) or text.",
    )
    loader: str | None = Field(
        None,
        description="Your own data: 'file.py:function' (a path relative to the spec's folder) or "
        "'package.module:function', returning (train, eval) iterables of batches (eval may be None). It runs code, "
        "so it needs --allow-imports. Called with `loader_args`, and batch_size= where it takes that argument.",
    )
    loader_args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the `loader` function.")
    path: str | None = Field(
        None, description="Directory of the data files, or the text file for `text` (overridden by --data)."
    )
    # copy / repeat_copy (Graves et al. 2014) with the curriculum of Jaderberg et al. 2017
    bits: int = Field(8, ge=1, description="copy, repeat_copy: bits per vector of the sequence to copy.")
    start_length: int = Field(1, ge=1, description="copy, repeat_copy: sequence length the curriculum starts at.")
    max_length: int = Field(256, ge=1, description="copy, repeat_copy: the curriculum stops growing here.")
    threshold: float = Field(
        0.15, gt=0, description="copy, repeat_copy: grow the length when the error (bits per output step) is below it."
    )
    window: int = Field(10, ge=1, description="copy, repeat_copy: batches the error is averaged over.")
    max_repeats: int = Field(3, ge=1, description="repeat_copy: repeats are drawn from 1..max_repeats.")
    # text (character-level language model)
    seq_len: int = Field(64, ge=1, description="text: characters per stream in one training step.")
    split: float = Field(0.9, gt=0, lt=1, description="text: fraction of the file to train on; the rest is held out.")
    eval_chars: int | None = Field(
        None, ge=1, description="text: held-out characters scored at each evaluation (default: all of them)."
    )

    @model_validator(mode="after")
    def _loader_or_name(self) -> DataConfig:
        if self.loader is None:
            if self.loader_args:
                raise ValueError("`loader_args` go with a `loader: file.py:function`; add one or remove them")
            return self
        if "name" in self.model_fields_set:
            raise ValueError(f"give either `name: {self.name}` (a built-in data set) or `loader` (your own), not both")
        module, sep, function = self.loader.rpartition(":")
        if not sep or not module.strip() or not function.isidentifier():
            raise ValueError(
                f"`loader: {self.loader}` is not of the form 'file.py:function' or 'package.module:function'"
            )
        return self


class TrainConfig(_Strict):
    """Defaults for `--train`; command-line flags override them."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_every: int = Field(200, ge=1, description="Evaluate on the test set every N steps.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Random seed (weights, batches, clocks).")
    checkpoint_every: int | None = Field(
        1000,
        ge=1,
        le=10**9,
        description="With --out, write a checkpoint (ckpt-<step>/) every N steps, at the end, and on Ctrl-C or "
        "SIGTERM, for --resume; null: none. On several workers `distributed.checkpoint_every` wins where set.",
    )
    keep_checkpoints: int = Field(
        2,
        ge=1,
        le=10**6,
        description="Checkpoints kept in --out, the newest (one process, or distributed.checkpoint_every on several "
        "workers); older ones are removed.",
    )


class LinkConfig(_Strict):
    """An emulated network link between ranks, for experiments on one machine: every message of the runtime's
    transport is delivered as a link with this latency and bandwidth would deliver it ([Note: link emulation])."""

    latency_ms: float = Field(0.0, ge=0, le=10**6, description="One-way latency of every message, in milliseconds.")
    bandwidth_mb_s: float | None = Field(
        None,
        gt=0,
        le=10**9,
        description="Bandwidth of each direction of a link, in MB/s (10**6 bytes); null: unlimited.",
    )


class DistributedConfig(_Strict):
    """How stages are spread over workers (`--workers N`, or torchrun)."""

    placement: Literal["params", "time"] | list[list[int]] = Field(
        "params",
        description="Stages per rank, e.g. [[0, 1], [2, 3]], or balanced automatically by parameter count "
        "(`params`) or by measured forward+backward time (`time`).",
    )
    queue_depth: int = Field(
        4,
        ge=0,
        description="Batches a stage may run ahead of the true gradients its synthesizer learns from (0: none, "
        "every rank waits for the true gradient of its batch before the next: the local runtime's updates).",
    )
    timeout_s: float = Field(30.0, gt=0, le=10**7, description="Seconds any rank waits for another before giving up.")
    checkpoint_every: int | None = Field(None, ge=1, description="Write a checkpoint every N steps (needs --out).")
    log_every: int = Field(50, ge=1, description="Gather per-cut statistics from all ranks every N steps.")
    microbatches: int = Field(
        1,
        ge=1,
        le=4096,
        description="Split each batch into M microbatches across the exact cuts between ranks and run them with "
        "`schedule`; gradients accumulate, so a step updates as the whole batch would. Needs every cut between "
        "ranks exact and a batch size divisible by M.",
    )
    schedule: Literal["1f1b", "gpipe"] = Field(
        "1f1b",
        description="Order of the microbatches' forwards and backwards: 1f1b (one forward, one backward, least "
        "memory) or gpipe (all forwards, then all backwards).",
    )
    link: LinkConfig | None = Field(
        None, description="Emulate a slower link between ranks (latency, bandwidth); off by default."
    )


class UpperConfig(_Strict):
    """A second, slower recurrent stage: it receives the lower core's state on its clock's ticks and predicts
    the next `horizon` targets; the lower gets a synthetic gradient for the state it sends (hierarchical DNI)."""

    core: str = Field(description="Module path of the upper recurrent core (a cell, or nn.RNN/GRU/LSTM).")
    input: str | None = Field(None, description="Module path applied to the lower's state before the upper core.")
    output: str = Field(description="Module path of the upper readout: (B, H) -> (B, horizon * classes).")
    horizon: int | None = Field(
        None, ge=1, description="Targets ahead the upper predicts on each tick (default: its clock's `every`)."
    )
    truncation: int = Field(1, ge=1, description="Ticks per truncated-BPTT segment of the upper core.")
    synthetic_gradient: SyntheticGradientConfig | None = Field(
        None, description="Synthetic gradient for the state the lower sends up; null: the true gradient (locked)."
    )
    loss_weight: float = Field(1.0, ge=0, description="Weight of the upper's loss.")


class RecurrentConfig(_Strict):
    """The recurrent core to unroll in time, and the modules applied to each step before and after it."""

    core: str = Field(
        description="Module path of the core: nn.RNNCell, nn.GRUCell, nn.LSTMCell, nn.RNN, nn.GRU, nn.LSTM, or a "
        "cell of your own (forward(x, state) -> state)."
    )
    input: str | None = Field(
        None, description="Module path applied to the input sequence before the core (e.g. an nn.Embedding)."
    )
    output: str = Field(description="Module path applied to the core's output sequence (e.g. an nn.Linear readout).")
    upper: UpperConfig | None = Field(None, description="A slower second recurrent stage (hierarchical timescales).")


class BPTTConfig(_Strict):
    """Truncated backprop through time; a synthesizer at each truncation boundary predicts the future gradient."""

    truncation: int = Field(ge=1, description="Time steps per segment (T).")
    synthetic_gradient: SyntheticGradientConfig | None = Field(
        None, description="Synthetic gradient of the core's state at segment ends; null: plain truncated BPTT."
    )
    discount: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Weight of the next boundary's prediction in the synthesizer's target, as TD's gamma: 1 learns "
        "the whole future gradient (episodes); below 1 fades the far future, which an endless stream needs "
        "(specs/charlm_dni.yaml: 0.1). Independent of `synthetic_gradient.scale`, which only sets how much the "
        "segment trusts the prediction.",
    )
    aux: bool = Field(False, description="Auxiliary task: the core also predicts the synthetic gradient T steps ahead.")
    aux_weight: float = Field(0.1, ge=0, description="Weight of the auxiliary loss.")

    @model_validator(mode="after")
    def _aux_needs_synthesizer(self) -> BPTTConfig:
        if self.aux and self.synthetic_gradient is None:
            raise ValueError("`aux: true` predicts future synthetic gradients, so it needs a `synthetic_gradient`")
        return self


class LossFromOutput(_Strict):
    """The model computes its own loss (e.g. `return logits, loss`): where it is in the output, and which input
    holds the labels."""

    from_output: int | str = Field(
        description="Index of the loss in the model's tuple output, or its key in a dict output (e.g. 1 for "
        "`return logits, loss`)."
    )
    labels: str | None = Field(
        None,
        description="The forward() input that holds the labels (e.g. targets): the one-hot context of cDNI "
        "synthesizers, and train_step's `target`.",
    )
    shift_labels: int = Field(
        0,
        ge=0,
        le=10**6,
        description="The model shifts the labels inside its loss (Hugging Face causal LMs take labels = input_ids; "
        "position t predicts labels[t + 1]): shift the (B, T) labels this many positions left for cDNI's context "
        "and local heads, so they see the token each position predicts (the last positions get none).",
    )

    @model_validator(mode="after")
    def _shift_needs_labels(self) -> LossFromOutput:
        if self.shift_labels and self.labels is None:
            raise ValueError("`shift_labels` shifts the labels input: name it, e.g. `labels: labels`")
        return self


# a name, or a mapping for a loss the model returns; tagged so that errors come from the one branch that applies
LossSpec = Annotated[
    Union[Annotated[str, Tag("str")], Annotated[LossFromOutput, Tag("dict")]],  # noqa: UP007
    Discriminator(lambda v: "dict" if isinstance(v, (dict, LossFromOutput)) else "str"),
]


class Spec(_Strict):
    """A cuts.yaml file."""

    model: str | None = Field(
        None, description="Factory function or nn.Module attribute in model.py (default: `model`, then `build_model`)."
    )
    model_args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the factory.")
    inputs: dict[str, TensorSpec] | None = Field(
        None, description="Example inputs by forward() argument name, for tracing and shape propagation."
    )
    trace: TraceConfig = Field(default_factory=TraceConfig)
    recurrent: RecurrentConfig | None = Field(
        None, description="A recurrent program: the core unrolled in time and trained with truncated BPTT (`bptt`)."
    )
    cuts: CutsSpec = Field(
        None,
        validate_default=True,
        description="Cut points, in any order (none for a `recurrent` program), or {auto: {stages: S, balance: "
        "flops}} to let dnicompile place them.",
    )
    stages: dict[Union[int, str], StageConfig] = Field(  # noqa: UP007 - pydantic needs the int branch first
        default_factory=dict, description="`default`, plus overrides by stage index or name."
    )
    loss: LossSpec = Field(
        "cross_entropy",
        description="cross_entropy, nll, mse, 'package.module:function', or {from_output: i} when the model "
        "returns its own loss.",
    )
    data: DataConfig | None = Field(None, description="Training data set.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=lambda: DistributedConfig())
    bptt: BPTTConfig | None = Field(None, description="Truncated BPTT of the `recurrent` core (synthetic gradients).")

    _origin: str = PrivateAttr("<spec>")
    _marks: dict[tuple, tuple[int, int]] = PrivateAttr(default_factory=dict)
    _allow_imports: bool = PrivateAttr(False)
    _chosen_by: AutoCutsConfig | None = PrivateAttr(None)

    @field_validator("data", mode="before")
    @classmethod
    def _data_shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("cuts", mode="before")
    @classmethod
    def _cuts_unless_recurrent(cls, v: Any, info: ValidationInfo) -> Any:
        recurrent = info.data.get("recurrent") is not None
        if v is None:
            if recurrent:
                return []
            raise PydanticCustomError("missing", "Field required")
        if isinstance(v, list) and not v and not recurrent:
            raise ValueError("List should have at least 1 item after validation, not 0")
        if (isinstance(v, dict) or isinstance(v, list) and v) and recurrent:
            raise ValueError(
                "a `recurrent` program is cut in time by `bptt`, not in its graph: remove `cuts` (or `recurrent`)"
            )
        return v

    @property
    def auto_cuts(self) -> AutoCutsConfig | None:
        """`cuts: {auto: ...}`'s settings, until compiling puts the chosen cuts in place (then see `chosen_by`)."""
        return self.cuts.auto if isinstance(self.cuts, AutoCuts) else None

    @property
    def chosen_by(self) -> AutoCutsConfig | None:
        """The `cuts: {auto: ...}` settings this spec's cuts were chosen by (compile/auto.py), None if written."""
        return self._chosen_by

    def where(self, *loc: Any) -> str:
        """`file:line:col` of the key at `loc` (e.g. where('cuts', 0, 'after')), as precisely as known."""
        return _where(tuple(loc), self._origin, self._marks, bare=True)

    @property
    def allows_imports(self) -> bool:
        """Whether the user allowed this spec to import Python code (--allow-imports, load_spec(allow_imports=True))."""
        return self._allow_imports

    def configs(self, kind: type[BaseModel]) -> list[tuple[tuple, Any]]:
        """Every `kind` (e.g. OptimizerConfig) in the spec, with its location: [(('stages', 'default',
        'optimizer'), config), ...], in the order of the spec's fields."""
        found: list[tuple[tuple, Any]] = []
        stack: list[tuple[tuple, Any]] = [((), self)]
        while stack:
            loc, obj = stack.pop()
            if isinstance(obj, kind):
                found.append((loc, obj))
            children: list[tuple[Any, Any]] = []
            if isinstance(obj, BaseModel):
                children = [(k, getattr(obj, k)) for k in type(obj).model_fields]
            elif isinstance(obj, dict):
                children = list(obj.items())
            elif isinstance(obj, list):
                children = list(enumerate(obj))
            stack.extend((loc + (k,), v) for k, v in reversed(children) if isinstance(v, (BaseModel, dict, list)))
        return found

    def imports(self) -> list[tuple[tuple, str, str]]:
        """Every name in the spec that imports a Python module and runs code from it, as (location, what, name):
        a loss 'package.module:function' (except a torch.nn.functional loss) and synthesizer classes
        'package.module:ClassName', local-loss heads 'package.module:ClassName', a data loader 'file.py:function'."""
        found = []
        if isinstance(self.loss, str) and ":" in self.loss and not is_torch_loss(self.loss):
            found.append((("loss",), "loss function", self.loss))
        for kind, what in (
            (SyntheticGradientConfig, "synthesizer class"),
            (SyntheticInputConfig, "synthetic-input class"),
        ):
            for loc, cfg in self.configs(kind):
                if ":" in cfg.model:
                    found.append((loc + ("model",), what, cfg.model))
        for loc, cfg in self.configs(LocalLossConfig):
            if ":" in cfg.head:
                found.append((loc + ("head",), "local-loss head class", cfg.head))
        if self.data is not None and self.data.loader is not None:
            found.append((("data", "loader"), "data loader function", self.data.loader))
        return found

    @property
    def folder(self) -> Path:
        """The folder of the spec's file, against which the paths it names resolve (the working folder for a
        spec read from a string or a dict)."""
        return Path(self._origin).parent if not self._origin.startswith("<") else Path.cwd()

    def check_stage_keys(self, num_stages: int) -> None:
        """Raise SpecError unless every key under `stages:` is `default`, a stage index < num_stages, or `stageN`.

        Call it once the number of stages is known (after partitioning): an override for a stage that does not
        exist would otherwise be ignored without a word.
        """
        last = num_stages - 1
        indices = "0" if last == 0 else ("0 or 1" if last == 1 else f"0 to {last}")
        names = "stage0" if last == 0 else ("stage0 or stage1" if last == 1 else f"stage0 to stage{last}")
        stages = f"{num_stages} stage{'s' if num_stages != 1 else ''}"
        if isinstance(self.cuts, list) and num_stages == len(self.cuts) + 1:
            counted = f"the {len(self.cuts)} cut{'s make' if len(self.cuts) != 1 else ' makes'} {stages}"
        else:
            counted = f"the program has {stages}"
        allowed = f"Use `default`, a stage index ({indices}) or a stage name ({names})."
        problems = []
        for key in self.stages:
            where = self.where("stages", key)
            text = str(key)
            index = None
            if isinstance(key, int) or text.lstrip("-").isdigit():
                index = int(text)
            elif text.startswith("stage") and text[5:].isdigit():
                index = int(text[5:])
            if text == "default" or (index is not None and 0 <= index <= last):
                continue
            if index is not None:
                problems.append(f"{where}: `stages` has an entry `{text}` for stage {index}, but {counted}. {allowed}")
            else:
                valid = ["default"] + [f"stage{i}" for i in range(num_stages)]
                problems.append(
                    f"{where}: `stages` has an entry `{text}`, which is not a stage{did_you_mean(text, valid)}. {allowed}"
                )
        if problems:
            raise SpecError(problems[0] if len(problems) == 1 else "invalid spec:\n  " + "\n  ".join(problems))

    def stage_precision(self, index: int, name: str) -> str:
        """A stage's `precision`: its own entry over `default`, else fp32."""
        default = self.stages.get("default", StageConfig())
        key = next((k for k in (index, str(index), name) if k in self.stages), None)
        own = self.stages.get(key) if key is not None else StageConfig()
        return own.precision or default.precision or "fp32"

    def stage_config(self, index: int, name: str) -> tuple[OptimizerConfig, ClockConfig]:
        """Optimizer and clock of one stage: its own entry (by index or name) over `default`. A stage that
        accumulates k steps' gradients updates on the clock {every: k, offset: k - 1} ([Note: accumulation])."""
        default = self.stages.get("default", StageConfig())
        own = self.stages.get(index) or self.stages.get(str(index)) or self.stages.get(name) or StageConfig()
        opt = own.optimizer or default.optimizer or OptimizerConfig()
        clock = own.clock or default.clock or ClockConfig()
        k = self.stage_accumulate(index, name)
        if k > 1:
            if clock != ClockConfig():
                key = next((c for c in (index, str(index), name) if c in self.stages), None)
                both = key if (self.stages.get(key) or StageConfig()).accumulate else "default"
                raise SpecError(
                    f"{self.where('stages', both, 'accumulate')}: `stages.{both}.accumulate: {k}` makes stage{index} "
                    f"update every {k} steps, so it takes no `clock` (it has {clock.model_dump(exclude_defaults=True)}"
                    "). Remove one of them."
                )
            clock = ClockConfig(every=k, offset=k - 1)
        return opt, clock

    def stage_compile(self, index: int, name: str) -> dict | None:
        """A stage's torch.compile options (its own `compile` over `default`), None for eager."""
        default = self.stages.get("default", StageConfig())
        own = self.stages.get(index) or self.stages.get(str(index)) or self.stages.get(name) or StageConfig()
        config = own.compile if own.compile is not None else default.compile
        if not config:
            return None
        return (CompileConfig() if config is True else config).model_dump(exclude_none=True)

    def stage_accumulate(self, index: int, name: str) -> int:
        """A stage's `accumulate` (steps whose gradients each update averages): its own entry over `default`."""
        default = self.stages.get("default", StageConfig())
        own = self.stages.get(index) or self.stages.get(str(index)) or self.stages.get(name) or StageConfig()
        return own.accumulate or default.accumulate or 1


# --------------------------------------------------------------------------- loading


# torch.nn.functional losses of (input, target) that a spec may name without --allow-imports
TORCH_LOSSES = frozenset(
    {
        "binary_cross_entropy",
        "binary_cross_entropy_with_logits",
        "cross_entropy",
        "huber_loss",
        "kl_div",
        "l1_loss",
        "mse_loss",
        "multi_margin_loss",
        "multilabel_margin_loss",
        "multilabel_soft_margin_loss",
        "nll_loss",
        "poisson_nll_loss",
        "smooth_l1_loss",
        "soft_margin_loss",
    }
)


def is_torch_loss(name: str) -> bool:
    """'torch.nn.functional:mse_loss' and the like: a torch loss, which a spec may name without allowing imports."""
    module, _, attr = name.partition(":")
    return module == TORCH_LOSS_MODULE and attr in TORCH_LOSSES


def imports_allowed_by_environment() -> bool:
    """True where `DNICOMPILE_ALLOW_IMPORTS=1`: how `--allow-imports` reaches the worker processes it starts."""
    return os.environ.get(ALLOW_IMPORTS_ENV) == "1"


def load_spec(
    source: str | Path | dict | Spec, allow_imports: bool | None = None, overrides: list[str] | tuple = ()
) -> Spec:
    """Read a spec from a YAML path, a YAML string, a dict or a Spec; raise SpecError with file:line:col.

    `overrides`: `KEY=VALUE` settings laid over the file before it is checked (the command line's --set, e.g.
    `stages.default.optimizer.lr=1e-4`, `cuts.0.synthetic_gradient.model=mlp`): KEY is a dotted path (numbers
    index lists), VALUE is YAML. A mistake there is reported at `--set KEY=VALUE`, as one in the file is at
    its line.

    A spec that names Python code to import (a loss 'package.module:function', a synthesizer
    'package.module:ClassName') is refused unless `allow_imports` is true (the command line's --allow-imports;
    None: allowed where the environment has DNICOMPILE_ALLOW_IMPORTS=1, or where the Spec was allowed already).
    """
    if isinstance(source, Spec):
        if overrides:
            raise SpecError("overrides apply to a spec being read (a path, YAML or a dict), not to a Spec object.")
        return _check_imports(source, allow_imports)
    if isinstance(source, dict):
        data, marks = copy.deepcopy(source), {}
        _apply_sets(data, marks, overrides)
        return _check_imports(_validate(data, origin="<dict>", marks=marks), allow_imports)
    if isinstance(source, Path) or (isinstance(source, str) and _looks_like_path(source)):
        path = Path(source)
        if path.is_dir():
            raise SpecError(f"spec file {str(path)!r} is a directory; pass the path of a YAML file with --spec.")
        if not path.is_file():
            close = close_matches(path.name, [q.name for q in _siblings(path, (".yaml", ".yml"))], n=1)
            hint = f" (did you mean {str(path.parent / close[0])!r}?)" if close else ""
            raise SpecError(f"spec file {str(path)!r} not found{hint}; pass the path of a YAML file with --spec.")
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_SPEC_BYTES + 1)  # never more, whatever the file claims to be
            _check_size(len(raw), str(path))
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"cannot read spec file {str(path)!r}: {e}") from e
        return _check_imports(_parse(text, origin=str(path), overrides=overrides), allow_imports)
    if isinstance(source, str):
        _check_size(len(source.encode("utf-8", "replace")), "<yaml>")
        return _check_imports(_parse(source, origin="<yaml>", overrides=overrides), allow_imports)
    raise SpecError(f"a spec is a path, a YAML string, a dict or a Spec, not {type(source).__name__}")


def _check_size(size: int, origin: str) -> None:
    if size > MAX_SPEC_BYTES:
        raise SpecError(
            f"{origin}: the spec is more than {MAX_SPEC_BYTES:,} bytes; a spec is a short YAML file (the examples in "
            "specs/ are under 2 KB). Pass the spec's path with --spec, not a data or model file."
        )


def import_named(name: str, what: str, where: str, error: type[Exception]) -> Any:
    """What 'package.module:attr' names, for the spec's user classes and functions (`what`: "synthesizer class",
    "local-loss head class", "loss function"): an error naming `where` when the form is wrong, the module does not
    import or raises while importing, or it has no such attribute (with did-you-mean). load_spec has refused the
    name unless the user allowed imports."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise error(f"{where}: {what} {name!r} is not of the form 'package.module:name'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise error(f"{where}: cannot import module {module_name!r} for {what} {name!r}: {e}") from None
    except Exception as e:  # the module's own code raised while importing
        raise error(
            f"{where}: importing module {module_name!r} for {what} {name!r} raised {type(e).__name__}: {e}"
        ) from None
    found = getattr(module, attr, None)
    if found is None:
        public = [n for n in vars(module) if not n.startswith("_")]
        raise error(f"{where}: module {module_name!r} has no {what} {attr!r}{did_you_mean(attr, public)}.")
    if not callable(found):
        raise error(f"{where}: {what} {name!r} is a {type(found).__name__}, not callable.")
    return found


def _check_imports(spec: Spec, allow: bool | None) -> Spec:
    """Refuse a spec that would import Python code unless the user allowed it; record the allowance."""
    if allow is None:
        allow = spec._allow_imports or imports_allowed_by_environment()
    found = sorted(spec.imports(), key=lambda item: spec._marks.get(item[0], (0, 0)))
    if found and not allow:
        lines = []
        for loc, what, name in found:
            module = name.partition(":")[0]
            builtin = (
                "the built-in losses (cross_entropy, nll, mse, or a torch loss as 'torch.nn.functional:smooth_l1_loss')"
                if what == "loss function"
                else "the built-in data sets (`data: fashion-mnist`, copy, repeat_copy, text)"
                if what == "data loader function"
                else "the built-in synthesizers (linear, mlp" + (", conv)" if what == "synthesizer class" else ")")
            )
            lines.append(
                f"{spec.where(*loc)}: `{_dotted(loc)}: {name}` names a {what}: using it imports "
                + (f"`{module}`" if module.endswith(".py") else f"module `{module}`")
                + f" and runs its code. Use one of {builtin}, or allow imports."
            )
        how = (
            "A spec runs no code unless you allow it: if you trust this spec and the modules it names, pass "
            "--allow-imports on the command line (from Python: load_spec(path, allow_imports=True))."
        )
        if len(lines) == 1:
            raise SpecError(f"{lines[0]} {how}")
        raise SpecError("the spec names Python code to import:\n  " + "\n  ".join(lines) + "\n  " + how)
    spec._allow_imports = bool(allow)
    return spec


def _siblings(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files next to `path` (in its folder, if that exists) with one of `suffixes`: candidates for a typo."""
    try:
        return sorted(q for q in path.parent.iterdir() if q.suffix in suffixes and q.is_file())[:200]
    except OSError:
        return []


def _looks_like_path(s: str) -> bool:
    return "\n" not in s and ":" not in s.split("/")[-1] and (s.endswith((".yaml", ".yml")) or Path(s).exists())


def _parse(text: str, origin: str, overrides: list[str] | tuple = ()) -> Spec:
    _check_events(text, origin)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(_yaml_message(e, origin)) from None
    except RecursionError:  # not reached after _check_events; kept so that no input gives a traceback
        raise SpecError(f"{origin}: the spec is nested too deeply to read (at most {MAX_DEPTH} levels).") from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise SpecError(
            f"{origin}:1:1: the spec must be a mapping with at least a `cuts:` list, but the file is {kind}."
        )
    marks: dict[tuple, tuple[int, int]] = {}
    _collect_marks(root, (), marks, origin)
    _apply_sets(data, marks, overrides)
    return _validate(data, origin=origin, marks=marks)


def _unshared(value: Any) -> Any:
    """A copy of YAML data in which no mapping or list appears twice."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


class _SetMark(tuple):
    """The place of a value a --set put there: errors about it name the --set (sorts after every line)."""

    def __new__(cls, text: str) -> _SetMark:
        mark = super().__new__(cls, (10**9, 0))
        mark.text = text
        return mark


def _apply_sets(data: dict, marks: dict, overrides: list[str] | tuple) -> None:
    """Lay `KEY=VALUE` overrides over the spec's data ([load_spec]); what they set is marked as theirs."""
    if overrides:  # a YAML alias (`*cdni`) is the same object at every use: a --set changes one place only
        data.update(_unshared(data))
    for text in overrides:
        where = f"--set {text}"
        key, eq, raw = text.partition("=")
        key = key.strip()
        if not eq or not key or len(text) > 10_000:
            raise SpecError(f"{where}: expected KEY=VALUE, e.g. --set stages.default.optimizer.lr=1e-4.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise SpecError(f"{where}: the value is not YAML ({str(e).splitlines()[0]}); quote a string.") from None
        parts: list[str | int] = [int(k) if k.isdigit() else k for k in key.split(".")]
        if any(k == "" for k in parts):
            raise SpecError(f"{where}: `{key}` has an empty part; keys are joined by single dots.")
        node: Any = data
        for i, part in enumerate(parts):
            loc, last = tuple(parts[: i + 1]), i == len(parts) - 1
            here = _dotted(loc[:-1]) or "the spec"
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    size = f" (it has {len(node)})" if isinstance(node, list) else " (it is not a list)"
                    raise SpecError(f"{where}: `{here}` has no item {part}{size}.")
            elif not isinstance(node, dict):
                raise SpecError(f"{where}: `{here}` is not a mapping, so it has no key `{part}`.")
            elif not last and not isinstance(node.get(part), (dict, list)):
                if node.get(part) is not None:
                    raise SpecError(
                        f"{where}: `{_dotted(loc)}` is {node[part]!r}, not a mapping with `{parts[i + 1]}`."
                    )
                node[part] = {}
                marks[loc] = _SetMark(where)  # made by this --set: an unknown key here is the --set's
            if last:
                node[part] = value
                for k in [k for k in marks if k[: len(loc)] == loc]:  # what the file had there is gone
                    del marks[k]
                marks[loc] = _SetMark(where)
            else:
                node = node[part]


_SAFE_TAGS = {"!", *(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map"))}


def _check_events(text: str, origin: str) -> None:
    """Walk the YAML events (the parser's stream, before anything is built) and refuse, at their line, what
    could make reading the spec unbounded or unsafe: nesting deeper than MAX_DEPTH, aliases that expand to
    more than MAX_ALIAS_NODES values (a "billion laughs" bomb), and tags that would build Python objects.
    Syntax errors are left to the composer, which reports them with their context."""

    def at(mark: Any) -> str:
        return f"{origin}:{mark.line + 1}:{mark.column + 1}"

    frames: list[list] = []  # open mappings and lists: [anchor, values inside, levels below]
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (values it expands to, levels it spans)
    alias_values = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            tag = getattr(event, "tag", None)
            if tag is not None and tag not in _SAFE_TAGS:
                shown = "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,2002:") else tag
                if "python/" in tag:
                    raise SpecError(
                        f"{at(event.start_mark)}: unsafe YAML tag `{shown}`: a spec is data and cannot create Python "
                        "objects or call functions. Remove the tag and write a plain value."
                    )
                raise SpecError(
                    f"{at(event.start_mark)}: unsupported YAML tag `{shown}`; remove it and write a plain value "
                    "(a string, number, true/false, null, list or mapping)."
                )
            if isinstance(event, yaml.AliasEvent):
                if event.anchor not in anchors:
                    continue  # undefined or recursive: the composer says so
                values, levels = anchors[event.anchor]
                alias_values += values
                if alias_values > MAX_ALIAS_NODES:
                    raise SpecError(
                        f"{at(event.start_mark)}: the YAML aliases in this spec (`*{event.anchor}` here) expand to more "
                        f'than {MAX_ALIAS_NODES:,} values, far more than any spec needs: an alias bomb ("billion '
                        'laughs")? Write the values out instead of repeating `*name`.'
                    )
                if len(frames) + levels > MAX_DEPTH:
                    raise SpecError(_too_deep(at(event.start_mark)))
                if frames:
                    frames[-1][1] += values
                    frames[-1][2] = max(frames[-1][2], levels)
            elif isinstance(event, yaml.ScalarEvent):
                if event.anchor:
                    anchors[event.anchor] = (1, 0)
                if frames:
                    frames[-1][1] += 1
            elif isinstance(event, yaml.CollectionStartEvent):
                if len(frames) >= MAX_DEPTH:
                    raise SpecError(_too_deep(at(event.start_mark)))
                frames.append([event.anchor, 1, 0])
            elif isinstance(event, yaml.CollectionEndEvent) and frames:
                anchor, values, levels = frames.pop()
                if anchor:
                    anchors[anchor] = (values, levels + 1)
                if frames:
                    frames[-1][1] += values
                    frames[-1][2] = max(frames[-1][2], levels + 1)
    except yaml.YAMLError:
        return  # a syntax error: _parse reports it with its context


def _too_deep(where: str) -> str:
    return (
        f"{where}: the spec nests lists and mappings more than {MAX_DEPTH} levels deep; a spec needs about 6. "
        "Flatten the value (or pass large structures to your model some other way)."
    )


def _check_values(data: Any, origin: str, marks: dict) -> None:
    """Refuse non-finite numbers (`.inf`, `.nan`) anywhere in the spec, and nesting deeper than MAX_DEPTH
    (a spec given as a dict is not parsed, so its depth is checked here)."""
    stack: list[tuple[tuple, Any]] = [((), data)]
    while stack:
        loc, value = stack.pop()
        if len(loc) > MAX_DEPTH:
            raise SpecError(_too_deep(_where(loc, origin, marks)))
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(
                f"{_where(loc, origin, marks)}: `{_dotted(loc) or '(top level)'}` is {value}, not a finite number; "
                "a spec's numbers must be finite (an infinite or NaN learning rate or scale trains to NaN)."
            )
        if isinstance(value, dict):
            stack.extend((loc + (k,), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((loc + (i,), v) for i, v in enumerate(value))


def _yaml_message(e: yaml.YAMLError, origin: str) -> str:
    """A YAML parser error as `file:line:col: what, where it started, how to fix it`."""

    def at(mark: Any) -> str:
        return f"{origin}:{mark.line + 1}:{mark.column + 1}" if mark is not None else origin

    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    started = f" ({context} that starts at {at(context_mark)})" if context and context_mark is not None else ""
    if isinstance(e, yaml.constructor.ConstructorError):  # valid syntax, but not a value a spec can hold
        return f"{at(mark)}: YAML error: {problem}{started}. Write a plain value (string, number, list or mapping)."
    if "'\\t'" in problem:  # PyYAML shows the tab as its repr
        hint = "YAML indents with spaces only: replace the tab with spaces."
    elif "expected <block end>" in problem or "expected <block mapping start>" in problem:
        hint = "This line is indented differently from the lines around it: align keys of one mapping (or `-` items of one list) in the same column."
    elif "mapping values are not allowed" in problem:
        hint = "A second `:` on one line: put a nested key on its own, further indented line, or quote a value that contains `: `."
    elif "flow sequence" in (context or "") or "flow mapping" in (context or ""):
        hint = "A `[` list or `{` mapping is not closed, or its items are not separated by `,`."
    elif "quoted scalar" in (context or ""):
        hint = "A quoted string is not closed: add the closing quote."
    else:
        hint = "Check the indentation (spaces, not tabs) and the `key: value` pairs."
    return f"{at(mark)}: YAML syntax error: {problem}{started}. {hint}"


def _collect_marks(node: yaml.Node, loc: tuple, marks: dict, origin: str = "<spec>") -> None:
    """Record line:col of every key (mapping) and item (sequence) under its pydantic-style location.

    A key given twice in one mapping is an error: YAML would silently keep the last value.
    """
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = _key_value(key_node)
            if not isinstance(key, (str, int)):  # e.g. a list as a key; pydantic reports it
                continue
            if key in seen:
                first = seen[key].start_mark
                raise SpecError(
                    f"{origin}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}: key "
                    f"`{_dotted(loc + (key,))}` appears twice (first at {origin}:{first.line + 1}:{first.column + 1}); "
                    "YAML would silently keep only the last one. Merge the two entries into one."
                )
            seen[key] = key_node
            marks[loc + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _collect_marks(value_node, loc + (key,), marks, origin)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            marks[loc + (i,)] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _collect_marks(item, loc + (i,), marks, origin)


def _key_value(key_node: yaml.Node) -> Any:
    value = key_node.value
    if key_node.tag.endswith(":int"):
        try:
            return int(value)
        except ValueError:
            return value
    return value


def _validate(data: dict, origin: str, marks: dict) -> Spec:
    _check_values(data, origin, marks)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_validation(e, origin, marks)) from None
    spec._origin = origin
    spec._marks = marks
    return spec


def _format_validation(err: ValidationError, origin: str, marks: dict) -> str:
    lines = []
    for item in err.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS)))
        where = _where(loc, origin, marks)
        dotted = _dotted(loc) or "(top level)"
        kind = item["type"]
        if kind == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            hint = did_you_mean(str(loc[-1]), allowed)
            lines.append(f"{where}: unknown key `{dotted}`{hint}. Allowed here: {', '.join(allowed)}.")
        elif kind == "missing":
            lines.append(f"{where}: missing required key `{dotted}`: {_describe(loc)}")
        elif kind == "value_error":  # our own validators: the message says what was given
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: `{dotted}`: {msg}. {_describe(loc)}".rstrip())
        else:
            got = item.get("input")
            shown = json.dumps(got, default=str)[:60] if not isinstance(got, dict) else "a mapping"
            lines.append(f"{where}: `{dotted}`: {item['msg']} (got {shown}). {_describe(loc)}".rstrip())
    # pydantic reports every branch of a union; keep each message once
    lines = list(dict.fromkeys(lines))
    return "invalid spec:\n  " + "\n  ".join(lines)


_UNION_TAGS = {"int", "str", "float", "bool", "none", "list", "dict"}


def _where(loc: tuple, origin: str, marks: dict, bare: bool = False) -> str:
    """`origin:line:col` of the key at `loc` (or of the nearest key above it that has a place), or the --set
    that put it there; without a place, `origin` (`origin:1:1` unless `bare`)."""
    while loc and loc not in marks:
        loc = loc[:-1]
    if loc in marks:
        if isinstance(marks[loc], _SetMark):
            return marks[loc].text
        line, col = marks[loc]
        return f"{origin}:{line}:{col}"
    return f"{origin}:1:1" if marks and not bare else origin


def _dotted(loc: tuple) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that validates the mapping at `loc`, found by walking field annotations."""
    current: Any = Spec
    for part in loc:
        current = _unwrap(_branch(current, part))
        if isinstance(current, type) and issubclass(current, BaseModel):
            if not isinstance(part, str) or part not in current.model_fields:
                return None
            current = current.model_fields[part].annotation
        else:
            origin = typing.get_origin(current)
            args = typing.get_args(current)
            if origin in (list, tuple) and args:
                current = args[0]
            elif origin is dict and len(args) == 2:
                current = args[1]
            else:
                return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _branch(tp: Any, part: Any) -> Any:
    """The member of a union that a key `part` goes into: a list for an index (`cuts[0]`), else a model with
    that field (`cuts.auto`); anything else as it is."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) not in (Union, getattr(__import__("types"), "UnionType", Union)):
        return tp
    for member in typing.get_args(tp):
        inner = _unwrap(member)
        if isinstance(part, int) and typing.get_origin(inner) in (list, tuple):
            return inner
        if isinstance(part, str) and isinstance(inner, type) and issubclass(inner, BaseModel):
            if part in inner.model_fields:
                return inner
    return tp


def _unwrap(tp: Any) -> Any:
    """Optional[X] / Union[X, None] -> X (the first model in a union); Annotated[X, ...] -> X."""
    if typing.get_origin(tp) is Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (Union, getattr(__import__("types"), "UnionType", Union)):
        members = [_unwrap(a) for a in typing.get_args(tp) if a is not type(None)]
        models = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if models else (members[0] if len(members) == 1 else tp)
    return tp


def _allowed_keys(loc: tuple) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model else []


def _describe(loc: tuple) -> str:
    parent = _model_at(loc[:-1]) if loc else None
    if parent and isinstance(loc[-1], str) and loc[-1] in parent.model_fields:
        desc = parent.model_fields[loc[-1]].description
        return f"Expected: {desc}" if desc else ""
    return ""


def json_schema() -> dict:
    """The spec's JSON Schema, for editors that complete and check YAML."""
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "dnicompile cut spec"
    return schema
