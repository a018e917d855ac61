"""Delayed-gradient cuts (issue 16): the stage before the cut steps with the true gradient of the batch it ran
`delay` steps ago. Compared with exact cuts (delay 0), with hand-written PyTorch loops of each method (weight
stashing, DDG's current weights, Features Replay's recomputation), with the spec, and on Fashion-MNIST."""

from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dnicompile import compile_decoupled
from dnicompile.cli import main
from dnicompile.describe import describe_synthesizer
from dnicompile.errors import SpecError
from dnicompile.inspect import stages_dot

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DNICOMPILE_FASHION_MNIST", ROOT.parent / "shared" / "data" / "fashion-mnist"))
WEIGHTS = ("stash", "current", "recompute")


class Net(nn.Module):
    """Two layers before the cut (so current and stashed weights give different gradients), two after."""

    def __init__(self, norm: bool = False):
        super().__init__()
        extra = [nn.BatchNorm1d(16), nn.Dropout(0.2)] if norm else []
        self.a = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), *extra, nn.Linear(16, 16), nn.Tanh())
        self.b = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.b(self.a(x)))


OPTIMIZERS = {"SGD": {"name": "SGD", "lr": 0.1, "momentum": 0.9}, "Adam": {"name": "Adam", "lr": 0.01}}


def _spec(cuts, optimizer="Adam"):
    return {
        "inputs": {"x": {"shape": [8, 12]}},
        "cuts": cuts,
        "stages": {"default": {"optimizer": OPTIMIZERS[optimizer]}},
        "loss": "cross_entropy",
    }


def _delayed(after="a", **config):
    return {"after": after, "delayed_gradient": config}


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def _optimizer(params, name):
    cfg = dict(OPTIMIZERS[name])
    return getattr(torch.optim, cfg.pop("name"))(params, **cfg)


def _assert_same(model, reference):
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("norm", [False, True], ids=["tanh", "batchnorm+dropout"])
def test_delay_zero_trains_like_an_exact_cut(weights, norm):
    """Both cuts delayed by 0 steps: the parameters (and batch-norm statistics) of an exact program after 5 steps."""
    torch.manual_seed(0)
    model = Net(norm)
    exact_model = copy.deepcopy(model)
    cuts = [_delayed("a", delay=0, weights=weights), _delayed("b", delay=0, weights=weights)]
    program = compile_decoupled(model, _spec(cuts))
    exact = compile_decoupled(exact_model, _spec([{"after": "a"}, {"after": "b"}]))
    program.runtime.measure_fresh = True  # measuring must not change what is trained
    for x, y in _batches(5):
        torch.manual_seed(7)  # the same dropout draws in both
        result = program.train_step(x, y)
        torch.manual_seed(7)
        exact.train_step(x, y)
    _assert_same(model, exact_model)
    for k, v in exact_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=k)
    assert result.staleness == {"a": 0, "b": 0}
    assert result.cosine["a"] == pytest.approx(1.0) and result.cosine["b"] == pytest.approx(1.0)


def _current_weights_backward(a: nn.Sequential, x, a1, h, delta):
    """By hand, the backward of a = Linear, Tanh, Linear, Tanh with the activations a1, h of an earlier forward on
    x and the weights a has now (DDG): no autograd, so nothing can stand in for the method."""
    g2 = delta * (1 - h**2)  # d/d(z2), (B, 16)
    g1 = (g2 @ a[2].weight.detach()) * (1 - a1**2)  # through today's W2
    return [g1.T @ x, g1.sum(0), g2.T @ a1, g2.sum(0)]  # W1, b1, W2, b2


