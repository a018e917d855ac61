"""The local runtime against references: plain PyTorch steps, hand-computed gradients, the paper's behaviour."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dnicompile import compile_decoupled
from dnicompile.clock import Clock
from dnicompile.errors import SpecError
from dnicompile.spec import ClockConfig


class MLP(nn.Module):
    def __init__(self, depth=3, width=16, d_in=12, classes=5):
        super().__init__()
        dims = [d_in] + [width] * depth
        self.layers = nn.Sequential(
            *[nn.Sequential(nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()) for a, b in zip(dims, dims[1:])]
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.layers(x))


def _spec(depth, sg=None, optimizer=None, clock=None, batch=8, d_in=12, **stages):
    default = {"optimizer": optimizer or {"name": "SGD", "lr": 0.1}}
    if clock:
        default["clock"] = clock
    return {
        "inputs": {"x": {"shape": [batch, d_in]}},
        "cuts": [{"after": f"layers.{i}", "synthetic_gradient": sg} for i in range(depth)],
        "stages": {"default": default, **stages},
    }


def _batch(n=8, d_in=12, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("optimizer", [{"name": "SGD", "lr": 0.1}, {"name": "Adam", "lr": 0.01}])
def test_exact_cuts_train_like_plain_pytorch(optimizer, checks):
    """Several train_steps with exact cuts equal the same steps of plain training, batch norm included."""
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    program = compile_decoupled(model, _spec(3, optimizer=optimizer))
    cls = getattr(torch.optim, optimizer["name"])
    opt = cls(reference.parameters(), lr=optimizer["lr"])
    checks.trains_like_plain(program, model, reference, opt, [_batch(seed=step) for step in range(3)])


def test_clip_grad_norm_per_stage_equals_clipping_by_hand():
    """`optimizer: {clip_grad_norm: c}` on stage 1 (layers.1) of an all-exact program: its gradients are scaled to
    norm c before its step, the other stages' are not; plain PyTorch with clip_grad_norm_ on those parameters."""
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    clipped = {"optimizer": {"name": "SGD", "lr": 0.1, "clip_grad_norm": 0.05}}
    program = compile_decoupled(model, _spec(3, **{"1": clipped}))
    opt_clip = torch.optim.SGD(reference.layers[1].parameters(), lr=0.1)
    rest = [p for n, p in reference.named_parameters() if not n.startswith("layers.1.")]
    opt_rest = torch.optim.SGD(rest, lr=0.1)
    norms = []
    for step in range(3):
        x, y = _batch(seed=step)
        program.train_step(x, y)
        opt_clip.zero_grad()
        opt_rest.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(reference.layers[1].parameters(), 0.05)))
        opt_clip.step()
        opt_rest.step()
    assert min(norms) > 0.05  # the clip did something
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[key], msg=key)


@pytest.mark.parametrize(
    "optimizer", [{"name": "SGD", "lr": 0.1, "momentum": 0.9}, {"name": "Adam", "lr": 0.01}], ids=["sgdm", "adam"]
)
def test_accumulation_equals_plain_pytorch_accumulating(optimizer):
    """[Note: accumulation] `accumulate: 3` on every stage of an all-exact program, with clip_grad_norm on stage 1:
    plain PyTorch summing 3 batches' gradients, taking their mean, clipping it, one step per 3 batches; after 8
    steps (two windows and an unfinished one, whose gradients do not reach the weights). (The mean is taken after
    the sum, as the runtime does, rather than `(loss / 3).backward()`: the same in exact arithmetic, but Adam
    magnifies the rounding in the gradient of a bias before batch norm, which is zero but for rounding.)"""
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    clipped = {"optimizer": {**optimizer, "clip_grad_norm": 0.05}}
    spec = _spec(3, optimizer=optimizer, **{"1": clipped})
    spec["stages"]["default"]["accumulate"] = 3  # stage 1 takes it from `default`
    program = compile_decoupled(model, spec)
    assert [s.accumulate for s in program.stages] == [3, 3, 3, 3]
    cls, kwargs = getattr(torch.optim, optimizer["name"]), {k: v for k, v in optimizer.items() if k != "name"}
    opt_clip = cls(reference.layers[1].parameters(), **kwargs)
    opt_rest = cls([p for n, p in reference.named_parameters() if not n.startswith("layers.1.")], **kwargs)
    updated, norms = [], []
    for step in range(8):
        x, y = _batch(seed=step)
        result = program.train_step(x, y)
        updated.append(result.ticked)
        loss = F.cross_entropy(reference(x), y)
        loss.backward()
        assert result.loss == pytest.approx(loss.item(), rel=1e-6)
        if (step + 1) % 3 == 0:
            for p in reference.parameters():
                p.grad /= 3
            norms.append(float(torch.nn.utils.clip_grad_norm_(reference.layers[1].parameters(), 0.05)))
            opt_clip.step()
            opt_rest.step()
            opt_clip.zero_grad()
            opt_rest.zero_grad()
    assert updated == [[s % 3 == 2] * 4 for s in range(8)]
    assert min(norms) > 0.05  # the clip acted on the accumulated gradient
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[key], msg=key)


