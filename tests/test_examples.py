"""Every example, compiled with its spec, is the model it was compiled from.

For mlp, cnn, resnet and transformer (all specs with exact cuts): the program computes what the model
computes (train and eval mode), the stages hold each node of the traced graph exactly once, one backward
through the program leaves plain backprop's gradients, and the stages share the model's parameters.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dnicompile import compile_decoupled, load_spec
from dnicompile.cli import main
from dnicompile.compile.model_file import build_model
from dnicompile.compile.trace import make_example

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES, SPECS = ROOT / "examples", ROOT / "specs"
SPEC_OF = {"mlp": "mlp_backprop.yaml", "cnn": "cnn.yaml", "resnet": "resnet.yaml", "transformer": "transformer.yaml"}
BATCH = 4  # smaller than the specs' batch: the stages must not depend on the traced batch size


def build(name: str, seed: int = 0, **model_args):
    """(model, spec, inputs): the example built as the CLI builds it (`model_args` added to the spec's), and a small
    batch of example inputs."""
    spec = load_spec(SPECS / SPEC_OF[name])
    if model_args:
        spec = spec.model_copy(update={"model_args": {**spec.model_args, **model_args}})
    torch.manual_seed(seed)
    model = build_model(EXAMPLES / f"{name}.py", spec.model, spec.model_args)
    inputs = tuple(make_example(t, batch_size=BATCH) for t in spec.inputs.values())
    return model, spec, inputs


def cross_entropy(out: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, classes) or (B, T, vocab) logits against fixed pseudo-random targets."""
    logits = out.reshape(-1, out.shape[-1])
    target = torch.arange(logits.shape[0]) * 7 % logits.shape[-1]
    return F.cross_entropy(logits, target)


@pytest.fixture(scope="module", params=list(SPEC_OF))
def compiled(request):
    model, spec, inputs = build(request.param)
    reference = copy.deepcopy(model)  # before anything runs, so BatchNorm statistics agree too
    program = compile_decoupled(model, spec)
    assert len(program.stages) == len(spec.cuts) + 1
    assert all(cut.exact for cut in program.cuts)
    return request.param, model, reference, program, inputs


def test_forward_equals_model(compiled, checks):
    _, model, _, program, inputs = compiled
    checks.forward_matches(program, model, inputs)


def test_every_node_exactly_once(compiled, checks):
    _, model, _, program, _ = compiled
    checks.nodes_once(program, model)


def test_exact_cut_gradients_equal_backprop(compiled, checks):
    _, model, reference, program, inputs = compiled
    checks.grads_match(reference, program, model, inputs, cross_entropy)


def test_parameters_are_shared_not_copied(compiled, checks):
    _, model, _, program, _ = compiled
    checks.params_shared(program, model)
    assert {id(p) for p in program.parameters()} == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", list(SPEC_OF))
def test_cli_prints_stage_table(name, capsys):
    assert main([str(EXAMPLES / f"{name}.py"), "--spec", str(SPECS / SPEC_OF[name])]) == 0
    out = capsys.readouterr().out
    assert "stage0" in out and f"stage{len(load_spec(SPECS / SPEC_OF[name]).cuts)}" in out


def test_resnet_skip_tensor_crosses_mid_block_cuts():
    model, spec, inputs = build("resnet")
    program = compile_decoupled(model, spec)
    graph = {n.name: n for n in program.partition.graph_module.graph.nodes}
    mid_block = [cut for cut in program.cuts if cut.name.startswith("mid-block")]
    assert mid_block, "specs/resnet.yaml should cut inside residual blocks"
    for cut in mid_block:
        block = cut.after.rsplit(".", 1)[0]  # blocks.K.bn1 -> blocks.K
        conv1 = next(n for n in graph.values() if n.op == "call_module" and n.target == f"{block}.conv1")
        skip = conv1.args[0].name  # the block's input: also added back after the branch
        names = [b.name for b in cut.boundary]
        assert len(names) > 1, f"{cut.name}: boundary {names} should hold the skip tensor and the branch"
        assert skip in names, f"{cut.name}: skip tensor {skip} not in boundary {names}"
        assert cut.node in names, f"{cut.name}: the branch {cut.node} not in boundary {names}"
        # the skip tensor is used behind the cut, by the residual add
        users = [u for u in graph[skip].users if program.partition.stage_of[u.name] > cut.index]
        assert users, f"{cut.name}: {skip} has no user behind the cut"


def test_transformer_cuts_carry_only_the_residual_stream_and_allow_shorter_sequences(checks):
    model, spec, (idx,) = build("transformer")
    program = compile_decoupled(model, spec)
    for cut in program.cuts:
        assert len(cut.boundary) == 1 and cut.boundary[0].dtype == torch.float32
    short = idx[:, :16]  # T = 16 < block_size: the mask and positions are cut to T inside each stage
    checks.forward_matches(program, model, (short,))


def test_channels_last_cnn_keeps_its_layout_and_trains_like_backprop(checks):
    """A model stored channels-last before compiling (examples/cnn.py's `channels_last: true`) keeps that layout in
    its stages, and its exact program still computes the model's outputs and backprop's gradients."""
    model, spec, inputs = build("cnn", channels_last=True)
    reference = copy.deepcopy(model)
    program = compile_decoupled(model, spec)
    convs = [p for p in program.parameters() if p.dim() == 4]
    assert len(convs) == 3 and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)  # the layout really differs from the default one
    checks.forward_matches(program, model, inputs)
    checks.grads_match(reference, program, model, inputs, cross_entropy)