def _reference(model: Net, batches, delay, weights, optimizer, shrink, warmup=0, predict=False):
    """The method in plain PyTorch: batch t's forward of `a` now, its backward with delta_t at step t + delay (at
    step t during the first `warmup` steps). `predict`: the stashed forward runs on w + delay * (w - w_before), w_before
    the weights of the previous forward (linear weight prediction)."""
    opt_a = _optimizer(model.a.parameters(), optimizer)
    rest = [*model.b.parameters(), *model.head.parameters()]
    opt_rest = _optimizer(rest, optimizer)
    kept, before = [], None
    for t, (x, y) in enumerate(batches):
        if weights == "stash":
            stash = copy.deepcopy(model.a)  # the weights of this forward; its graph is kept until the backward
            if predict:
                now = [p.detach().clone() for p in model.a.parameters()]
                if before is not None:
                    with torch.no_grad():
                        for q, w, b in zip(stash.parameters(), now, before):
                            q.copy_(w + delay * (w - b))
                before = now
            h = stash(x)
            kept_graph = (stash, h)
        else:
            with torch.no_grad():
                a1 = model.a[1](model.a[0](x))
                h = model.a[3](model.a[2](a1))
            kept_graph = (a1, h)
        hd = h.detach().requires_grad_(True)
        loss = F.cross_entropy(model.head(model.b(hd)), y)
        opt_rest.zero_grad()
        loss.backward()
        opt_rest.step()
        kept.append((x, hd.grad * shrink, kept_graph))
        if len(kept) <= (0 if t < warmup else delay):
            continue
        x_s, delta_s, graph = kept.pop(0)
        opt_a.zero_grad()
        if weights == "stash":
            stash, h_s = graph
            h_s.backward(delta_s)
            for p, q in zip(model.a.parameters(), stash.parameters()):
                p.grad = q.grad
        elif weights == "recompute":
            model.a(x_s).backward(delta_s)
        else:
            a1, h_s = graph
            for p, g in zip(model.a.parameters(), _current_weights_backward(model.a, x_s, a1, h_s, delta_s)):
                p.grad = g
        opt_a.step()


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("delay", [1, 2])
def test_delayed_cut_equals_a_hand_written_loop(delay, weights, optimizer):
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    shrink = 0.5 if delay == 2 else 1.0
    program = compile_decoupled(model, _spec([_delayed(delay=delay, weights=weights, shrink=shrink)], optimizer))
    batches = _batches(6)
    results = [program.train_step(x, y) for x, y in batches]
    _reference(reference, batches, delay, weights, optimizer, shrink)
    _assert_same(model, reference)
    assert [r.ticked[0] for r in results] == [t >= delay for t in range(6)]  # no step before a gradient is due
    assert results[-1].staleness == {"a": delay}


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
@pytest.mark.parametrize("delay", [1, 2])
def test_linear_weight_prediction_equals_a_hand_written_loop(delay, optimizer):
    """`predict: linear`: the stashed forward of batch t runs on w_t + delay * (w_t - w_(t-1)), and the late
    backward uses those weights ([Note: weight prediction])."""
    torch.manual_seed(0)
    model = Net()
    reference, plain = copy.deepcopy(model), copy.deepcopy(model)
    spec = _spec([_delayed(delay=delay, weights="stash", predict="linear")], optimizer)
    program = compile_decoupled(model, spec)
    batches = _batches(7)
    for x, y in batches:
        program.train_step(x, y)
    _reference(reference, batches, delay, "stash", optimizer, 1.0, predict=True)
    _assert_same(model, reference)
    _reference(plain, batches, delay, "stash", optimizer, 1.0)  # the prediction changes what is trained
    assert any(not torch.allclose(p, q) for p, q in zip(model.a.parameters(), plain.a.parameters()))


@pytest.mark.parametrize("weights", WEIGHTS)
def test_warmup_runs_the_first_steps_exact_then_delays(weights):
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    program = compile_decoupled(model, _spec([_delayed(delay=2, weights=weights, warmup=3)], "Adam"))
    batches = _batches(8)
    results = [program.train_step(x, y) for x, y in batches]
    _reference(reference, batches, 2, weights, "Adam", 1.0, warmup=3)
    _assert_same(model, reference)
    # exact for steps 0-2; at step 3 the delay begins: no update at steps 3 and 4, then gradients 2 steps old
    assert [r.ticked[0] for r in results] == [True, True, True, False, False, True, True, True]
    assert [r.staleness.get("a") for r in results] == [0, 0, 0, None, None, 2, 2, 2]


@pytest.mark.parametrize("every", [None, 2, 3])
def test_the_stale_fresh_cosine_is_measured_every_n_steps(every):
    torch.manual_seed(0)
    program = compile_decoupled(Net(), _spec([_delayed(delay=1, measure_every=every)], "Adam"))
    measured = [step for step, (x, y) in enumerate(_batches(9)) if "a" in program.train_step(x, y).cosine]
    # 1-based multiples of N, from the first step with a gradient due (step 1 at delay 1)
    assert measured == ([] if every is None else [s for s in range(1, 9) if (s + 1) % every == 0])


