"""Loss functions named in the spec's `loss:` key."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import SpecError, did_you_mean


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


def get_loss(name: str, where: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function for a spec's `loss:` value: a built-in name or 'package.module:function'."""
    if name in LOSSES:
        return LOSSES[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise SpecError(f"{where}: cannot load loss function {name!r}: {e}") from None
        if not callable(fn):
            raise SpecError(f"{where}: loss {name!r} is not callable.")
        return fn
    raise SpecError(
        f"{where}: unknown loss {name!r}{did_you_mean(name, LOSSES)}; use {', '.join(LOSSES)} "
        "or your own function as 'package.module:function'."
    )