def test_accumulation_per_stage_and_resumed_inside_a_window():
    """Stage 0 accumulates 2 steps, the others update every step (Adam): two optimizers of plain PyTorch. The
    runtime's state taken after step 3 (inside stage 0's window) and loaded into a fresh program continues as the
    uninterrupted run: the window's gradients are in the checkpoint."""
    torch.manual_seed(0)
    model = MLP()
    reference, start = copy.deepcopy(model), copy.deepcopy(model)
    adam = {"name": "Adam", "lr": 0.01}
    spec = _spec(3, optimizer=adam, **{"0": {"accumulate": 2}})
    program = compile_decoupled(model, spec)
    opt0 = torch.optim.Adam(reference.layers[0].parameters(), lr=0.01)
    opt_rest = torch.optim.Adam([p for n, p in reference.named_parameters() if not n.startswith("layers.0.")], lr=0.01)
    saved = None
    for step in range(6):
        x, y = _batch(seed=step)
        program.train_step(x, y)
        if step == 2:
            saved = copy.deepcopy((model.state_dict(), program.runtime.state_dict()))
        F.cross_entropy(reference(x), y).backward()
        opt_rest.step()
        opt_rest.zero_grad()
        if step % 2 == 1:
            for p in reference.layers[0].parameters():
                p.grad /= 2
            opt0.step()
            opt0.zero_grad()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[key], msg=key)
    assert saved[1]["stages"][0]["grads"][0] is not None  # inside the window: stage 0's gradient so far
    resumed = compile_decoupled(start, spec)
    start.load_state_dict(saved[0])
    resumed.runtime.load_state_dict(saved[1])
    for step in range(3, 6):
        resumed.train_step(*_batch(seed=step))
    for key, value in start.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key], msg=key)


def test_compiled_stages_train_like_plain_pytorch(checks):
    """[Note: compiled stages] `compile: {backend: aot_eager}` on every stage (AOTAutograd traces each stage's
    forward and backward; the tests use it rather than inductor, whose C++ build takes minutes on 2 cores;
    benchmarks/stage_options.py measures inductor): the same steps as plain eager PyTorch, batch norm included."""
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    adam = {"name": "Adam", "lr": 0.01}
    spec = _spec(3, optimizer=adam)
    spec["stages"]["default"]["compile"] = {"backend": "aot_eager"}
    program = compile_decoupled(model, spec)
    opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    checks.trains_like_plain(program, model, reference, opt, [_batch(seed=step) for step in range(3)], rel=1e-5)
    assert all(isinstance(s._compiled, torch._dynamo.eval_frame.OptimizedModule) for s in program.stages)
    assert set(program.state_dict()) == set(reference.state_dict())  # no `_orig_mod.` keys