def test_chained_delays_add():
    """Two delayed cuts, 2 then 1 step: the first stage applies gradients 3 steps old, and the program equals the
    same loop run by hand (the middle stage's input gradient of batch s reaches the first stage at s + 1 + 2)."""
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    cuts = [_delayed("a", delay=2, weights="stash"), _delayed("b", delay=1, weights="stash")]
    program = compile_decoupled(model, _spec(cuts, "SGD"))
    batches = _batches(7)
    results = [program.train_step(x, y) for x, y in batches]
    assert results[-1].staleness == {"a": 3, "b": 1}
    assert [r.ticked for r in results[:4]] == [[False, False, True], [False, True, True], [False, True, True]] + [
        [True, True, True]
    ]
    opts = [_optimizer(m.parameters(), "SGD") for m in (reference.a, reference.b, reference.head)]
    kept_a, kept_b = {}, {}
    for t, (x, y) in enumerate(batches):
        stash_a = copy.deepcopy(reference.a)
        h1 = stash_a(x)
        h1d = h1.detach().requires_grad_(True)
        stash_b = copy.deepcopy(reference.b)
        h2 = stash_b(h1d)
        h2d = h2.detach().requires_grad_(True)
        opts[2].zero_grad()
        F.cross_entropy(reference.head(h2d), y).backward()
        opts[2].step()
        kept_a[t], kept_b[t] = (stash_a, h1, None), (stash_b, h2, h1d, h2d.grad)
        if t >= 1:  # stage b: batch t - 1
            stash, h, leaf, delta = kept_b.pop(t - 1)
            opts[1].zero_grad()
            h.backward(delta)
            for p, q in zip(reference.b.parameters(), stash.parameters()):
                p.grad = q.grad
            opts[1].step()
            stash_a_s, h1_s, _ = kept_a[t - 1]
            kept_a[t - 1] = (stash_a_s, h1_s, (leaf.grad, t))  # arrives now, due 2 steps later
        due = [s for s, (_, _, arrived) in kept_a.items() if arrived is not None and t - arrived[1] >= 2]
        if due:
            stash, h, (delta, _) = kept_a.pop(due[0])
            opts[0].zero_grad()
            h.backward(delta)
            for p, q in zip(reference.a.parameters(), stash.parameters()):
                p.grad = q.grad
            opts[0].step()
    _assert_same(model, reference)


@pytest.mark.parametrize("weights", [*WEIGHTS, "stash+predict"])
def test_a_resumed_run_ends_like_one_that_never_stopped(weights):
    """Stop after 4 steps with 3 + 1 batches waiting for their backward, save (weights-only loading), build a fresh
    program, load, go on: the parameters after 8 steps are those of 8 straight steps, to the bit."""
    config = {"weights": "stash", "predict": "linear"} if weights == "stash+predict" else {"weights": weights}
    spec = _spec([_delayed("a", delay=2, **config), _delayed("b", delay=1, **config)])
    batches = _batches(8)

    def run(steps, program):
        for t in steps:
            torch.manual_seed(100 + t)  # dropout draws of each step
            program.train_step(*batches[t])

    torch.manual_seed(0)
    straight = compile_decoupled(Net(norm=True), spec)
    run(range(8), straight)
    torch.manual_seed(0)
    first = compile_decoupled(Net(norm=True), spec)
    run(range(4), first)
    state = first.runtime.state_dict()
    assert len(state["interfaces"]["a"]["queue"]) == 3 and len(state["interfaces"]["b"]["queue"]) == 1
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "runtime": state}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch.manual_seed(5)
    resumed = compile_decoupled(Net(norm=True), spec)
    resumed.model.load_state_dict(saved["model"])
    resumed.runtime.load_state_dict(saved["runtime"])
    run(range(4, 8), resumed)
    for (k, v), w in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(w, v, rtol=0, atol=0, msg=k)


