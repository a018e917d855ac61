"""Each interface kind on its own, against a hand computation: the gradient it sends, one learning step of its
models, the cosine and loss it reports, and a state_dict round trip; and a subclass that changes what the stage
steps with (the averaged-synthesizer experiment) plugged in without monkeypatching."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dnicompile import compile_decoupled
from dnicompile.interfaces import BoundaryInterface, ExactInterface, SyntheticInterface
from dnicompile.spec import SyntheticGradientConfig

ROOT = Path(__file__).resolve().parents[1]


def _config(**kw) -> SyntheticGradientConfig:
    base = {"model": "linear", "optimizer": {"name": "SGD", "lr": 0.1}}
    base.update(kw)
    return SyntheticGradientConfig.model_validate(base)


def _randomize(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def test_exact_interface_is_trivial():
    iface = ExactInterface("cut")
    assert iface.exact and iface.modules() == [] and iface.state_dict() == {}


def test_synthetic_interface_gradient_learning_and_statistics_by_hand():
    torch.manual_seed(0)
    cfg = _config(scale=0.5, condition_on_labels=True)
    iface = SyntheticInterface("cut", [("h", (3,)), ("r", (2,))], cfg, num_classes=4, where="test")
    for name in ("h", "r"):
        _randomize(iface.models.grad[name], seed=len(name))
    batch = 5
    h = {"h": torch.randn(batch, 3), "r": torch.randn(batch, 2)}
    context = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3, 1]), 4).float()
    delta = {"h": torch.randn(batch, 3) / batch, "r": None}  # `r` did not reach the loss: a zero target
    # by hand: a linear synthesizer is W [h, c] + b
    lin = {n: iface.models.grad[n].net[-1] for n in ("h", "r")}
    W = {n: lin[n].weight.detach().clone() for n in lin}
    b = {n: lin[n].bias.detach().clone() for n in lin}
    pred = {n: torch.cat([h[n], context], 1) @ W[n].T + b[n] for n in lin}

    preds = iface.predict(h, context)
    grads = iface.gradient(h, context, preds, batch)
    for n in lin:
        torch.testing.assert_close(preds[n], pred[n])
        torch.testing.assert_close(grads[n], 0.5 * pred[n] / batch)  # scale * M(h, c) / batch

    loss = iface.learn(h, context, delta, batch, preds=preds)
    target = {"h": delta["h"] * batch, "r": torch.zeros(batch, 2)}
    mse = {n: ((pred[n] - target[n]) ** 2).mean() for n in lin}
    assert loss == pytest.approx(float(mse["h"] + mse["r"]), rel=1e-6)
    for n in lin:  # one SGD step on the summed MSE: dL/dW = 2 / numel * (pred - target)^T [h, c]
        err = 2 * (pred[n] - target[n]) / pred[n].numel()
        torch.testing.assert_close(lin[n].weight.detach(), W[n] - 0.1 * err.T @ torch.cat([h[n], context], 1))
        torch.testing.assert_close(lin[n].bias.detach(), b[n] - 0.1 * err.sum(0))
    p = torch.cat([pred["h"].flatten(), pred["r"].flatten()]).double()
    t = torch.cat([target["h"].flatten(), target["r"].flatten()]).double()
    assert iface.stats.cosine == pytest.approx(float(p @ t / (p.norm() * t.norm())), rel=1e-9)
    assert iface.stats.loss == pytest.approx(loss)


def test_synthetic_interface_learns_from_a_fresh_prediction_when_none_is_given():
    """The distributed runtime's path: the prediction is made again from the kept h with the models as they are."""
    torch.manual_seed(1)
    a = SyntheticInterface("cut", [("h", (4,))], _config(), num_classes=0, where="test")
    _randomize(a.models, 3)
    b = copy.deepcopy(a)
    h, delta = {"h": torch.randn(6, 4)}, {"h": torch.randn(6, 4)}
    la = a.learn(h, None, delta, 6, preds=a.predict(h, None))
    lb = b.learn(h, None, delta, 6)
    assert la == lb
    for pa, pb in zip(a.models.parameters(), b.models.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_synthetic_interface_state_dict_round_trip():
    torch.manual_seed(2)
    cfg = _config(optimizer={"name": "Adam", "lr": 1e-2, "scheduler": {"name": "StepLR", "step_size": 1}})
    a = SyntheticInterface("cut", [("h", (4,))], cfg, num_classes=0, where="test")
    h, delta = {"h": torch.randn(6, 4)}, {"h": torch.randn(6, 4)}
    for _ in range(3):
        a.learn(h, None, delta, 6)
    torch.manual_seed(99)  # another start: everything must come from the state
    b = SyntheticInterface("cut", [("h", (4,))], cfg, num_classes=0, where="test")
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.scheduler.last_epoch == a.scheduler.last_epoch == 3
    a.learn(h, None, delta, 6)
    b.learn(h, None, delta, 6)
    for pa, pb in zip(a.models.parameters(), b.models.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_synthetic_input_learns_towards_the_real_tensor():
    torch.manual_seed(3)
    si = {"model": "linear", "optimizer": {"name": "SGD", "lr": 0.1}}
    from dnicompile.spec import SyntheticInputConfig

    iface = SyntheticInterface(
        "cut",
        [("h", (3,))],
        _config(),
        0,
        "test",
        input_config=SyntheticInputConfig.model_validate(si),
        input_shape=(5,),
    )
    x, real = torch.randn(8, 5), {"h": torch.randn(8, 3)}
    model = iface.models.input["h"]
    W, b = model.net[-1].weight.detach().clone(), model.net[-1].bias.detach().clone()
    loss = iface.learn_input(iface.predict_input(x), real)
    pred = x @ W.T + b
    assert loss == pytest.approx(float(((pred - real["h"]) ** 2).mean()), rel=1e-6)
    err = 2 * (pred - real["h"]) / pred.numel()
    torch.testing.assert_close(model.net[-1].weight.detach(), W - 0.1 * err.T @ x)


def test_boundary_interface_aux_head_by_hand():
    torch.manual_seed(4)
    iface = BoundaryInterface("bptt", 6, _config(), "test", discount=1.0, aux_input=3, aux_where="aux")
    _randomize(iface.aux, 5)
    W, b = iface.aux.net[-1].weight.detach().clone(), iface.aux.net[-1].bias.detach().clone()
    out0 = torch.randn(4, 3, requires_grad=True)
    g = torch.randn(4, 6)
    loss = iface.learn_aux(out0, g, weight=0.5)
    pred = out0.detach() @ W.T + b
    assert loss == pytest.approx(float(((pred - g) ** 2).mean()), rel=1e-6)
    err = 2 * (pred - g) / pred.numel()
    torch.testing.assert_close(iface.aux.net[-1].weight.detach(), W - 0.1 * 0.5 * err.T @ out0.detach())
    torch.testing.assert_close(out0.grad, 0.5 * err @ W)  # the aux loss reaches the core, weighted
    state = copy.deepcopy(iface.state_dict())
    other = BoundaryInterface("bptt", 6, _config(), "test", discount=1.0, aux_input=3, aux_where="aux")
    other.load_state_dict(state)
    torch.testing.assert_close(other.aux.net[-1].weight, iface.aux.net[-1].weight, rtol=0, atol=0)


def test_averaged_synthesizer_experiment_is_an_interface_subclass():
    """benchmarks/dni_synth_ema.py's interface: the stage steps with the averaged synthesizer's prediction, the
    online one learns, and the average follows it (EMA with its decay); set through program.interface_classes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from dni_synth_ema import EMASyntheticInterface
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert issubclass(EMASyntheticInterface, SyntheticInterface)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    spec = {
        "inputs": {"input": {"shape": [8, 6]}},
        "cuts": [
            {
                "after": "1",
                "synthetic_gradient": {"model": "mlp", "hidden": 16, "optimizer": {"name": "SGD", "lr": 0.1}},
            }
        ],
        "stages": {"default": {"optimizer": {"name": "SGD", "lr": 0.1}}},
        "loss": "cross_entropy",
    }
    program = compile_decoupled(model, spec)
    program.interface_classes["synthetic"] = EMASyntheticInterface
    iface = program.runtime.interfaces[0]
    assert type(iface) is EMASyntheticInterface
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for _ in range(3):  # the averaged and online synthesizers drift apart
        program.train_step(x, y)
    name = program.cuts[0].boundary[0].name
    online, avg = iface.models.grad[name], iface.averaged[name]
    assert not torch.allclose(online.net[-1].weight, avg.module.net[-1].weight)
    # by hand: stage 0's gradient is d<h, scale * EMA(h) / B>/dW, with the weights before the step
    w0 = model[0].weight.detach().clone()
    b0 = model[0].bias.detach().clone()
    avg_before = copy.deepcopy(avg)
    h = torch.tanh(x @ w0.T + b0)
    g = avg_before(h, None).detach() / 8
    w = w0.clone().requires_grad_(True)
    torch.autograd.backward(torch.tanh(x @ w.T + b0), g)
    online_before = copy.deepcopy(online)
    program.train_step(x, y)
    torch.testing.assert_close(model[0].weight.grad, w.grad)
    # the average took one EMA step towards the online synthesizer after it learned
    decay = EMASyntheticInterface.decay
    expected = decay * avg_before.module.net[-1].weight + (1 - decay) * online.net[-1].weight
    torch.testing.assert_close(avg.module.net[-1].weight, expected)
    assert not torch.equal(online.net[-1].weight, online_before.net[-1].weight)
