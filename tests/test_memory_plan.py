"""The memory plan (dnicompile/memory_plan.py, issue 18 item 6): each part against a reference. Parameter bytes
against a hand count over the stage's modules (a tied tensor in its owner only); optimizer state against the state
torch's optimizers hold after a real step (Adam, SGD with momentum, a synthesizer's Adam); activations of a small
MLP against the tensors its ops save, counted by hand; a delayed cut's stash against its weights times the delay; a
model on the `meta` device planned without allocating its size; `--memory` on the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dnicompile import compile_decoupled
from dnicompile.cli import main
from dnicompile.describe import format_bytes
from dnicompile.memory_plan import parse_memory, plan_memory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import mlp  # noqa: E402

F32 = 4


def _mlp_spec(cut: str = "synthetic_gradient: null", optimizer: str = "{name: Adam, lr: 1.0e-3}", batch: int = 32):
    return f"""
inputs:
  x: {{shape: [{batch}, 784], dtype: float32}}
cuts:
  - after: layers.0
    {cut}
  - after: layers.1
stages:
  default: {{optimizer: {optimizer}}}
loss: cross_entropy
train: {{batch_size: {batch}}}
"""


def _program(spec: str, hidden: int = 32, depth: int = 3):
    torch.manual_seed(0)
    return compile_decoupled(mlp.build_model(depth=depth, hidden=hidden), spec)


def _hand_bytes(modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def _state_bytes(optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )


def _batch(b: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 784, generator=g), torch.randint(0, 10, (b,), generator=g)


def test_parameter_bytes_are_the_hand_count_of_each_stages_modules():
    program = _program(_mlp_spec())
    plan = plan_memory(program)
    model = program.model
    modules = [[model.layers[0]], [model.layers[1]], [model.layers[2], model.head]]
    for stage, mods in zip(plan.stages, modules):
        assert stage.param_bytes == _hand_bytes(mods)
        assert stage.params == sum(p.numel() for m in mods for p in m.parameters())
        assert stage.param_bytes_by_dtype == {"float32": _hand_bytes(mods)}
        assert stage.grad_bytes == stage.param_bytes
        assert stage.buffer_bytes == sum(b.numel() * b.element_size() for m in mods for b in m.buffers())


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 50, width: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.body = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.body(self.emb(tokens)))


def test_a_tied_tensor_is_counted_once_in_the_stage_that_owns_it():
    model = TiedLM()
    spec = {
        "inputs": {"tokens": {"shape": [4, 5], "dtype": "int64", "high": 50}},
        "cuts": [{"after": "emb"}, {"after": "body"}],
    }
    program = compile_decoupled(model, spec)
    plan = plan_memory(program, batch=4)
    w = model.emb.weight.numel() * F32
    assert [s.param_bytes for s in plan.stages] == [0, _hand_bytes([model.body]), w]  # stage2 owns it
    assert sum(s.param_bytes for s in plan.stages) == _hand_bytes([model])
    # stage0 reads it: on a device of its own it keeps a replica, its gradient and its Adam state (2x + step)
    assert plan.stages[0].tied_replica_bytes == 4 * w + 4 and plan.stages[2].tied_replica_bytes == 0
    # both stages run on fake tensors with the tied tensor under both its names (no fallback rule)
    assert all(s.activation_rule == "saved tensors (fake run)" for s in plan.stages)


@pytest.mark.parametrize(
    "optimizer",
    [
        "{name: Adam, lr: 1.0e-3}",
        "{name: SGD, lr: 0.1, momentum: 0.9}",
        "{name: SGD, lr: 0.1}",
        "{name: AdamW, lr: 1.0e-3, amsgrad: true}",
    ],
)
def test_optimizer_state_is_what_torch_keeps_after_a_step(optimizer):
    sg = "synthetic_gradient: {model: linear, condition_on_labels: true, optimizer: " + optimizer + "}"
    program = _program(_mlp_spec(sg, optimizer))
    plan = plan_memory(program)
    program.train_step(*_batch())
    runtime = program.runtime
    for stage, state in zip(plan.stages, runtime.stages):
        assert stage.optimizer_state_bytes == _state_bytes(state.optimizer), (optimizer, stage.name)
    synth = runtime.interfaces[0]
    assert plan.stages[0].cut_params == sum(p.numel() for p in synth.models.parameters())
    assert plan.stages[0].cut_optimizer_state_bytes == _state_bytes(synth.optimizer)
    if "momentum" in optimizer:  # the rule of thumb, by hand: one buffer per parameter element
        assert plan.stages[1].optimizer_state_bytes == plan.stages[1].param_bytes
    if optimizer.startswith("{name: Adam,"):  # exp_avg, exp_avg_sq and a float32 step per tensor
        n = len(program.stages[1].parameters())
        assert plan.stages[1].optimizer_state_bytes == 2 * plan.stages[1].param_bytes + 4 * n


def test_activations_of_a_small_mlp_are_the_tensors_its_ops_save():
    """The rule: what autograd saves for the backward, each storage once, parameters and inputs left out. A block
    Linear -> BatchNorm1d -> ReLU saves the Linear's input (the stage's input: left out) and weight (a parameter),
    the BatchNorm's input (B x H), its batch mean and inverse std (H each) and running statistics (buffers: left
    out), and the ReLU's output (B x H)."""
    b, h = 24, 32
    program = _program(_mlp_spec(batch=48), hidden=h)
    plan = plan_memory(program, batch=b)  # another batch than the traced one: the inputs are scaled
    block = (2 * b * h + 2 * h) * F32
    assert [s.activation_bytes for s in plan.stages[:2]] == [block, block]
    assert plan.stages[0].input_bytes == b * 784 * F32
    assert all(s.activation_rule == "saved tensors (fake run)" for s in plan.stages)
    # the last stage: block, then the head's Linear (saves its input, the ReLU output already counted) and the
    # loss (log_softmax's output, B x 10, and the labels, B int64, as nll_loss saves them, plus its 4-byte weight)
    assert plan.stages[2].activation_bytes == block + b * 10 * F32 + b * 8 + 4
    # the same count by autograd itself, on real tensors: saved_tensors_hooks over the first stage
    x, _ = _batch(b)
    stage = program.stages[0]
    gm = stage.graph_module
    params = {t.untyped_storage().data_ptr() for t in [*gm.parameters(), *gm.buffers()]}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr != x.untyped_storage().data_ptr():
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stage.graph_module.train()
        stage(x)
    assert sum(saved.values()) == plan.stages[0].activation_bytes


