"""Build torch.optim optimizers and lr schedulers from the spec, with errors that name the spec key."""

from __future__ import annotations

import inspect

import torch

from .errors import SpecError, did_you_mean
from .spec import OptimizerConfig


def _public_classes(module, base) -> dict[str, type]:
    return {n: c for n, c in vars(module).items() if isinstance(c, type) and issubclass(c, base) and c is not base}


def build_optimizer(params, config: OptimizerConfig, where: str):
    """An optimizer (and its scheduler, or None) for `params`, from an OptimizerConfig."""
    params = list(params)
    if not params:
        return None, None
    classes = _public_classes(torch.optim, torch.optim.Optimizer)
    cls = classes.get(config.name)
    if cls is None:
        raise SpecError(
            f"{where}: unknown optimizer {config.name!r}{did_you_mean(config.name, classes)}; "
            "use a class name from torch.optim (Adam, AdamW, SGD, RMSprop, ...)."
        )
    kwargs = config.arguments()
    _check_kwargs(cls, kwargs, f"{where}: optimizer {config.name}")
    try:
        opt = cls(params, **kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError(f"{where}: optimizer {config.name}({kwargs}): {e}") from None
    sched = None
    if config.scheduler is not None:
        s = config.scheduler
        sched_classes = _public_classes(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler)
        scls = sched_classes.get(s.name)
        if scls is None:
            raise SpecError(
                f"{where}: unknown lr scheduler {s.name!r}{did_you_mean(s.name, sched_classes)}; "
                "use a class name from torch.optim.lr_scheduler (StepLR, CosineAnnealingLR, ...)."
            )
        skw = dict(s.model_extra or {})
        _check_kwargs(scls, skw, f"{where}: scheduler {s.name}", skip=("optimizer",))
        try:
            sched = scls(opt, **skw)
        except (TypeError, ValueError) as e:
            raise SpecError(f"{where}: scheduler {s.name}({skw}): {e}") from None
    return opt, sched


def _check_kwargs(cls, kwargs: dict, what: str, skip: tuple = ("params",)) -> None:
    sig = inspect.signature(cls.__init__)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    allowed = [n for n in sig.parameters if n not in ("self", *skip)]
    for key in kwargs:
        if key not in allowed:
            raise SpecError(f"{what} takes no argument {key!r}{did_you_mean(key, allowed)}; it takes {allowed}.")