def test_unknown_compile_backend_is_refused():
    spec = _spec(2, **{"0": {"compile": {"backend": "inducter"}}})
    with pytest.raises(SpecError, match="unknown torch.compile backend 'inducter'.*did you mean.*inductor"):
        compile_decoupled(MLP(depth=2), spec)


def test_the_stage_table_shows_accumulation_and_compile():
    from dnicompile.describe import summary_text

    spec = _spec(2, **{"0": {"accumulate": 3}, "1": {"compile": {"backend": "aot_eager"}}})
    table = " ".join(summary_text(compile_decoupled(MLP(depth=2), spec), width=250).split())
    assert "every 3, accumulating" in table and "SGD(lr=0.1), compiled" in table


def test_accumulation_with_a_clock_is_refused():
    spec = _spec(2, clock={"every": 2}, **{"stage1": {"accumulate": 4}})
    with pytest.raises(
        SpecError, match=r"`stages\.stage1\.accumulate: 4` makes stage1 update every 4 steps, so it takes no `clock`"
    ):
        compile_decoupled(MLP(depth=2), spec)


def test_zero_synthesizer_freezes_earlier_stages_at_step_0():
    """Zero-initialised synthesizers send no gradient: under SGD the stages before the cut do not move."""
    torch.manual_seed(0)
    model = MLP()
    sg = {"model": "mlp", "hidden": 32, "layers": 1, "condition_on_labels": True}
    program = compile_decoupled(model, _spec(3, sg=sg))
    before = {k: v.clone() for k, v in model.named_parameters()}
    x, y = _batch()
    result = program.train_step(x, y)
    for name, p in model.named_parameters():
        if name.startswith("head"):
            assert not torch.equal(before[name], p), f"{name} should have moved (true gradient)"
        else:
            assert torch.equal(before[name], p), f"{name} moved at step 0"
    assert all(c == 0.0 for c in result.cosine.values())
    # the synthesizers did learn from the true gradient, so the next step moves the earlier stages
    program.train_step(x, y)
    assert not torch.equal(before["layers.2.0.weight"], model.layers[2][0].weight)


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.body(x))


def test_synthesizer_converges_to_true_gradient_on_linear_regression():
    """With the model frozen (clocks that never tick), a linear cDNI synthesizer fits dL/dh exactly."""
    torch.manual_seed(0)
    model = Regression()
    spec = {
        "inputs": {"x": {"shape": [32, 6]}},
        "cuts": [
            {
                "after": "body",
                "synthetic_gradient": {
                    "model": "linear",
                    "condition_on_labels": True,
                    "optimizer": {"name": "Adam", "lr": 3e-3},
                },
            }
        ],
        "stages": {"default": {"clock": {"offset": 10**9}}},
        "loss": "mse",
    }
    program = compile_decoupled(model, spec)
    w_true = torch.randn(6, 1)
    g = torch.Generator().manual_seed(1)
    for _ in range(1500):
        x = torch.randn(32, 6, generator=g)
        result = program.train_step(x, x @ w_true)
    # hand-computed reference: L = mean((head(h) - y)^2)  =>  dL/dh = 2 (head(h) - y) w_head / B
    x = torch.randn(32, 6, generator=g)
    y = x @ w_true
    h = model.body(x)
    true = 2 * (model.head(h) - y) @ model.head.weight / 32
    synth = program.runtime.interfaces[0].models.grad[program.cuts[0].boundary[0].name]
    synth.eval()
    with torch.no_grad():
        predicted = synth(h, y) / 32
    cos = F.cosine_similarity(predicted.flatten(), true.detach().flatten(), dim=0)
    assert cos > 0.99, f"cosine {cos:.4f}"
    assert result.cosine["body"] > 0.99


def test_clock_every_k_with_offset():
    clock = Clock(ClockConfig(every=3, offset=2))
    assert [step for step in range(12) if clock.tick(step)] == [2, 5, 8, 11]


