"""Loss functions named in the spec's `loss:` key."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import is_dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .errors import DNIError, SpecError, did_you_mean
from .spec import import_named


def _cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if output.dim() == 3 and target.dim() == 2:  # (B, T, V) logits, (B, T) token targets
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    return F.cross_entropy(output, target)


def _nll(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if output.dim() == 3 and target.dim() == 2:
        return F.nll_loss(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    return F.nll_loss(output, target)


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target.to(output.dtype))


LOSSES: dict[str, Callable] = {"cross_entropy": _cross_entropy, "nll": _nll, "mse": _mse}


def get_loss(name, where: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function for a spec's `loss:` value: a built-in name, 'package.module:function', or
    {from_output: i} (the model returns its loss: picked out of the output, the target is not used)."""
    if not isinstance(name, str):
        key = name.from_output
        return lambda output, target: output_value(output, key)
    if name in LOSSES:
        return LOSSES[name]
    if ":" in name:
        return import_named(name, "loss function", where, SpecError)
    raise SpecError(
        f"{where}: unknown loss {name!r}{did_you_mean(name, LOSSES)}; use {', '.join(LOSSES)} "
        "or your own function as 'package.module:function'."
    )


def output_value(output, key: int | str):
    """`loss: {from_output: key}`: the loss in the model's output, as the program's last stage returns it (a
    dataclass or `ModelOutput` the model returns arrives there as the dict of its fields).

    A name is a key of a dict or a field of a dataclass, `ModelOutput` or namedtuple; a number is a position in a
    tuple or list, or, in a dict, a position among the values that are not None (as a `ModelOutput` indexes:
    `out[0]` is `out.loss` when the labels are given, `out.logits` when not). Works on the fx output structure
    of a graph as well (its constant None values are None)."""
    if isinstance(key, str):
        if isinstance(output, Mapping):
            return output[key]
        if isinstance(output, tuple) and hasattr(output, "_fields") or is_dataclass(output):
            try:
                return getattr(output, key)
            except AttributeError:
                raise KeyError(key) from None
        raise KeyError(key)
    if isinstance(output, Mapping):
        if key in output:
            return output[key]
        return [v for v in output.values() if v is not None][key]
    if isinstance(output, (tuple, list)):
        return output[key]
    raise TypeError(f"cannot index {type(output).__name__}")


def check_output_loss(program, where: str) -> int | None:
    """For `loss: {from_output: key, labels: name}`: check that the model's output has a scalar at `key` (a
    position, a key or a field name, see output_value) and that `name` is a program input; return that input's
    index (None without `labels`)."""
    cfg = program.spec.loss
    gm = program.stages[-1].graph_module
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    if isinstance(out, fx.Node) and out.op == "call_function" and hasattr(out.target, "_fields") and not out.kwargs:
        out = out.target(*out.args)  # a namedtuple the graph builds by a call of its class
    try:
        value = output_value(out, cfg.from_output)
    except (IndexError, KeyError, TypeError):
        output_type = getattr(program, "output_type", None)
        if isinstance(out, fx.Node):
            kind = "a single tensor"
        elif output_type is not None and output_type.kind != "leaf":
            kind = output_type.describe()
        elif isinstance(out, dict):
            kind = f"a dict with keys {list(out)}"
        else:
            kind = f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__
        raise SpecError(
            f"{where}: `loss: {{from_output: {cfg.from_output!r}}}`, but the model returns {kind}, which has no "
            "element there. Give the position of the loss in what forward() returns (e.g. 1 for `return logits, "
            "loss`), its key or field name (e.g. `loss` for a ModelOutput), or use a loss function by name "
            "(cross_entropy, ...)."
        ) from None
    meta = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
    if meta is None or not hasattr(meta, "shape") or len(meta.shape) != 0:
        shape = f"shape {list(meta.shape)}" if meta is not None and hasattr(meta, "shape") else repr(value)
        raise SpecError(
            f"{where}: `loss: {{from_output: {cfg.from_output!r}}}` is not a scalar loss ({shape}). Point it at "
            "the loss the model returns, and give the example inputs it needs (e.g. `targets`) under `inputs:`."
        )
    if cfg.labels is None:
        return None
    names = list(program.input_names)
    if cfg.labels not in names:
        raise SpecError(
            f"{where}: `labels: {cfg.labels}` is not an input of the program{did_you_mean(cfg.labels, names)}; "
            f"its inputs are {names}."
        )
    return names.index(cfg.labels)


