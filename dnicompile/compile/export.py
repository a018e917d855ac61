"""The torch.export front end: an exported program made into a graph module over the model's own tensors.

torch.export handles what symbolic tracing cannot (shape asserts, branches on optional arguments or on input
sizes, code fx cannot follow) and still gives an fx graph, with the module path of every node in
`nn_module_stack`. Its graph takes the parameters and buffers as extra inputs; `to_graph_module` turns those
inputs back into `get_attr` nodes on the model's very tensors, so the rest of the compiler (partition, emit,
runtimes) sees the same kind of graph the fx front end gives:

- parameters and buffers are the model's own (no copies), under their own names;
- buffer updates (batch-norm running statistics) happen in place, exactly as in eager mode;
- the graph is exported in train mode, and the ops whose behaviour depends on the mode (dropout, batch norm,
  attention dropout, the batch-norm step counter) read the stage's `self.training` instead of a constant, so
  `program.eval()` works too; `check_eval_mode` verifies that on the example inputs;
- the batch dimension stays dynamic, and every use of a symbolic size reads it from a tensor its own node
  already reads, so that no integer has to cross a cut.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import operator
import sys
import traceback
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import ModelError

aten = torch.ops.aten

# op -> index of its train/eval flag argument (dropout's `train`, batch norm's `training`)
MODE_FLAG = {
    aten.dropout.default: 2,
    aten.feature_dropout.default: 2,
    aten.alpha_dropout.default: 2,
    aten.feature_alpha_dropout.default: 2,
    aten.native_dropout.default: 2,
    aten.batch_norm.default: 5,
    aten.rrelu.default: 3,
}


def when_training(op, training: bool, tensor: torch.Tensor, *args: Any) -> torch.Tensor:
    """`op(tensor, *args)` in train mode, `tensor` unchanged in eval mode (e.g. batch norm's step counter)."""
    return op(tensor, *args) if training else tensor


def dropout_p(p: float, training: bool) -> float:
    """An attention dropout probability in train mode, 0 in eval mode."""
    return p if training else 0.0


def call_arguments(model: nn.Module, input_names: list[str], examples: tuple, constants: dict) -> tuple[tuple, dict]:
    """How to call forward() with the example inputs: positionally up to the first argument the inputs skip
    (it takes its default), the rest and keyword-only arguments by name, in forward()'s order."""
    params = inspect.signature(model.forward).parameters
    given = dict(zip(input_names, examples))
    args, kwargs = [], {}
    for i, (name, p) in enumerate(params.items()):
        if name not in given:
            continue
        if not kwargs and p.kind != p.KEYWORD_ONLY and len(args) == i:
            args.append(given[name])
        else:
            kwargs[name] = given[name]
    return tuple(args), kwargs | dict(constants)


def export_model(model: nn.Module, input_names: list[str], examples: tuple, constants: dict) -> Any:
    """torch.export.export of `model` in train mode, the batch dimension of every input dynamic."""
    dynamic = {name: ({0: Dim.AUTO} if t.dim() >= 1 else None) for name, t in zip(input_names, examples)}
    dynamic.update({name: None for name in constants})
    args, kwargs = call_arguments(model, input_names, examples, constants)
    was_training = model.training
    model.train()
    # torch logs warnings (and sometimes tracebacks) on its way to an error: hold them back, and show them only
    # if the export works; a failure is reported once, as our own error
    held = io.StringIO()
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(held):
            ep = torch.export.export(model, args, kwargs=kwargs or None, dynamic_shapes=dynamic)
    finally:
        logging.disable(disabled)
        model.train(was_training)
    sys.stderr.write(held.getvalue())
    return ep


def fixed_batch(gm: fx.GraphModule, examples: tuple) -> str:
    """'' where the exported graph kept the batch dimension dynamic; otherwise a note for the stage table saying
    that torch.export fixed it at the example's batch size, and why it may have.

    Every input's dimension 0 is exported as `Dim.AUTO`, which torch.export turns into a constant, without a word,
    where the code needs a Python int there (`len(x)`, `range(x.size(0))`) or where the example has a batch of 1;
    the program then runs on batches of that size only."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]  # the inputs, in order
    batched = [t.shape[0] for t in examples if isinstance(t, torch.Tensor) and t.dim()]
    if not batched or any(isinstance(v, torch.Tensor) and v.dim() and _dynamic(v.shape[0]) for v in vals):
        return ""
    size = batched[0]
    if size == 1:
        return (
            "; the batch is fixed at 1: torch.export keeps no dimension of size 1 dynamic (give the inputs a batch "
            "of 2 or more)"
        )
    return (
        f"; the batch is fixed at {size}: torch.export made it a constant, as forward() reads the batch size as a "
        "Python int (e.g. `len(x)`, `range(x.size(0))`), so the program takes batches of that size only"
    )


def _dynamic(size: Any) -> bool:
    """A symbolic size that its shape environment has not replaced with a number."""
    if not isinstance(size, torch.SymInt):
        return False
    env = getattr(size.node, "shape_env", None)
    expr = env.replace(size.node.expr) if env is not None else size.node.expr
    return not expr.is_number


def to_graph_module(model: nn.Module, ep: Any) -> fx.GraphModule:
    """The exported program as a GraphModule whose get_attr nodes read the model's own parameters and buffers.

    The graph's inputs are the model's tensor inputs, in order; it returns what the model returns.
    """
    graph = fx.Graph()  # a copy with no owning module: its get_attr nodes will point into the model
    graph.output(graph.graph_copy(ep.graph_module.graph, {}))
    sig = ep.graph_signature
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    attrs: dict[str, Any] = {}
    constants = 0
    for spec in sig.input_specs:
        node = placeholders[spec.arg.name]
        if spec.kind == InputKind.USER_INPUT:
            val = node.meta.get("val")
            if val is None or isinstance(val, (bool, int, float, str)):  # a concrete arg: torch.export fixed it
                for user in list(node.users):
                    user.args = fx.node.map_arg(user.args, lambda n, node=node, val=val: val if n is node else n)
                    user.kwargs = fx.node.map_arg(user.kwargs, lambda n, node=node, val=val: val if n is node else n)
                graph.erase_node(node)
                continue
            if not isinstance(val, torch.Tensor):
                raise ModelError(
                    f"input `{node.name}` of the exported graph is not a tensor; give it in concrete_args."
                )
            continue
        if spec.kind == InputKind.PARAMETER:
            target, value = spec.target, model.get_parameter(spec.target)
        elif spec.kind == InputKind.BUFFER:
            target, value = spec.target, model.get_buffer(spec.target)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            target, value = f"_export_constant_{constants}", ep.constants[spec.target]
            constants += 1
        else:
            raise ModelError(
                f"torch.export lifted a {spec.kind.name.lower()} input `{spec.arg.name}`, which dnicompile does "
                "not support; keep such objects out of forward()."
            )
        attrs[target] = value
        with graph.inserting_after(last_input):
            attr = graph.get_attr(target)
        last_input = attr  # the next one goes after it: the reads come in the model's order
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)

    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    returned = list(output.args[0])
    user_outputs = []
    for spec, value in zip(sig.output_specs, returned):
        if spec.kind == OutputKind.USER_OUTPUT:
            user_outputs.append(value)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            _copy_into(graph, value, spec.target, attrs, model)
        else:
            raise ModelError(
                f"the exported graph has a {spec.kind.name.lower()} output (`{spec.arg.name}`), which dnicompile "
                "does not support: forward() must not modify its inputs in place."
            )
    output.args = (_namedtuple_calls(graph, output, pytree.tree_unflatten(user_outputs, ep.call_spec.out_spec)),)

    if _follow_mode(graph):
        attrs["training"] = True
    _localize_sizes(graph)
    for node in graph.nodes:
        site = _user_site(node.meta.get("stack_trace"))
        if site:
            node.meta["user_site"] = site
    graph.lint()
    gm = fx.GraphModule(attrs, graph, type(model).__name__)
    for name in attrs:  # constants and non-persistent buffers stay out of state_dict
        parent, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(parent)
        if leaf in owner._buffers and (name.startswith("_export_constant_") or _non_persistent(model, name)):
            owner._non_persistent_buffers_set.add(leaf)
    return gm


def _namedtuple_calls(graph: fx.Graph, output: fx.Node, value: Any) -> Any:
    """The output structure with each namedtuple built by a call of its class (as torch.fx does for one inside
    a container): the generated code of a graph cannot spell one inside a dict or another namedtuple."""
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        items = tuple(_namedtuple_calls(graph, output, v) for v in value)
        with graph.inserting_before(output):
            return graph.call_function(type(value), items)
    if isinstance(value, (tuple, list)):
        return type(value)(_namedtuple_calls(graph, output, v) for v in value)
    if isinstance(value, dict):
        return {k: _namedtuple_calls(graph, output, v) for k, v in value.items()}
    return value


def _non_persistent(model: nn.Module, name: str) -> bool:
    parent, _, leaf = name.rpartition(".")
    try:
        return leaf in model.get_submodule(parent)._non_persistent_buffers_set
    except AttributeError:
        return False


def _copy_into(graph: fx.Graph, value: fx.Node, target: str, attrs: dict, model: nn.Module) -> None:
    """A buffer update the exported graph returns: written into the buffer in place, where it is computed."""
    attrs.setdefault(target, model.get_buffer(target))
    with graph.inserting_after(value):
        buf = graph.get_attr(target)
    with graph.inserting_after(buf):
        detached = graph.call_function(aten.detach.default, (value,))
    with graph.inserting_after(detached):
        copy = graph.call_function(aten.copy_.default, (buf, detached))
    for n in (buf, detached, copy):
        n.meta["nn_module_stack"] = value.meta.get("nn_module_stack", {})


def _follow_mode(graph: fx.Graph) -> bool:
    """Make the ops that behave differently in train and eval mode read the stage's `self.training`; True if
    any does."""
    training: fx.Node | None = None

    def flag() -> fx.Node:
        nonlocal training
        if training is None:
            first = next(n for n in graph.nodes if n.op not in ("placeholder",))
            with graph.inserting_before(first):
                training = graph.get_attr("training")
        return training

    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in MODE_FLAG:
            i = MODE_FLAG[node.target]
            if node.target is aten.batch_norm.default and node.args[3] is None:
                continue  # no running statistics: batch statistics in both modes, as eager batch norm does
            if len(node.args) > i and node.args[i] is True:
                node.update_arg(i, flag())
        elif node.target is aten.scaled_dot_product_attention.default:
            p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
            if isinstance(p, float) and p > 0:
                with graph.inserting_before(node):
                    mode_p = graph.call_function(dropout_p, (p, flag()))
                if len(node.args) > 4:
                    node.update_arg(4, mode_p)
                else:
                    node.update_kwarg("dropout_p", mode_p)
        elif node.target is aten.add_.Tensor and _is_batch_norm_counter(node):
            # BatchNorm counts its training steps (`if self.training: num_batches_tracked.add_(1)`)
            node.target = when_training
            node.args = (aten.add_.Tensor, flag(), *node.args)
    return training is not None


def _is_batch_norm_counter(node: fx.Node) -> bool:
    buf = node.args[0]
    stack = node.meta.get("nn_module_stack") or {}
    inner = next(reversed(stack.values()), ("", ""))[1] if stack else ""
    return (
        isinstance(buf, fx.Node)
        and buf.op == "get_attr"
        and buf.target.endswith("num_batches_tracked")
        and "BatchNorm" in str(inner)
    )


def check_eval_mode(
    model: nn.Module, gm: fx.GraphModule, input_names: list[str], examples: tuple, constants: dict
) -> None:
    """The graph was exported in train mode: check that in eval mode it computes what `model.eval()` does, and
    leaves the buffers as it does, on the example inputs. Raise ModelError if not."""
    buffers = list(model.buffers())
    saved = [b.clone() for b in buffers]
    was_training = model.training

    def run(fn):
        try:
            out = fn()
            return out, [b.clone() for b in buffers]
        finally:
            for b, v in zip(buffers, saved):
                b.copy_(v)

    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.eval()
            gm.eval()
            args, kwargs = call_arguments(model, input_names, examples, constants)
            expected, expected_buffers = run(lambda: model(*args, **kwargs))
            got, got_buffers = run(lambda: gm(*examples))
    finally:
        model.train(was_training)
        gm.train(was_training)
    names = [n for n, _ in model.named_buffers()]
    problems = []
    leaves_e, leaves_g = _tensors(expected), _tensors(got)
    if len(leaves_e) != len(leaves_g):
        problems.append(f"it returns {len(leaves_g)} values where the model returns {len(leaves_e)}")
    for i, (e, g) in enumerate(zip(leaves_e, leaves_g)):
        if isinstance(e, torch.Tensor) and not (e.shape == g.shape and torch.allclose(e, g, rtol=1e-4, atol=1e-5)):
            problems.append(f"output {i} differs")
    for name, e, g in zip(names, expected_buffers, got_buffers):
        if not torch.equal(e, g):
            problems.append(f"buffer `{name}` is updated differently")
    if problems:
        raise ModelError(
            f"torch.export traced {type(model).__name__} in train mode, and in eval mode the graph does not compute "
            f"what model.eval() computes on the example inputs: {'; '.join(problems[:3])}. forward() (or a module "
            "in it) branches on `self.training` in a way other than dropout and batch norm (e.g. drop-path, or a "
            "custom buffer update), and torch.export fixed that branch at train mode. Write the branch with "
            "nn.Dropout / F.dropout(x, p, training=self.training), or use `trace: {frontend: fx}` if fx can "
            "trace the model."
        )


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in an output, in order: in containers, dataclasses (a ModelOutput too) and namedtuples."""
    if isinstance(value, torch.Tensor):
        return [value]
    if is_dataclass(value) and not isinstance(value, type):
        if isinstance(value, Mapping):
            items = list(value.values())
        else:
            items = [getattr(value, f.name) for f in fields(value) if f.init]
    elif isinstance(value, Mapping):
        items = list(value.values())
    elif isinstance(value, (tuple, list)):
        items = list(value)
    else:
        return []
    return [t for v in items for t in _tensors(v)]


# ----------------------------------------------------------------------------- symbolic sizes


def _sym(node: Any) -> Any:
    """The sympy expression of an int-valued node with a symbolic value, else None."""
    if isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.SymInt):
        return node.meta["val"].node.expr
    return None


