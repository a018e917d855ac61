"""A program is an nn.Module (issue 20, item 2): the model's names everywhere, load_state_dict(state_dict())
round-trips, the cuts' own models under `interfaces.` when asked, and a program nests in another module."""

from __future__ import annotations

import torch
import torch.nn as nn

from dnicompile import compile_decoupled

SPEC = """
inputs: {input: {shape: [8, 12]}}
cuts:
  - after: '1'
    synthetic_gradient: {model: mlp, hidden: 16, condition_on_labels: true}
  - after: '3'
stages:
  default: {optimizer: {name: SGD, lr: 0.1}}
loss: cross_entropy
"""


def _program(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))
    return compile_decoupled(model, SPEC)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)


def test_the_program_is_a_module_with_the_models_names():
    program = _program()
    assert isinstance(program, nn.Module)
    model = program.model
    assert [n for n, _ in program.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [n for n, _ in program.named_buffers()] == [n for n, _ in model.named_buffers()]
    assert [n for n, _ in program.named_modules()] == [n for n, _ in model.named_modules()]
    assert list(program.state_dict()) == list(model.state_dict())
    nested = nn.ModuleDict({"decoupled": program})  # as a LightningModule holds it
    assert list(nested.state_dict()) == [f"decoupled.{k}" for k in model.state_dict()]
    assert program.eval() is program and not model.training and program.train() is program and model.training


def test_load_state_dict_round_trips_the_model_and_the_cut_models():
    x, y = _batch()
    trained = _program(seed=0)
    torch.manual_seed(3)
    for _ in range(3):
        trained.train_step(x, y)
    state = trained.state_dict(interfaces=True)
    cut_keys = [k for k in state if k.startswith("interfaces.")]
    assert cut_keys and all(k.startswith("interfaces.1.0.") for k in cut_keys)  # cut `1`'s gradient synthesizer

    fresh = _program(seed=9)  # other weights, another runtime
    torch.manual_seed(10)
    fresh.build_runtime()
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0, msg=k)
    h = torch.randn(8, 16)
    context = nn.functional.one_hot(y, 3).float()
    want = trained.runtime.interfaces[0].predict({"1": h}, context)
    got = fresh.runtime.interfaces[0].predict({"1": h}, context)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the model's keys alone load too (a model.pt), and what the program computes is the trained one's
    other = _program(seed=5)
    other.load_state_dict(trained.state_dict())
    trained.eval(), other.eval()
    torch.testing.assert_close(other(x), trained(x), rtol=0, atol=0)
