"""Emit: one torch.fx.GraphModule per stage, its inputs and outputs the boundary tensors of its cuts.

Each stage module is built over the traced module as root, so it holds the very same parameter and
buffer tensors as the user's model, under their original module paths.
"""

from __future__ import annotations

import re
import textwrap
import types

import torch
import torch.fx as fx
import torch.nn as nn

from .partition import Partition
from .trace import gc_paused, keep_non_persistent


def emit_stages(part: Partition) -> list[fx.GraphModule]:
    """Stage i takes what it receives (`Partition.stage_inputs`; stage 0: the program inputs) and returns what
    it sends (`CutPoint.sent`) as a tuple; the last stage returns exactly what the model returns. In a chain
    these are the boundary tensors of cut i-1 and cut i ([Note: stage DAG] in partition.py)."""
    with gc_paused():
        return _emit_stages(part)


def _emit_stages(part: Partition) -> list[fx.GraphModule]:
    root = part.graph_module
    by_name = {n.name: n for n in root.graph.nodes}
    stages = []
    for s, names in enumerate(part.stage_nodes):
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if s > 0:
            for b, _ in part.stage_inputs[s]:
                ph = graph.placeholder(b.name)
                ph.meta = dict(by_name[b.name].meta)
                env[by_name[b.name]] = ph
        for name in names:
            node = by_name[name]
            copied = graph.node_copy(node, env.__getitem__)
            env[node] = copied
        if s < part.num_stages - 1:
            out = tuple(env[by_name[b.name]] for b in part.cuts[s].sent)
            graph.output(out)
        stage_name = f"Stage{s}"
        gm = fx.GraphModule(root, graph, class_name=stage_name)
        keep_non_persistent(root, gm)
        stages.append(gm)
    return stages


def rebind_buffers(stage: fx.GraphModule, model: nn.Module, device=None) -> None:
    """Point a stage's buffers at the model's again, after `model.to(...)`.

    Module.to keeps parameter objects (it swaps their data) but puts new tensors in place of buffers, so a
    stage that reads a buffer by get_attr (an exported graph's batch-norm statistics, a causal mask) would
    keep the old one. Buffers the model does not have (an exported graph's constants) are moved along.
    """
    for name, buf in list(stage.named_buffers()):
        parent, _, leaf = name.rpartition(".")
        owner = stage.get_submodule(parent)
        try:
            owner._buffers[leaf] = model.get_buffer(name)
        except AttributeError:
            if device is not None:
                owner._buffers[leaf] = buf.to(device)


# [Note: emitted stage files] `--emit DIR` writes each stage as a Python module that imports on its own (torch,
# and from dnicompile only the export front end's helpers where the stage's code calls them): a class whose
# __init__ takes the user's model and takes from it, shared and not copied, the submodules, parameters and
# buffers the stage's code reads (the call_module / get_attr targets, as fx.GraphModule does with its root), and
# whose forward is the stage's fx code. `Stage0(model)(x)` then computes what the program's stage 0 computes.
# Tensors the model does not have (torch.export's lifted constants) are written beside the file as
# stage_<i>_constants.pt and loaded with weights_only=True. The names the code uses are imported by module path;
# a name that cannot be imported that way (a function defined in the user's script, say) is listed at the top
# of the file and must be supplied before the module is used.
def stage_module_source(
    gm: fx.GraphModule, model: nn.Module, class_name: str, header: str, constants_file: str
) -> tuple[str, dict[str, torch.Tensor]]:
    """The source of an importable module defining `class_name`, a torch.nn.Module that runs `gm`'s code on
    `model`'s tensors, and the tensors it needs that `model` lacks (to be saved as `constants_file`)."""
    code = gm.graph.python_code(root_module="self")
    used = {name: obj for name, obj in code.globals.items() if re.search(rf"\b{re.escape(name)}\b", code.src)}
    imports, missing = _imports(used)
    targets, constants = [], {}
    for target in sorted({str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}):
        try:
            _lookup(model, target)
            targets.append(target)
        except AttributeError:
            value = _lookup(gm, target)
            if not isinstance(value, torch.Tensor):
                missing.append(f"self.{target}")
            constants[target] = value.detach().cpu()
    forward = textwrap.indent(code.src.strip("\n"), "    ")
    lines = [header.rstrip("\n"), "from pathlib import Path", "", "import torch", *imports]
    if missing:
        lines.append(
            "# Names this stage's code uses that cannot be imported by module path; define them before calling "
            "forward: " + ", ".join(missing)
        )
    lines += [
        "",
        "",
        "def _put(stage: torch.nn.Module, target: str, value) -> None:",
        '    """Put `value` (a module, parameter, buffer or constant) at the dotted path `target` of `stage`."""',
        '    *path, leaf = target.split(".")',
        "    for name in path:",
        "        if not hasattr(stage, name):",
        "            stage.add_module(name, torch.nn.Module())",
        "        stage = getattr(stage, name)",
        "    if isinstance(value, torch.nn.Module):",
        "        stage.add_module(leaf, value)",
        "    elif isinstance(value, torch.nn.Parameter):",
        "        stage.register_parameter(leaf, value)",
        "    elif isinstance(value, torch.Tensor):",
        "        stage.register_buffer(leaf, value)",
        "    else:",
        "        setattr(stage, leaf, value)",
        "",
        "",
        f"class {class_name}(torch.nn.Module):",
        f'    """Build it with `{class_name}(model)`: the model\'s own tensors, shared, not copied."""',
        "",
        f"    TARGETS = {tuple(targets)!r}  # taken from the model",
        f"    CONSTANTS = {(constants_file if constants else None)!r}  # tensors the model lacks, beside this file",
        "",
        "    def __init__(self, model: torch.nn.Module):",
        "        super().__init__()",
        "        for target in self.TARGETS:",
        "            value = model",
        '            for name in target.split("."):',
        "                value = getattr(value, name)",
        "            _put(self, target, value)",
        "        if self.CONSTANTS:",
        "            constants = torch.load(Path(__file__).with_name(self.CONSTANTS), weights_only=True)",
        "            for target, value in constants.items():",
        "                _put(self, target, value)",
        "",
        forward,
        "",
    ]
    return "\n".join(lines), constants


def _lookup(root: nn.Module, target: str):
    value = root
    for name in target.split("."):
        value = getattr(value, name)
    return value


def _imports(names: dict) -> tuple[list[str], list[str]]:
    """Import lines that bind each of fx's code globals, and the names that cannot be imported."""
    import builtins
    import importlib
    import math

    from torch.fx.graph import _custom_builtins

    lines, missing = [], []
    for name, obj in sorted(names.items()):
        if name == "torch" or getattr(builtins, name, None) is obj:
            continue
        if name in _custom_builtins:
            lines.append(_custom_builtins[name].import_str)
        elif isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
            lines.append(f"{name} = float({str(obj)!r})")
        elif isinstance(obj, types.ModuleType):
            lines.append(f"import {obj.__name__}" if name == obj.__name__ else f"import {obj.__name__} as {name}")
        else:
            module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
            found = None
            if module and qualname and "<" not in qualname and module != "__main__":
                try:
                    found = importlib.import_module(module)
                    for part in qualname.split("."):
                        found = getattr(found, part)
                except (ImportError, AttributeError):
                    found = None
            if found is obj:
                first, _, rest = qualname.partition(".")
                lines.append(f"from {module} import {first}" + (f" as {name}" if not rest and first != name else ""))
                if rest:
                    lines.append(f"{name} = {first}.{rest}")
            else:
                missing.append(name)
    return list(dict.fromkeys(lines)), missing