_SYM_OPS = (operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod, operator.neg)


def _localize_sizes(graph: fx.Graph) -> None:
    """Recompute every symbolic size (the dynamic batch) from a tensor its user reads anyway.

    torch.export reads `x.size(0)` once, at the first input, and every later view reuses that integer; cut
    into stages, the integer would have to cross every cut. Read from the user's own tensor argument instead,
    it lives where its user does.
    """
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is aten.sym_size.int:
            continue
        syms = [a for a in node.all_input_nodes if _sym(a) is not None]
        if not syms:
            continue
        tensors = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        local = {}
        for s in syms:
            found = _size_from(graph, s, tensors, node)
            if found is not None:
                local[s] = found
        if local:
            node.args = fx.node.map_arg(node.args, lambda a, local=local: local.get(a, a))
            node.kwargs = fx.node.map_arg(node.kwargs, lambda a, local=local: local.get(a, a))
    changed = True
    while changed:  # drop the sizes no one reads any more
        changed = False
        for node in reversed(list(graph.nodes)):
            if not node.users and (node.target is aten.sym_size.int or node.target in _SYM_OPS):
                graph.erase_node(node)
                changed = True


def _size_from(graph: fx.Graph, s: fx.Node, tensors: list[fx.Node], user: fx.Node) -> fx.Node | None:
    expr = _sym(s)
    for t in tensors:
        for d, size in enumerate(t.meta["val"].shape):
            if isinstance(size, torch.SymInt) and size.node.expr == expr:
                with graph.inserting_before(user):
                    new = graph.call_function(aten.sym_size.int, (t, d))
                new.meta.update(val=size, nn_module_stack=user.meta.get("nn_module_stack", {}))
                return new
    if s.op == "call_function" and s.target in _SYM_OPS:  # e.g. B * T: rebuild it from local sizes
        parts = {a: _size_from(graph, a, tensors, user) for a in s.all_input_nodes if _sym(a) is not None}
        if all(p is not None for p in parts.values()):
            with graph.inserting_before(user):
                new = graph.call_function(s.target, fx.node.map_arg(s.args, lambda a: parts.get(a, a)))
            new.meta.update(val=s.meta["val"], nn_module_stack=user.meta.get("nn_module_stack", {}))
            return new
    return None