def test_a_delayed_stash_adds_the_stages_weights_times_the_delay():
    plans = {}
    for weights in ("stash", "current"):
        for delay in (1, 3):
            cut = f"delayed_gradient: {{delay: {delay}, weights: {weights}, measure_every: null}}"
            plans[weights, delay] = plan_memory(_program(_mlp_spec(cut)))
    program = _program(_mlp_spec())
    weights = _hand_bytes([program.model.layers[0]])
    buffers = sum(b.numel() * b.element_size() for b in program.model.layers[0].buffers())
    for delay in (1, 3):
        stash, current = plans["stash", delay].stages[0], plans["current", delay].stages[0]
        assert stash.delayed_kept_bytes - current.delayed_kept_bytes == delay * (weights + buffers)
        # current keeps `delay` batches' inputs, activations and gradient (delta) of the cut
        per_batch = current.input_bytes + current.activation_bytes + 32 * 32 * F32
        assert current.delayed_kept_bytes == delay * per_batch
    recompute = plan_memory(_program(_mlp_spec("delayed_gradient: {delay: 2, weights: recompute}"))).stages[0]
    assert recompute.delayed_kept_bytes == 2 * (recompute.input_bytes + 32 * 32 * F32)


class MetaLM(nn.Module):
    """Token embedding, blocks, output head: an LM's layout at a 7B model's vocabulary and half its width."""

    def __init__(self, vocab: int = 32000, width: int = 2048, depth: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)) for _ in range(depth)]
        )
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        return self.head(self.blocks(self.emb(ids)))


