"""Build torch.optim optimizers and lr schedulers from the spec, with errors that name the spec key.

`check_optimizers(spec)` checks every optimizer and scheduler a spec names (classes, argument names, types
and values, by building each on a dummy parameter) before any model is built; `build_optimizer` builds one.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .errors import SpecError, did_you_mean
from .spec import OptimizerConfig, Spec

# torch.optim classes a stage cannot step with, and why
UNSUPPORTED_OPTIMIZERS = {
    "LBFGS": "LBFGS needs a closure that re-evaluates the loss several times per step, and a stage steps once "
    "per batch on the gradient it has",
    "SparseAdam": "SparseAdam takes only sparse gradients, and a stage's parameters get dense ones",
}
# torch.optim.lr_scheduler classes a spec cannot drive, and why
UNSUPPORTED_SCHEDULERS = {
    "ReduceLROnPlateau": "ReduceLROnPlateau steps on a metric (a validation loss), and a stage's scheduler steps "
    "on the stage's clock without one",
    "LambdaLR": "LambdaLR takes a Python function, which a spec cannot hold",
    "MultiplicativeLR": "MultiplicativeLR takes a Python function, which a spec cannot hold",
    "SequentialLR": "SequentialLR takes other scheduler objects, which a spec cannot hold",
    "ChainedScheduler": "ChainedScheduler takes other scheduler objects, which a spec cannot hold",
}
_OPTIMIZER_HINT = "use a class name from torch.optim (Adam, AdamW, SGD, RMSprop, ...)"
_SCHEDULER_HINT = "use a class name from torch.optim.lr_scheduler (StepLR, CosineAnnealingLR, OneCycleLR, ...)"
_DEVICE_ONLY = ("fused", "capturable")  # arguments a CPU dummy parameter cannot check

Where = Callable[..., str]  # the location of a key under the optimizer's mapping: at("betas") -> "spec.yaml:8:5"


def _public_classes(module, base) -> dict[str, type]:
    return {
        n: c
        for n, c in vars(module).items()
        if isinstance(c, type) and issubclass(c, base) and c is not base and not n.startswith("_")
    }


def _optimizer_class(config: OptimizerConfig, at: Where) -> type:
    classes = _public_classes(torch.optim, torch.optim.Optimizer)
    cls = classes.get(config.name)
    if cls is None:
        raise SpecError(
            f"{at('name')}: unknown optimizer {config.name!r}{did_you_mean(config.name, classes)}; {_OPTIMIZER_HINT}."
        )
    if config.name in UNSUPPORTED_OPTIMIZERS:
        raise SpecError(
            f"{at('name')}: optimizer {config.name}: {UNSUPPORTED_OPTIMIZERS[config.name]}; {_OPTIMIZER_HINT}."
        )
    return cls


def _scheduler_class(name: str, at: Where) -> type:
    classes = _public_classes(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler)
    classes["ReduceLROnPlateau"] = torch.optim.lr_scheduler.ReduceLROnPlateau  # not an LRScheduler in older torch
    cls = classes.get(name)
    if cls is None:
        raise SpecError(
            f"{at('scheduler', 'name')}: unknown lr scheduler {name!r}{did_you_mean(name, classes)}; {_SCHEDULER_HINT}."
        )
    if name in UNSUPPORTED_SCHEDULERS:
        raise SpecError(f"{at('scheduler', 'name')}: {UNSUPPORTED_SCHEDULERS[name]}; {_SCHEDULER_HINT}.")
    return cls


def _optimizer_arguments(cls: type, config: OptimizerConfig, at: Where) -> dict[str, Any]:
    kwargs = config.arguments()
    return _check_kwargs(cls, kwargs, f"optimizer {config.name}", at, skip=("params",))


def _scheduler_arguments(cls: type, config: OptimizerConfig, at: Where) -> dict[str, Any]:
    s = config.scheduler
    return _check_kwargs(
        cls, dict(s.model_extra or {}), f"scheduler {s.name}", lambda *k: at("scheduler", *k), skip=("optimizer",)
    )


def build_optimizer(params, config: OptimizerConfig, where: str | Where):
    """An optimizer (and its scheduler, or None) for `params`, from an OptimizerConfig. `where` locates the
    config in the spec: a string, or a function of the keys under it (see `check_optimizers`)."""
    params = list(params)
    if not params:
        return None, None
    at = where if callable(where) else (lambda *keys: where)
    cls = _optimizer_class(config, at)
    kwargs = _optimizer_arguments(cls, config, at)
    try:
        opt = cls(params, **kwargs)
    except Exception as e:  # torch's own checks: "Invalid beta parameter at index 0: 5.0"
        raise SpecError(f"{at()}: optimizer {config.name}({_show(kwargs)}): {e}") from None
    if config.clip_grad_norm is not None:  # every optimizer of the spec clips the same way, before its step
        opt.register_step_pre_hook(_clipper(config.clip_grad_norm))
    sched = None
    if config.scheduler is not None:
        scls = _scheduler_class(config.scheduler.name, at)
        skw = _scheduler_arguments(scls, config, at)
        try:
            sched = scls(opt, **skw)
        except Exception as e:
            raise SpecError(f"{at('scheduler')}: scheduler {config.scheduler.name}({_show(skw)}): {e}") from None
    return opt, sched


def _clipper(max_norm: float):
    def clip(optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    return clip


def check_optimizer(config: OptimizerConfig, where: Where) -> None:
    """Raise SpecError, located, unless `config` builds: the classes exist and can be used here, the arguments
    are known, of the right types and accepted by torch (built on a dummy parameter, the scheduler stepped once)."""
    dry_run = not any(k in (config.model_extra or {}) for k in _DEVICE_ONLY)
    if not dry_run:  # fused or capturable optimizers may need a GPU: check names and types only
        cls = _optimizer_class(config, where)
        _optimizer_arguments(cls, config, where)
        if config.scheduler is not None:
            _scheduler_arguments(_scheduler_class(config.scheduler.name, where), config, where)
        return
    opt, sched = build_optimizer([torch.zeros(1, requires_grad=True)], config, where)
    if sched is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            try:
                sched.step()
            except Exception as e:  # e.g. a step_size that is not a number, found on the first step
                raise SpecError(
                    f"{where('scheduler')}: scheduler {config.scheduler.name}: stepping it failed: "
                    f"{type(e).__name__}: {e}; check its arguments."
                ) from None


def check_optimizers(spec: Spec) -> None:
    """Check every optimizer and lr scheduler in the spec (stages, synthesizers), each error at its own key."""
    for loc, config in spec.configs(OptimizerConfig):
        check_optimizer(config, lambda *keys, loc=loc: spec.where(*loc, *keys))


# --------------------------------------------------------------------------- arguments


def _check_kwargs(cls: type, kwargs: dict, what: str, at: Where, skip: tuple) -> dict[str, Any]:
    """`kwargs` checked against `cls.__init__`: known names, required ones present, values of the types the
    defaults (or simple annotations) have; lists become tuples where the default is a tuple."""
    sig = inspect.signature(cls.__init__)
    params = {
        n: p
        for n, p in sig.parameters.items()
        if n not in ("self", *skip) and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    open_ended = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    out = dict(kwargs)
    for key, value in kwargs.items():
        p = params.get(key)
        if p is None:
            if open_ended:
                continue
            raise SpecError(
                f"{at(key)}: {what} takes no argument {key!r}{did_you_mean(key, params)}; it takes {list(params)}."
            )
        problem, value = _type_problem(value, p)
        if problem:
            raise SpecError(f"{at(key)}: {what}: `{key}: {_json(value)}` {problem}.")
        out[key] = value
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs]
    if missing:
        raise SpecError(
            f"{at()}: {what} needs the argument{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}; add {' and '.join(f'`{n}: ...`' for n in missing)} next to its `name`."
        )
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_problem(value: Any, p: inspect.Parameter) -> tuple[str, Any]:
    """('' or what is wrong, the value to pass): the value must have the type of the parameter's default."""
    default = p.default
    annotation = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
    if isinstance(default, bool) or (default is p.empty and annotation == "bool"):
        return ("" if isinstance(value, bool) else "must be true or false"), value
    if isinstance(default, (int, float)) or (default is p.empty and annotation in ("int", "float")):
        if annotation == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
            return "must be an integer", value
        return ("" if _is_number(value) else "must be a number"), value
    if isinstance(default, tuple) and default:
        numbers = all(_is_number(d) for d in default)
        expected = (
            f"must be a list of {len(default)}{' numbers' if numbers else ''}, like its default {_json(list(default))}"
        )
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            return expected, value
        if numbers and not all(_is_number(v) for v in value):
            return expected, value
        return "", tuple(value)
    if default is None and "bool" in annotation and not any(t in annotation for t in ("int", "float", "str")):
        return ("" if value is None or isinstance(value, bool) else "must be true, false or null"), value
    return "", value


def _json(value: Any) -> str:
    return json.dumps(value, default=str)


def _show(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