# ----------------------------------------------------------------------------- errors and sites

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_PKG_DIR = str(Path(__file__).resolve().parent)


def _user_site(stack_trace: str | None) -> str:
    """`file:line: `code`` of the innermost frame of a node's stack trace that is the user's code."""
    if not stack_trace:
        return ""
    site = ""
    lines = stack_trace.splitlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if not line.startswith('File "'):
            continue
        path, _, rest = line[6:].partition('", line ')
        if path.startswith(("<", _TORCH_DIR, _PKG_DIR)):
            continue
        lineno = rest.split(",")[0]
        code = lines[i + 1].strip() if i + 1 < len(lines) else ""
        site = f"{path}:{lineno}" + (f": `{code}`" if code else "")
    return site


def export_failure(e: BaseException) -> str:
    """One paragraph on why torch.export failed: the user's line and the first line of the reason."""
    frames = traceback.extract_tb(e.__traceback__)
    site = ""
    for fr in frames:
        if not fr.filename.startswith(("<", _TORCH_DIR, _PKG_DIR)) and "site-packages" not in fr.filename:
            site = f"{fr.filename}:{fr.lineno} in {fr.name}" + (f": `{fr.line}`" if fr.line else "")
    text = str(e).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    why = "the code depends on a tensor's value, which export cannot know: " if "data-dependent" in text else ""
    return f"{why}{type(e).__name__}: {first}" + (f" (at {site})" if site else "")
