"""Emit: one torch.fx.GraphModule per stage, its inputs and outputs the boundary tensors of its cuts.

Each stage module is built over the traced module as root, so it holds the very same parameter and
buffer tensors as the user's model, under their original module paths.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from .partition import Partition
from .trace import gc_paused, keep_non_persistent


def emit_stages(part: Partition) -> list[fx.GraphModule]:
    """Stage i takes the boundary tensors of cut i-1 (stage 0: the program inputs) and returns those of
    cut i as a tuple; the last stage returns exactly what the model returns."""
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
            for b in part.cuts[s - 1].boundary:
                ph = graph.placeholder(b.name)
                ph.meta = dict(by_name[b.name].meta)
                env[by_name[b.name]] = ph
        for name in names:
            node = by_name[name]
            copied = graph.node_copy(node, env.__getitem__)
            env[node] = copied
        if s < part.num_stages - 1:
            out = tuple(env[by_name[b.name]] for b in part.cuts[s].boundary)
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