def test_clock_probability_is_seeded_and_has_the_declared_rate():
    a = Clock(ClockConfig(probability=0.2, seed=5))
    b = Clock(ClockConfig(probability=0.2, seed=5))
    ticks_a = [a.tick(s) for s in range(20000)]
    assert ticks_a == [b.tick(s) for s in range(20000)]
    rate = sum(ticks_a) / len(ticks_a)
    sigma = math.sqrt(0.2 * 0.8 / len(ticks_a))
    assert abs(rate - 0.2) < 4 * sigma
    other = Clock(ClockConfig(probability=0.2, seed=6))
    assert ticks_a != [other.tick(s) for s in range(20000)]


def test_stages_update_only_on_their_clock_ticks():
    """Stage 1 on `every: 3` changes its parameters on steps 0, 3, 6 only; stage 0 (every step) always."""
    torch.manual_seed(0)
    model = MLP(depth=1)
    sg = {"model": "linear", "condition_on_labels": True, "optimizer": {"name": "Adam", "lr": 1e-2}}
    spec = _spec(1, sg=sg, **{"1": {"clock": {"every": 3}}})
    program = compile_decoupled(model, spec)
    changed = []
    for step in range(7):
        before = model.head.weight.clone()
        result = program.train_step(*_batch(seed=step))
        assert result.ticked == [True, step % 3 == 0]
        changed.append(not torch.equal(before, model.head.weight))
    assert changed == [s % 3 == 0 for s in range(7)]


def test_probability_clock_in_program_is_reproducible():
    def run():
        torch.manual_seed(0)
        program = compile_decoupled(MLP(), _spec(3, sg={"model": "linear"}, clock={"probability": 0.3, "seed": 3}))
        return [program.train_step(*_batch(seed=s)).ticked for s in range(10)]

    first = run()
    assert first == run()
    assert any(not all(t) for t in first) and any(any(t) for t in first)


def test_scheduler_and_optimizer_arguments():
    program = compile_decoupled(
        MLP(),
        _spec(
            3,
            optimizer={
                "name": "SGD",
                "lr": 0.1,
                "momentum": 0.9,
                "scheduler": {"name": "StepLR", "step_size": 1, "gamma": 0.5},
            },
        ),
    )
    program.train_step(*_batch())
    program.train_step(*_batch())
    opt = program.runtime.stages[0].optimizer
    assert opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


@pytest.mark.parametrize(
    "optimizer, message",
    [
        ({"name": "Adamm"}, "did you mean 'Adam'"),
        ({"name": "SGD", "momentun": 0.9}, "did you mean 'momentum'"),
        ({"name": "SGD", "scheduler": {"name": "StepLr", "step_size": 1}}, "did you mean 'StepLR'"),
    ],
)
def test_bad_optimizer_names_are_spec_errors(optimizer, message):
    program = compile_decoupled(MLP(), _spec(3, optimizer=optimizer))
    with pytest.raises(SpecError, match=message):
        program.train_step(*_batch())


def test_conv_synthesizer_with_labels_and_token_synthesizer():
    """conv synthesizers broadcast labels as channels; token synthesizers act per position."""

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))

    sg = {"model": "conv", "layers": 1, "kernel_size": 5, "condition_on_labels": True}
    spec = {"inputs": {"x": {"shape": [4, 1, 8, 8]}}, "cuts": [{"after": "c1", "synthetic_gradient": sg}]}
    program = compile_decoupled(Conv(), spec)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    for _ in range(3):
        result = program.train_step(x, y)
    assert set(result.synth_loss) == {"c1"}
    synth = program.runtime.interfaces[0].models.grad["c1"]
    assert synth.net[0].in_channels == 4 + 3 and synth.net[-1].out_channels == 4


def test_synthetic_input_learns_the_boundary_tensor():
    torch.manual_seed(0)
    model = MLP(depth=2)
    cuts = [
        {
            "after": "layers.0",
            "synthetic_gradient": {"model": "linear", "condition_on_labels": True},
            "synthetic_input": {"model": "mlp", "hidden": 64, "layers": 1, "optimizer": {"name": "Adam", "lr": 1e-2}},
        },
        {"after": "layers.1"},
    ]
    spec = {"inputs": {"x": {"shape": [8, 12]}}, "cuts": cuts}
    program = compile_decoupled(model, spec)
    x, y = _batch()
    first = program.train_step(x, y).input_loss["layers.0"]
    for _ in range(100):
        last = program.train_step(x, y).input_loss["layers.0"]
    assert last < 0.2 * first


