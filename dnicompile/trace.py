"""Trace: torch.fx symbolic trace of the user's model, then shape propagation on example inputs.

Results live in node metadata: `node.meta["tensor_meta"]` (shape, dtype) for tensor values and
`node.meta["type"]` for every value, as torch.fx's ShapeProp writes them; `nn_module_stack` names the
modules a node was computed in.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from .errors import ModelError, SpecError, did_you_mean
from .model_file import user_frame, user_site
from .spec import Spec, TensorSpec


@dataclass(frozen=True)
class Traced:
    """A traced model: its graph module (sharing the model's parameters) and the example inputs used."""

    graph_module: fx.GraphModule
    input_names: tuple[str, ...]
    example_inputs: tuple[torch.Tensor, ...]
    frontend: str


class _Tracer(fx.Tracer):
    """fx.Tracer with user leaf modules, remembering which module it was in when tracing failed."""

    def __init__(self, leaf_modules: list[str]):
        super().__init__()
        self.leaf_modules = set(leaf_modules)
        self.stack: list[str] = []
        self.failed_in: list[str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_modules or type(m).__name__ in self.leaf_modules:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta.setdefault("user_site", user_site(2))  # `file:line: code` in the user's model, for errors
        return node

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.stack)
            raise
        finally:
            self.stack.pop()


def forward_arg_names(model: nn.Module) -> list[str]:
    """Names of forward()'s positional-or-keyword parameters, in order."""
    params = inspect.signature(model.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def make_example(spec: TensorSpec, batch_size: int | None = None) -> torch.Tensor:
    """A random tensor with the spec's shape and dtype (batch dimension replaced when given)."""
    shape = list(spec.shape)
    if batch_size is not None:
        shape[0] = batch_size
    dtype = getattr(torch, spec.dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    return torch.randint(spec.low, max(spec.high, spec.low + 1), shape, dtype=dtype)


def example_inputs_for(model: nn.Module, spec: Spec, example_inputs: Any) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Input names and example tensors, from `example_inputs` (tensor, tuple or dict) or the spec's `inputs`."""
    names = [n for n in forward_arg_names(model) if n not in spec.trace.concrete_args]
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if isinstance(example_inputs, dict):
            unknown = [k for k in example_inputs if k not in names]
            if unknown:
                raise SpecError(
                    f"example input {unknown[0]!r} is not an argument of {type(model).__name__}.forward"
                    f"{did_you_mean(unknown[0], names)}; its arguments are {names}."
                )
            used = [n for n in names if n in example_inputs]
            return used, tuple(example_inputs[n] for n in used)
        example_inputs = tuple(example_inputs)
        return names[: len(example_inputs)], example_inputs
    if not spec.inputs:
        raise SpecError(
            f"{spec.where('cuts')}: no example inputs: add `inputs:` to the spec, e.g.\n"
            f"  inputs:\n    {names[0] if names else 'x'}: {{shape: [64, 784], dtype: float32}}\n"
            "or pass example_inputs= to compile_decoupled()."
        )
    for key in spec.inputs:
        if key not in names:
            raise SpecError(
                f"{spec.where('inputs', key)}: input `{key}` is not an argument of "
                f"{type(model).__name__}.forward{did_you_mean(key, names)}; its arguments are {names}."
            )
    used = [n for n in names if n in spec.inputs]
    missing = [n for n in names[: len(used)] if n not in spec.inputs]
    if missing:
        raise SpecError(
            f"{spec.where('inputs')}: forward() argument `{missing[0]}` comes before "
            f"{used[-1]!r} but has no entry under `inputs:`; add one."
        )
    return used, tuple(make_example(spec.inputs[n]) for n in used)


def trace(model: nn.Module, spec: Spec, example_inputs: Any = None) -> Traced:
    """Symbolically trace `model` and propagate shapes through the graph."""
    names, examples = example_inputs_for(model, spec, example_inputs)
    gm = _symbolic_trace(model, spec)
    propagate_shapes(gm, examples, spec)
    return Traced(graph_module=gm, input_names=tuple(names), example_inputs=examples, frontend="fx")


def _symbolic_trace(model: nn.Module, spec: Spec) -> fx.GraphModule:
    modules = dict(model.named_modules())
    classes = {type(m).__name__ for m in modules.values()}
    for i, leaf in enumerate(spec.trace.leaf_modules):
        if leaf not in modules and leaf not in classes:
            raise SpecError(
                f"{spec.where('trace', 'leaf_modules', i)}: leaf module {leaf!r} is neither a module path nor a "
                f"module class of the model{did_you_mean(leaf, list(modules) + sorted(classes))}."
            )
    arg_names = forward_arg_names(model)
    for key in spec.trace.concrete_args:
        if key not in arg_names:
            raise SpecError(
                f"{spec.where('trace', 'concrete_args', key)}: concrete arg `{key}` is not an argument of "
                f"{type(model).__name__}.forward{did_you_mean(key, arg_names)}; its arguments are {arg_names}."
            )
    tracer = _Tracer(spec.trace.leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=spec.trace.concrete_args or None)
    except Exception as e:
        where = user_frame(e.__traceback__)
        inside = next((p for p in reversed(tracer.failed_in or []) if p), "")
        module = f"module `{inside}` ({type(modules[inside]).__name__})" if inside else type(model).__name__
        hint = _trace_hint(e, inside)
        raise ModelError(
            f"torch.fx could not trace {module}"
            + (f" at {where}" if where else "")
            + f": {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n{hint}"
        ) from None
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    keep_non_persistent(model, gm)
    return gm


def keep_non_persistent(src: nn.Module, dst: fx.GraphModule) -> None:
    """fx.GraphModule registers the buffers its get_attr nodes read as persistent: keep the ones that are
    non-persistent in `src` (e.g. a causal mask) out of `dst.state_dict()`, as they are out of src's."""
    for node in dst.graph.nodes:
        if node.op != "get_attr":
            continue
        parent, _, leaf = node.target.rpartition(".")
        try:
            src_owner, dst_owner = src.get_submodule(parent), dst.get_submodule(parent)
        except AttributeError:
            continue
        if leaf in src_owner._non_persistent_buffers_set and leaf in dst_owner._buffers:
            dst_owner._non_persistent_buffers_set.add(leaf)


def _trace_hint(e: Exception, inside: str) -> str:
    text = str(e)
    leaf = f"'{inside}'" if inside else "'path.to.module'"
    if "control flow" in text or "iteration" in text or "bool" in text.lower():
        return (
            "Hint: the code branches or loops on a traced value. Either keep that module whole with\n"
            f"  trace: {{leaf_modules: [{leaf}]}}\n"
            "(it then becomes one node, and cannot be cut inside), or fix the branch's value with\n"
            "  trace: {concrete_args: {flag: false}}"
        )
    return (
        "Hint: keep the module that does this whole with\n"
        f"  trace: {{leaf_modules: [{leaf}]}}\n"
        "or rewrite the call so that it uses torch operations on its tensor arguments."
    )


def propagate_shapes(gm: fx.GraphModule, examples: tuple[torch.Tensor, ...], spec: Spec | None = None) -> None:
    """Run ShapeProp under fake tensors: shapes for every node, no compute, no buffer updates."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in examples]
    # ShapeProp prints, and the fake tensor mode logs, a traceback before raising: hold stderr back and
    # replay it only on success, so that a failure is reported once, as a ModelError
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    was_disabled, fake_log.disabled = fake_log.disabled, True
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            ShapeProp(gm, fake_mode=mode).propagate(*fake_inputs)
        sys.stderr.write(held.getvalue())
    except Exception as e:
        cause = e.__cause__ or e
        node = _failing_node(gm, str(e))
        where = ""
        if node is not None:
            stack = node.meta.get("nn_module_stack") or {}
            path = next(reversed(stack.values()))[0] if stack else ""
            where = (
                f" at node `{node.name}` ({node.op} {_target_name(node)}{', module `' + path + '`' if path else ''})"
            )
            if node.meta.get("user_site"):
                where += f", called at {node.meta['user_site']}"
        shapes = ", ".join(f"{tuple(t.shape)}" for t in examples if isinstance(t, torch.Tensor))
        inputs_at = f" ({spec.where('inputs', next(iter(spec.inputs)))})" if spec is not None and spec.inputs else ""
        raise ModelError(
            f"running the model on the example inputs (shapes {shapes}) failed{where}: "
            f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}\n"
            f"Hint: check the shapes and dtypes under `inputs:`{inputs_at} in the spec against what forward() expects."
        ) from None
    finally:
        fake_log.disabled = was_disabled


def _failing_node(gm: fx.GraphModule, message: str) -> fx.Node | None:
    for node in gm.graph.nodes:
        if f"node={node.format_node()}" in message or f"node={node.name}" in message:
            return node
    # ShapeProp stores tensor_meta in order; the first node without it is where it stopped
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "output") and "type" not in node.meta:
            return node
    return None


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))