def test_spec_errors():
    both = _spec([{"after": "a", "delayed_gradient": {"delay": 1}, "local_loss": {"head": "linear"}}])
    with pytest.raises(SpecError, match=r"one kind.*`delayed_gradient` and `local_loss`"):
        compile_decoupled(Net(), both)
    with pytest.raises(SpecError, match=r"cuts\[0\]\.delayed_gradient\.weights.*'stash', 'current' or 'recompute'"):
        compile_decoupled(Net(), _spec([_delayed(delay=1, weights="stashed")]))
    with pytest.raises(SpecError, match=r"`predict: linear` needs `weights: stash`.*got `weights: current`"):
        compile_decoupled(Net(), _spec([_delayed(delay=1, weights="current", predict="linear")]))
    with pytest.raises(SpecError, match=r"cuts\[0\]\.delayed_gradient\.predict.*'none' or 'linear'"):
        compile_decoupled(Net(), _spec([_delayed(delay=1, predict="quadratic")]))
    with pytest.raises(SpecError, match=r"delay.*>= 0 or `auto`, got -1"):
        compile_decoupled(Net(), _spec([_delayed(delay=-1)]))
    with pytest.raises(SpecError, match=r"unknown key `cuts\[0\].delayed_gradient.dealy` \(did you mean 'delay'\?\)"):
        compile_decoupled(Net(), _spec([_delayed(dealy=1)]))
    auto = compile_decoupled(Net(), _spec([_delayed(delay="auto")]))
    assert "as it arrives" in auto.summary()
    with pytest.raises(SpecError, match=r"`delay: auto` on cut `a` needs several workers.*`delay: 1`"):
        auto.train_step(*_batches(1)[0])
    behind_synthetic = _spec([{"after": "a", "synthetic_gradient": {"model": "linear"}}, _delayed("b", delay=1)])
    with pytest.raises(SpecError, match="start behind synthetic cut `a`"):
        compile_decoupled(Net(), behind_synthetic).runtime  # noqa: B018 - building the runtime checks it


def test_the_stage_table_shows_the_kind():
    program = compile_decoupled(Net(), _spec([_delayed(delay=2, weights="recompute", shrink=0.5)]))
    text = describe_synthesizer(program.cuts[0])
    assert text == "delayed true gradient, 2 steps late, weights: recompute, shrink 0.5"
    predicted = compile_decoupled(Net(), _spec([_delayed(delay=1, predict="linear")]))
    assert (
        describe_synthesizer(predicted.cuts[0]) == "delayed true gradient, 1 step late, weights: stash, predict linear"
    )
    assert "delayed" in program.summary() and "style=dotted" in stages_dot(program)
    assert program.cuts[0].kind == "delayed" and "delayed" in repr(program.cuts[0])


@pytest.mark.skipif(not (DATA / "train-images-idx3-ubyte.gz").is_file(), reason=f"Fashion-MNIST not found at {DATA}")
def test_delayed_cut_learns_fashion_mnist(tmp_path):
    """specs/mlp_delayed.yaml from the command line: a short run learns (chance is 10%)."""
    out = tmp_path / "run"
    argv = ["examples/mlp.py", "--spec", str(ROOT / "specs" / "mlp_delayed.yaml"), "--train", "--data", str(DATA)]
    argv += ["--steps", "150", "--eval-every", "150", "--out", str(out)]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert main(argv) == 0
    finally:
        os.chdir(cwd)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.75, summary


@pytest.mark.skipif(not (DATA / "train-images-idx3-ubyte.gz").is_file(), reason=f"Fashion-MNIST not found at {DATA}")
def test_a_resumed_cli_run_ends_like_one_that_never_stopped(tmp_path, capsys):
    """--resume from a checkpoint taken with a batch waiting for its gradient (delay 2): the weights of the straight
    run, to the bit (the run checkpoint carries the interface's queue)."""
    spec = tmp_path / "spec.yaml"
    text = (
        (ROOT / "specs" / "mlp_delayed.yaml")
        .read_text()
        .replace("delay: 1, weights: stash", "delay: 2, weights: stash")
    )
    spec.write_text(text.replace("batch_size: 128", "batch_size: 32"))
    base = [str(ROOT / "examples" / "mlp.py"), "--spec", str(spec), "--train", "--data", str(DATA)]
    base += ["--eval-every", "1000", "--seed", "3", "--threads", "1"]
    assert main([*base, "--steps", "24", "--out", str(tmp_path / "straight")]) == 0
    assert main([*base, "--steps", "13", "--out", str(tmp_path / "resumed")]) == 0
    capsys.readouterr()
    assert main([*base, "--steps", "24", "--resume", str(tmp_path / "resumed")]) == 0
    assert "resum" in capsys.readouterr().out
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