# --------------------------------------------------------------------------- per-step losses
def _cross_entropy(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    b, t = y.shape[:2]
    return F.cross_entropy(y.reshape(b * t, -1), target.reshape(b * t).long(), reduction="none").reshape(b, t)


def _binary_cross_entropy(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(y, target.to(y.dtype), reduction="none")
    return loss.reshape(*loss.shape[:2], -1).sum(-1)


def _mse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    loss = (y - target.to(y.dtype)) ** 2
    return loss.reshape(*loss.shape[:2], -1).sum(-1)


STEP_LOSSES: dict[str, Callable] = {
    "cross_entropy": _cross_entropy,
    "binary_cross_entropy": _binary_cross_entropy,
    "mse": _mse,
}


def get_step_loss(name: str, where: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A per-step loss: (B, T, ...) outputs and targets -> (B, T) losses (summed over a step's elements)."""
    if not isinstance(name, str):
        raise SpecError(
            f"{where}: a recurrent program takes its loss by name ({', '.join(STEP_LOSSES)} or "
            "'package.module:function'), not a loss computed inside the model."
        )
    if name in STEP_LOSSES:
        return STEP_LOSSES[name]
    if ":" in name:
        return import_named(name, "loss function", where, SpecError)
    raise SpecError(
        f"{where}: unknown loss {name!r} for a recurrent program{did_you_mean(name, STEP_LOSSES)}; use "
        f"{', '.join(STEP_LOSSES)} or your own per-step function as 'package.module:function' "
        "returning (B, T) losses."
    )


def check_loss_inputs(name, output, target, where: str) -> None:
    """Before the first step: the program's output and the labels must fit the spec's built-in loss. Raises a
    DNIError that names the loss, the shapes and dtypes, and what to change (checked once: the shapes do not
    change between batches)."""
    if not isinstance(name, str) or name not in LOSSES:
        return  # a loss the model computes, or the user's own function: theirs to check
    if not isinstance(output, torch.Tensor):
        got = "None" if output is None else type(output).__name__
        raise DNIError(
            f"{where}: loss `{name}` needs the model to return one tensor, but it returned {got}; return the class "
            "scores (or the predictions), or let the model compute its own loss: `loss: {from_output: <key>}`."
        )
    if target is None:
        return
    shapes = f"the model's output is {_desc(output)}, the labels are {_desc(target)}"
    if name == "mse":
        if not target.is_floating_point():
            raise DNIError(
                f"{where}: loss `mse` compares the output with float targets of its shape, but the labels are class "
                f"indices ({shapes}); use `loss: cross_entropy` for classes."
            )
        if target.shape != output.shape:
            raise DNIError(f"{where}: loss `mse` needs targets of the output's shape ({shapes}).")
        return
    if target.is_floating_point():
        return  # class probabilities: cross_entropy checks their shape itself
    tokens = output.dim() == 3 and target.dim() == 2
    if output.dim() < 2 or (tuple(target.shape) != tuple(output.shape[:-1]) and not tokens):
        raise DNIError(
            f"{where}: loss `{name}` needs class scores (B, K) with labels (B,), or (B, T, K) with (B, T), but "
            f"{shapes}."
        )
    k = output.shape[-1]
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= k:
        raise DNIError(
            f"{where}: the labels run from {low} to {high}, but the model gives {k} class scores ({shapes}); make "
            f"its last layer at least {high + 1} wide (as many as the data set has classes), or check the labels."
        )


def _desc(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