def test_a_model_on_the_meta_device_is_planned_without_its_memory():
    """0.27e9 parameters, 1.06 GB in float32 (with gradients and AdamW state 4.2 GB), none of it allocated.
    (examples/llama_meta.py, a 7B Llama, plans the same way: benchmarks/memory_plan.py; it needs transformers and
    half a minute, so it is not a test.)"""
    with torch.device("meta"):
        model = MetaLM()
    spec = {
        "inputs": {"ids": {"shape": [2, 64], "dtype": "int64", "high": 32000}},
        "cuts": [{"after": "blocks.1"}],
        "stages": {"default": {"optimizer": {"name": "AdamW"}}},
        "train": {"batch_size": 2},
    }
    program = compile_decoupled(model, spec)
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident size from here on
    before = _status("VmRSS")
    plan = plan_memory(program, device_bytes=parse_memory("2GiB"))
    grew = _status("VmHWM") - before
    assert all(p.is_meta for p in model.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sum(s.param_bytes for s in plan.stages) == total > 1e9
    assert plan.stages[0].param_bytes == _hand_bytes([model.emb, model.blocks[0], model.blocks[1]])
    assert grew < 0.2e9, f"planning a meta model grew the process by {grew / 1e9:.2f} GB"
    # planned for a GPU (AdamW steps with foreach kernels there: one temporary per parameter element)
    assert plan.device == "cuda" and "foreach" in plan.stages[0].optimizer_rule
    for s in plan.stages:
        assert s.optimizer_state_bytes == 2 * s.param_bytes + 4 * len(program.stages[s.index].parameters())
        assert s.optimizer_workspace_bytes == s.param_bytes
        assert s.activation_rule == "saved tensors (fake run)" and s.activation_bytes > 0
    # 2 GiB (2.15 GB): each stage's weights, gradients and AdamW state are 2.1 GB, and the step needs more
    assert [s.name for s, _ in plan.over()] == ["stage0", "stage1"]
    assert all(2.1e9 < s.persistent_bytes < 2.15e9 for s in plan.stages)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.mark.parametrize(
    "text,value",
    [("80GB", 80 * 10**9), ("80 GiB", 80 * 2**30), ("1.5tb", 15 * 10**11), ("512MiB", 2**29), ("1000", 1000)],
)
def test_memory_sizes(text, value):
    assert parse_memory(text) == value


@pytest.mark.parametrize("bad", ["80XB", "eighty", "-1GB", "0GB", "1.5"])
def test_a_bad_memory_flag_is_exit_2_naming_the_flag(bad, capsys):
    code = main([str(ROOT / "examples/mlp.py"), "--spec", str(ROOT / "specs/mlp_cdni.yaml"), f"--memory={bad}"])
    err = capsys.readouterr().err
    assert code == 2 and "argument --memory" in err and "80GB" in err and "Traceback" not in err, err


def test_memory_1kb_names_the_stages_that_do_not_fit_and_emit_writes_the_plan(tmp_path, capsys):
    argv = [str(ROOT / "examples/mlp.py"), "--spec", str(ROOT / "specs/mlp_cdni.yaml"), "--memory", "1KB"]
    assert main([*argv, "--batch-size", "64", "--emit", str(tmp_path / "out")]) == 0  # a plan: exit 0
    out = " ".join(capsys.readouterr().out.split())
    plan = json.loads((tmp_path / "out" / "memory.json").read_text())
    assert plan["batch"] == 64 and plan["device_bytes"] == 1000
    over = {s["name"]: (s["total_bytes"], s["total_bytes"] - 1000) for s in plan["stages"]}
    assert [o["stage"] for o in plan["over"]] == list(over) == [f"stage{i}" for i in range(5)]
    assert "5 of 5 stages would not fit 1KB (1000 B) at batch 64" in out
    assert "memory @ batch 64" in out  # the stage table's column
    for name, (total, x) in over.items():
        assert f"{name} needs {format_bytes(total)}, {format_bytes(x)} over" in out
    for s in plan["stages"]:  # the breakdown adds up
        parts = s["persistent_bytes"] + max(
            s["transient_bytes"],
            s["optimizer_workspace_bytes"],
            s["cut_optimizer_workspace_bytes"],
            s["delayed_measure_bytes"],
        )
        assert s["total_bytes"] == parts
    assert main([*argv[:3], "--memory", "1TB"]) == 0
    assert "every stage fits 1TB" in " ".join(capsys.readouterr().out.split())