def test_synthetic_input_on_exact_cut_is_an_error():
    spec = {"inputs": {"x": {"shape": [8, 12]}}, "cuts": [{"after": "layers.0", "synthetic_input": {}}]}
    program = compile_decoupled(MLP(), spec)
    with pytest.raises(SpecError, match="synthetic_input but no synthetic_gradient"):
        program.train_step(*_batch())


def test_eval_mode_inference_matches_model_without_synthesizers():
    torch.manual_seed(0)
    model = MLP()
    program = compile_decoupled(model, _spec(3, sg={"model": "linear"}))
    for s in range(3):
        program.train_step(*_batch(seed=s))
    program.eval()
    x, _ = _batch(seed=9)
    torch.testing.assert_close(program(x), model.eval()(x))


def test_synthesizer_has_its_own_scheduler():
    sg = {
        "model": "linear",
        "optimizer": {"name": "Adam", "lr": 1e-2, "scheduler": {"name": "StepLR", "step_size": 2, "gamma": 0.1}},
    }
    program = compile_decoupled(MLP(), _spec(3, sg=sg))
    for s in range(4):
        program.train_step(*_batch(seed=s))
    g_opt = program.runtime.interfaces[0].optimizer
    assert g_opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert program.runtime.stages[0].optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # stages keep theirs


def test_the_stage_graph_is_what_the_runtime_and_the_drawing_read():
    """[Note: stage graph]: partition's networkx graph carries the program's stages and cuts; the runtime runs
    the stages in its topological order and crosses the cut on each edge, and stages.dot draws its edges."""
    from dnicompile.inspect import stages_dot

    torch.manual_seed(0)
    program = compile_decoupled(MLP(depth=3), _spec(3, sg={"model": "linear"}))
    graph = program.stage_graph
    assert list(graph.edges) == [(0, 1), (1, 2), (2, 3)] and program.stage_order == (0, 1, 2, 3)
    for u, v, cut in graph.edges(data="cut"):
        assert cut is program.cuts[u] and program.cut_after(u) is cut and program.cut_before(v) is cut
        assert graph.edges[u, v]["tensors"] == cut.boundary
    assert graph.nodes[2]["stage"] is program.stages[2]
    assert program.cut_before(0) is None and program.cut_after(3) is None
    result = program.train_step(*_batch())
    assert sorted(result.cosine) == sorted(c.name for _, _, c in graph.edges(data="cut"))
    dot = stages_dot(program)
    assert sum(" -> " in line and "loss" not in line and "input" not in line for line in dot.splitlines()) == 3


def test_cdni_finds_the_class_scores_behind_a_returned_loss():
    """A model that returns {"loss": ..., "logits": ...} (a ModelOutput's order): the one-hot labels are sized by
    the logits, not by the scalar loss that comes first, and a step matches a hand-made cDNI context."""

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(12, 16), nn.ReLU())
            self.head = nn.Linear(16, 5)

        def forward(self, x, y):
            logits = self.head(self.body(x))
            return {"loss": F.cross_entropy(logits, y), "logits": logits}

    torch.manual_seed(0)
    spec = {
        "inputs": {"x": {"shape": [8, 12]}, "y": {"shape": [8], "dtype": "int64", "high": 5}},
        "cuts": [{"after": "body", "synthetic_gradient": {"model": "linear", "condition_on_labels": True}}],
        "loss": {"from_output": "loss", "labels": "y"},
    }
    program = compile_decoupled(WithLoss(), spec)
    assert program.runtime.num_classes == 5
    x, y = _batch()
    result = program.train_step(x, y)
    assert math.isfinite(result.loss) and "body" in result.cosine
