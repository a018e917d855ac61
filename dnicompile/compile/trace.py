"""Trace: torch.fx symbolic trace of the user's model, then shape propagation on example inputs.

Results live in node metadata: `node.meta["tensor_meta"]` (shape, dtype) for tensor values and
`node.meta["type"]` for every value, as torch.fx's ShapeProp writes them; `nn_module_stack` names the
modules a node was computed in.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import inspect
import io
import linecache
import logging
import operator
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from types import CodeType
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.node import map_aggregate

try:
    from torch.fx._lazy_graph_module import _LazyGraphModule
except ImportError:  # older torch: generate the code at once
    _LazyGraphModule = fx.GraphModule
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from ..errors import ModelError, SpecError, did_you_mean
from ..spec import Spec, TensorSpec
from .model_file import user_frame


@dataclass(frozen=True)
class OutputType:
    """The type and structure of what the model returns, and how to rebuild it from what the graph returns.

    The graph (and so the program's last stage) returns plain containers: tuples, lists, dicts and namedtuples
    of tensors and constants. A dataclass the model returns (a Hugging Face `ModelOutput` too) comes out of
    the graph as the dict of its fields, a dict subclass (OrderedDict) as a dict; `restore` gives back the
    model's own types.
    """

    kind: str = "leaf"  # leaf | tuple | list | namedtuple | dict | dataclass | mapping
    cls: Any = None  # the namedtuple, dataclass or dict subclass
    keys: tuple = ()  # dict keys or dataclass fields, in order
    children: tuple[OutputType, ...] = ()
    plain: bool = field(init=False, default=True)  # True when the graph's output already is the model's

    def __post_init__(self) -> None:
        plain = self.kind not in ("dataclass", "mapping") and all(c.plain for c in self.children)
        object.__setattr__(self, "plain", plain)

    def restore(self, value: Any) -> Any:
        """The model's output from the graph's (plain) output."""
        if self.plain:
            return value
        if self.kind in ("tuple", "list", "namedtuple"):
            items = [c.restore(v) for c, v in zip(self.children, value)]
            if self.kind == "namedtuple":
                return self.cls(*items)
            return tuple(items) if self.kind == "tuple" else items
        items = {k: c.restore(value[k]) for k, c in zip(self.keys, self.children)}
        if self.kind == "dataclass":
            return self.cls(**items)
        if self.kind == "mapping":
            try:
                return self.cls(items)
            except Exception:  # a dict subclass that cannot be built from a dict (defaultdict): a dict
                return items
        return items

    def describe(self) -> str:
        """What the model returns, in words, for error messages."""
        name = getattr(self.cls, "__name__", "")
        if self.kind == "dataclass":
            return f"a {name} with fields {list(self.keys)}"
        if self.kind == "namedtuple":
            return f"a {name} with fields {list(self.cls._fields)}"
        if self.kind in ("dict", "mapping"):
            return f"a {name or 'dict'} with keys {list(self.keys)}"
        if self.kind in ("tuple", "list"):
            return f"a {self.kind} of {len(self.children)}"
        return "a single value"


def to_plain(value: Any) -> tuple[Any, OutputType]:
    """A model's output as plain containers (dataclasses and dict subclasses as dicts), and its OutputType."""
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        pairs = [to_plain(v) for v in value]
        return type(value)(*(p for p, _ in pairs)), OutputType(
            "namedtuple", type(value), (), tuple(t for _, t in pairs)
        )
    if type(value) in (tuple, list):
        pairs = [to_plain(v) for v in value]
        return type(value)(p for p, _ in pairs), OutputType(type(value).__name__, None, (), tuple(t for _, t in pairs))
    if is_dataclass(value) and not isinstance(value, type):
        if isinstance(value, Mapping):  # a ModelOutput: the fields it holds (those that are not None)
            keys = list(value.keys())
        else:
            keys = [f.name for f in fields(value) if f.init]
        pairs = {k: to_plain(value[k] if isinstance(value, Mapping) else getattr(value, k)) for k in keys}
        return {k: p for k, (p, _) in pairs.items()}, OutputType(
            "dataclass", type(value), tuple(keys), tuple(t for _, t in pairs.values())
        )
    if isinstance(value, dict):
        pairs = {k: to_plain(v) for k, v in value.items()}
        kind, cls = ("dict", None) if type(value) is dict else ("mapping", type(value))
        return {k: p for k, (p, _) in pairs.items()}, OutputType(
            kind, cls, tuple(pairs), tuple(t for _, t in pairs.values())
        )
    return value, OutputType()


def plain_output(graph: fx.Graph) -> OutputType:
    """Make the graph return plain containers (see OutputType); return how to rebuild the model's output.

    torch.fx builds a dataclass the model returns with a call of its class, and keeps namedtuples as they are;
    the tracer below builds a `ModelOutput` (a dataclass and a dict) and an OrderedDict with their classes too.
    """
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    built: list[fx.Node] = []

    def plain(a: Any) -> tuple[Any, OutputType]:
        if isinstance(a, fx.Node) and a.op == "call_function" and isinstance(a.target, type):
            cls = a.target
            if is_dataclass(cls) and not a.args:
                if issubclass(cls, Mapping):  # a ModelOutput holds the fields that are not None
                    keys = [k for k, v in a.kwargs.items() if v is not None]
                else:
                    keys = [f.name for f in fields(cls) if f.init and f.name in a.kwargs]
                pairs = {k: plain(a.kwargs[k]) for k in keys}
                built.append(a)
                return {k: p for k, (p, _) in pairs.items()}, OutputType(
                    "dataclass", cls, tuple(keys), tuple(t for _, t in pairs.values())
                )
            if issubclass(cls, dict) and len(a.args) == 1 and type(a.args[0]) is dict and not a.kwargs:
                value, inner = plain(a.args[0])
                built.append(a)
                return value, OutputType("mapping", cls, inner.keys, inner.children)
        if isinstance(a, tuple) and hasattr(a, "_fields"):
            pairs = [plain(v) for v in a]
            return type(a)(*(p for p, _ in pairs)), OutputType("namedtuple", type(a), (), tuple(t for _, t in pairs))
        if isinstance(a, (tuple, list)):
            pairs = [plain(v) for v in a]
            kind = "tuple" if isinstance(a, tuple) else "list"
            return type(a)(p for p, _ in pairs), OutputType(kind, None, (), tuple(t for _, t in pairs))
        if isinstance(a, dict):
            pairs = {k: plain(v) for k, v in a.items()}
            return {k: p for k, (p, _) in pairs.items()}, OutputType(
                "dict", None, tuple(pairs), tuple(t for _, t in pairs.values())
            )
        return a, OutputType()

    value, out_type = plain(output.args[0])
    if built:
        output.args = (value,)
        for node in reversed(built):
            if not node.users:
                graph.erase_node(node)
    return out_type


@dataclass(frozen=True)
class Traced:
    """A traced model: its graph module (sharing the model's parameters) and the example inputs used."""

    graph_module: fx.GraphModule
    input_names: tuple[str, ...]
    example_inputs: tuple[torch.Tensor, ...]
    frontend: str  # "fx" or "export"
    frontend_reason: str = ""  # why that front end, for the stage table
    output_type: OutputType = OutputType()  # how the program rebuilds the model's output type


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
        node.meta.setdefault("user_site", _user_site())  # `file:line: code` in the user's model, for errors
        return node

    def create_arg(self, a: Any) -> Any:
        # torch.fx makes a plain dict of any dict: keep the class of a ModelOutput (a dataclass that is also a
        # dict) and of an OrderedDict, by building them with a call of their class, as it does for a dataclass
        if isinstance(a, dict) and type(a) is not dict:
            if is_dataclass(a):
                kwargs = {f.name: self.create_arg(getattr(a, f.name)) for f in fields(a) if f.init}
                return self.create_node("call_function", type(a), (), kwargs)
            if isinstance(a, collections.OrderedDict):
                return self.create_node("call_function", type(a), (super().create_arg(dict(a)),), {})
        return super().create_arg(a)

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


_PKG_DIR = str(Path(__file__).resolve().parent)
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_PY_LIB_DIR = str(Path(inspect.__file__).resolve().parent)
_IS_USER_CODE: dict[CodeType, bool] = {}


def _user_site() -> str:
    """model_file.user_site, with the is-it-user-code test cached per code object: the tracer asks for every
    node, and walks a dozen torch frames each time."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        mine = _IS_USER_CODE.get(code)
        if mine is None:
            mine = _IS_USER_CODE[code] = bool(user_site_of(code.co_filename))
        if mine:
            line = frame.f_lineno
            text = linecache.getline(code.co_filename, line).strip()
            return f"{code.co_filename}:{line}" + (f": `{text}`" if text else "")
        frame = frame.f_back
    return ""


def user_site_of(filename: str) -> bool:
    """Whether a file is the user's code: not torch, not dnicompile, not the standard library."""
    stdlib = filename.startswith(_PY_LIB_DIR) and "-packages" not in filename
    return not filename.startswith(("<", _PKG_DIR, _TORCH_DIR)) and not stdlib


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


def concrete_args(model: nn.Module, spec: Spec) -> dict[str, Any]:
    """forward()'s arguments fixed while tracing: the spec's `concrete_args`, and `use_cache=False` where forward()
    takes a `use_cache` flag the spec does not set (Hugging Face models): a training program keeps no key/value
    cache, and a cache object (transformers' DynamicCache) is nothing torch.export can return."""
    constants = dict(spec.trace.concrete_args)
    if "use_cache" in forward_arg_names(model) and "use_cache" not in constants and "use_cache" not in spec.inputs:
        constants["use_cache"] = False
    return constants


def example_inputs_for(model: nn.Module, spec: Spec, example_inputs: Any) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Input names and example tensors, from `example_inputs` (tensor, tuple or dict) or the spec's `inputs`."""
    names = [n for n in forward_arg_names(model) if n not in concrete_args(model, spec)]
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
    # an argument the inputs skip takes its default (`input_ids, attention_mask` skip `past_key_values`)
    defaults = _defaults(model)
    last = names.index(used[-1]) if used else -1
    missing = [n for n in names[:last] if n not in spec.inputs and n not in defaults]
    if missing:
        raise SpecError(
            f"{spec.where('inputs')}: forward() argument `{missing[0]}` comes before "
            f"{used[-1]!r}, has no default value and no entry under `inputs:`; add one."
        )
    return used, tuple(make_example(spec.inputs[n]) for n in used)


def _defaults(model: nn.Module) -> dict[str, Any]:
    """forward()'s arguments that have a default value, with it."""
    params = inspect.signature(model.forward).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector: a graph of n nodes is millions of young objects, and the
    collections they trigger make a pass over a large graph cost a third more. Nothing a pass makes is
    garbage until it returns."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def trace(model: nn.Module, spec: Spec, example_inputs: Any = None) -> Traced:
    """Trace `model` with the spec's front end (fx, export, or auto: fx, else export) and propagate shapes."""
    with gc_paused():
        return _trace(model, spec, example_inputs)


def _trace(model: nn.Module, spec: Spec, example_inputs: Any) -> Traced:
    names, examples = example_inputs_for(model, spec, example_inputs)
    frontend = spec.trace.frontend
    if frontend == "export":
        gm, output_type = _export(model, names, examples, spec)
        reason = "as the spec asks"
    else:
        try:
            gm = _symbolic_trace(model, spec, names)
            output_type = plain_output(gm.graph)
            gm.recompile()
            reason = "as the spec asks" if frontend == "fx" else "auto: torch.fx traced the model"
        except _FxTraceError as fx_error:
            if frontend == "fx":
                raise ModelError(str(fx_error)) from None
            try:
                gm, output_type = _export(model, names, examples, spec)
            except _ExportError as export_error:
                raise ModelError(_both_failed(model, spec, fx_error, export_error)) from None
            reason = f"auto: torch.fx failed{fx_error.short}, torch.export worked"
            frontend = "export"
    if frontend == "auto":
        frontend = "fx"
    if frontend == "export":
        from .export import fixed_batch

        reason += fixed_batch(gm, examples)
    ran_real = propagate_shapes(gm, examples, spec)
    if frontend == "export" and ran_real:  # cheap enough to run twice more: check eval mode on the examples
        from .export import check_eval_mode

        check_eval_mode(model, gm, names, examples, concrete_args(model, spec))
    return Traced(gm, tuple(names), examples, frontend, reason, output_type)


class _FxTraceError(Exception):
    """torch.fx could not trace the model; `short` says where, in a few words, for the stage table."""

    def __init__(self, message: str, short: str, module: str):
        super().__init__(message)
        self.short = short
        self.module = module  # path of the innermost module it failed in ('' for the model itself)


class _ExportError(Exception):
    """torch.export could not export the model."""


def _export(model: nn.Module, names: list[str], examples: tuple, spec: Spec) -> tuple[fx.GraphModule, OutputType]:
    from .export import export_failure, export_model, to_graph_module

    constants = concrete_args(model, spec)
    try:
        with _plain_forward(model) as seen:
            ep = export_model(model, names, examples, constants)
    except Exception as e:
        reason = export_failure(e)
        if spec.trace.frontend == "export":
            raise ModelError(
                f"torch.export could not export {type(model).__name__}: {reason}\n"
                "Hint: torch.export needs forward() to run on fake tensors of the example inputs' shapes: no "
                "branch on tensor values (`if x.sum() > 0`), no .item() or .tolist(), no numpy. Rewrite that part with "
                "torch operations (torch.where, torch.cond), or try `trace: {frontend: fx}`."
            ) from None
        raise _ExportError(reason) from None
    return to_graph_module(model, ep), seen.get("output_type", OutputType())


@contextlib.contextmanager
def _plain_forward(model: nn.Module):
    """While exporting, the model's forward returns plain containers (torch.export refuses a dataclass it does not
    know); the OutputType of what it really returns lands in the dict this yields, as `output_type`."""
    import functools

    seen: dict[str, OutputType] = {}
    had = "forward" in model.__dict__
    own = model.__dict__.get("forward")
    forward = model.forward

    @functools.wraps(forward)
    def plain_forward(*args: Any, **kwargs: Any) -> Any:
        out, seen["output_type"] = to_plain(forward(*args, **kwargs))
        return out

    model.forward = plain_forward
    try:
        yield seen
    finally:
        if had:
            model.forward = own
        else:
            del model.forward


def _both_failed(model: nn.Module, spec: Spec, fx_error: _FxTraceError, export_error: _ExportError) -> str:
    fx_text = "\n    ".join(str(fx_error).splitlines())
    leaf = f"'{fx_error.module}'" if fx_error.module else "'path.to.module'"
    return (
        f"neither front end could trace {type(model).__name__}.\n"
        f"  torch.fx: {fx_text}\n"
        f"  torch.export: {export_error}\n"
        "What to do: make the code at that line independent of tensor values: torch.where or torch.cond instead of "
        "`if` on a tensor, no .item() or .tolist(), no numpy on tensors. Or keep the module that does it whole, as "
        f"one node that cannot be cut inside: `trace: {{frontend: fx, leaf_modules: [{leaf}]}}`."
    )


def _symbolic_trace(model: nn.Module, spec: Spec, inputs: list[str]) -> fx.GraphModule:
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
    # the arguments that are not inputs of the program take their default values (plain constants: None, a flag)
    simple = (type(None), bool, int, float, str)
    defaults = {n: v for n, v in _defaults(model).items() if n not in inputs and isinstance(v, simple)}
    concrete = defaults | concrete_args(model, spec)
    tracer = _Tracer(spec.trace.leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:
        if isinstance(e, ValueError) and "co_varnames" in str(e):
            code = getattr(type(model).forward, "__code__", None)
            wrapper = getattr(code, "co_qualname", getattr(code, "co_name", "?")).split(".<locals>")[0]
            raise _FxTraceError(
                f"torch.fx could not trace {type(model).__name__}: its forward() is wrapped by a decorator "
                f"(`{wrapper}`) and takes **kwargs, and torch.fx's tracer cannot rebuild the arguments of such a "
                f"function ({type(e).__name__}: {e}). Hugging Face models are like this.\n"
                "Hint: use `trace: {frontend: export}` (`auto` falls back to it).",
                " (a decorated forward() with **kwargs)",
                "",
            ) from None
        where = user_frame(e.__traceback__)
        inside = next((p for p in reversed(tracer.failed_in or []) if p), "")
        module = f"module `{inside}` ({type(modules[inside]).__name__})" if inside else type(model).__name__
        hint = _trace_hint(e, inside)
        first = str(e).splitlines()[0] if str(e) else ""
        raise _FxTraceError(
            f"torch.fx could not trace {module}"
            + (f" at {where}" if where else "")
            + f": {type(e).__name__}: {first}\n{hint}",
            f" at {_short_path(where.split(' in ')[0])}" if where else f" ({type(e).__name__})",
            inside,
        ) from None
    _drop_concrete_inputs(graph, arg_names, concrete)
    name = type(model).__name__
    # the whole model's Python code is never run (the stages are), so generate it only if someone asks
    gm = _LazyGraphModule(tracer.root, graph, name)
    keep_non_persistent(model, gm)
    return gm


def _drop_concrete_inputs(graph: fx.Graph, arg_names: list[str], concrete: dict[str, Any]) -> None:
    """torch.fx keeps an input for each concrete argument, with a check that it has its fixed value: put the
    value in its place and drop the input, so that the graph takes the program's inputs and nothing else."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(arg_names):  # *args or **kwargs in forward(): leave the graph as it is
        return
    for ph, name in zip(placeholders, arg_names):
        if name not in concrete:
            continue
        for user in list(ph.users):
            if user.target is fx._symbolic_trace._assert_is_none:
                graph.erase_node(user)
            elif user.target is operator.eq and all(u.target is torch._assert for u in user.users):
                for check in list(user.users):
                    graph.erase_node(check)
                graph.erase_node(user)
        value = concrete[name]
        for user in list(ph.users):
            user.args = fx.node.map_arg(user.args, lambda n, ph=ph, value=value: value if n is ph else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n, ph=ph, value=value: value if n is ph else n)
        if not ph.users:
            graph.erase_node(ph)


def _short_path(site: str) -> str:
    """`file:line` with the file relative to the working directory when it is below it."""
    path, sep, line = site.rpartition(":")
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return site
    return f"{rel}{sep}{line}" if not rel.startswith("..") else site


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


class ShapeProp(fx.Interpreter):
    """Runs the graph on the example inputs and records, for every node, `node.meta["type"]` and, for tensor
    values, `node.meta["tensor_meta"]` (torch.fx's TensorMetadata: shape, dtype, stride, ...).

    Real tensors under no_grad while that is cheap: a few microseconds an op, where fake tensors cost a few
    hundred. Once the real run has taken `budget_s` seconds at more than `fake_cost_s` per node (about what a
    node costs on fake tensors), or a value would take more than `max_bytes`, the rest of the graph runs on
    fake tensors (shapes only, no compute, no memory). Buffers the run mutates (batch-norm statistics) and
    the random number generators are restored afterwards, so compiling never changes the model.
    """

    def __init__(self, gm: fx.GraphModule, budget_s: float = 2.0, fake_cost_s: float = 1e-3, max_bytes: int = 1 << 28):
        super().__init__(gm)
        self.extra_traceback = False  # keep the original error message; the failing node is in `failed`
        self.budget_s, self.fake_cost_s, self.max_bytes = budget_s, fake_cost_s, max_bytes
        self.fake_mode: FakeTensorMode | None = None
        self.failed: fx.Node | None = None
        self._start, self._nodes = 0.0, 0

    def propagate(self, *args: Any) -> Any:
        tensors = [*self.module.parameters(), *self.module.buffers(), *(a for a in args if isinstance(a, torch.Tensor))]
        if any(t.is_meta or isinstance(t, FakeTensor) for t in tensors):
            self._go_fake()
        buffers = [(b, b.clone()) for b in self.module.buffers() if not isinstance(b, FakeTensor) and not b.is_meta]
        devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
        self._start, self._nodes = time.perf_counter(), 0
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                return self.run(*args)
        finally:
            for b, saved in buffers:
                b.copy_(saved)

    def run_node(self, n: fx.Node) -> Any:
        try:
            with self.fake_mode if self.fake_mode is not None else contextlib.nullcontext():
                result = super().run_node(n)
        except Exception:
            self.failed = n
            raise
        found = False

        def meta(v: Any) -> Any:
            nonlocal found
            if isinstance(v, torch.Tensor):
                found = True
                return _tensor_meta(v)
            return v

        tensor_meta = map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = tensor_meta
        n.meta["type"] = type(result)
        if self.fake_mode is None:
            self._nodes += 1
            spent = time.perf_counter() - self._start
            if (spent > self.budget_s and spent > self.fake_cost_s * self._nodes) or _nbytes(result) > self.max_bytes:
                self._go_fake()
                result = self._to_fake(result)
        return result

    def _go_fake(self) -> None:
        """Go on with fake tensors: the values computed so far become fake, parameters are converted on use."""
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.env = {k: self._to_fake(v) for k, v in getattr(self, "env", {}).items()}

    def _to_fake(self, value: Any) -> Any:
        def convert(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor):
                return self.fake_mode.from_tensor(v)
            return v

        return map_aggregate(value, convert)


def _tensor_meta(t: torch.Tensor) -> TensorMetadata:
    """torch.fx's TensorMetadata of a dense tensor, with its memory format found by the C++ contiguity checks
    (the generic _extract_tensor_metadata takes most of the time of shape propagation)."""
    if t.layout != torch.strided or t.is_quantized:
        return _extract_tensor_metadata(t)
    if t.is_contiguous():
        memory_format = torch.contiguous_format
    elif t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        memory_format = torch.channels_last
    elif t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        memory_format = torch.channels_last_3d
    else:
        memory_format = None
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), memory_format, False, {})


def _nbytes(value: Any) -> int:
    total = 0

    def add(v: Any) -> Any:
        nonlocal total
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        return v

    map_aggregate(value, add)
    return total


def propagate_shapes(gm: fx.GraphModule, examples: tuple[torch.Tensor, ...], spec: Spec | None = None) -> bool:
    """Record shapes and types of every node (see ShapeProp); errors name the node and the user's line.

    Returns True when the whole graph ran on real tensors (it is cheap to run), False when it went on fake ones.
    """
    # torch prints, and the fake tensor mode logs, a traceback before raising: hold stderr back and replay
    # it only on success, so that a failure is reported once, as a ModelError
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    was_disabled, fake_log.disabled = fake_log.disabled, True
    held = io.StringIO()
    prop = ShapeProp(gm)
    try:
        with contextlib.redirect_stderr(held):
            prop.propagate(*examples)
        sys.stderr.write(held.getvalue())
        return prop.fake_mode is None
    except Exception as e:
        node = prop.failed
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
        dtypes = ", ".join(str(t.dtype).removeprefix("torch.") for t in examples if isinstance(t, torch.Tensor))
        inputs_at = f" ({spec.where('inputs', next(iter(spec.inputs)))})" if spec is not None and spec.inputs else ""
        raise ModelError(
            f"running the model on the example inputs (shapes {shapes}; dtypes {dtypes}) failed{where}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            f"Hint: check the shapes and dtypes under `inputs:`{inputs_at} in the spec against what forward() expects."
        ) from None
    finally:
        fake_log.disabled = was_disabled


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


# ----------------------------------------------------------------------------- symbolic sizes


@dataclass
class SymbolicValues:
    """The value of every node with symbolic sizes: tensors as fake tensors whose dimensions are sympy
    expressions over the inputs' dimensions, sizes as SymInts. `failed` says why a node has none (its value
    depends on tensor data, or an input it reads has none)."""

    values: dict[fx.Node, Any]
    failed: dict[fx.Node, str]
    inputs: dict[Any, str]  # symbol -> `dimension d of input x`, for messages


def symbolic_values(gm: fx.GraphModule) -> SymbolicValues:
    """The graph's values with every dimension of every input symbolic, so that a size read at one tensor can
    be found again in another.

    An exported graph has them in `node.meta["val"]` (the batch dimension dynamic). For an fx graph, run it on
    fake tensors with a symbol per input dimension (no duck sizing: a batch of 16 and 16 features are two
    symbols); sizes the model fixes (a Linear's in_features) become numbers.
    """
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if placeholders and all("val" in n.meta for n in placeholders):
        values = {n: n.meta["val"] for n in nodes if "val" in n.meta}
        return SymbolicValues(values, {}, _input_symbols(placeholders, values))
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False), allow_non_fake_inputs=True)
    tensors = [*gm.parameters(), *gm.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    interp = fx.Interpreter(gm)
    interp.extra_traceback = False
    values: dict[fx.Node, Any] = {}
    failed: dict[fx.Node, str] = {}
    buffers = [(b, b.clone()) for b in gm.buffers() if not isinstance(b, FakeTensor) and not b.is_meta]
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    was_disabled, fake_log.disabled = fake_log.disabled, True
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), contextlib.redirect_stderr(io.StringIO()):
            for node in nodes:
                if node.op == "placeholder":
                    meta = node.meta.get("tensor_meta")
                    if meta is None or not hasattr(meta, "shape"):
                        failed[node] = "it is not a tensor input"
                        continue
                    dims = [DimDynamic.DYNAMIC] * len(meta.shape)
                    ex = torch.empty(meta.shape, dtype=meta.dtype, device="meta")
                    fake = mode.from_tensor(ex, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))
                    with mode:
                        values[node] = fake.to(device)
                    continue
                missing = next((a for a in node.all_input_nodes if a not in values), None)
                if missing is not None:
                    failed[node] = failed.get(missing, "") or f"node `{missing.name}` has no value"
                    continue
                interp.env = {a: values[a] for a in node.all_input_nodes}
                try:
                    with mode:
                        values[node] = interp.run_node(node)
                except Exception as e:
                    text = str(e).splitlines()[0] if str(e) else type(e).__name__
                    data = "data-dependent" in str(e) or "DataDependent" in type(e).__name__
                    failed[node] = (
                        f"`{node.name}` depends on the values in a tensor, not only on shapes"
                        if data
                        else f"`{node.name}` could not run on symbolic shapes ({type(e).__name__}: {text})"
                    )
    finally:
        fake_log.disabled = was_disabled
        for b, saved in buffers:
            b.copy_(saved)
    return SymbolicValues(values, failed, _input_symbols(placeholders, values))


def _input_symbols(placeholders: list[fx.Node], values: dict) -> dict[Any, str]:
    out = {}
    for ph in placeholders:
        val = values.get(ph)
        if isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt):
                    out.setdefault(size.node.expr, f"dimension {d} of input `{ph.name}`")
    return out
