"""Stage precision ([Note: stage precision]): `stages: {...: {precision: bf16}}` runs a stage's forward under
torch.autocast(bfloat16) with fp32 parameters and optimizer. Compared with plain PyTorch doing the same: the whole
model under autocast, trained with the same optimizer, and a delayed cut's late backward under autocast too."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dnicompile import compile_decoupled


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def _spec(stages, cuts=None):
    return {
        "inputs": {"input": {"shape": [8, 12]}},
        "cuts": cuts or [{"after": "1"}, {"after": "3"}],
        "stages": {"default": {"optimizer": {"name": "Adam", "lr": 1e-2}}, **stages},
    }


def _batches(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def test_bf16_stages_train_like_the_model_under_autocast():
    model = _mlp()
    reference = copy.deepcopy(model)
    program = compile_decoupled(
        model, _spec({"default": {"optimizer": {"name": "Adam", "lr": 1e-2}, "precision": "bf16"}})
    )
    assert [s.precision for s in program.stages] == ["bf16"] * 3
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for x, y in _batches():
        result = program.train_step(x, y)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = reference(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        assert result.loss == pytest.approx(loss.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    # and it is not fp32 training: the same steps without autocast end elsewhere
    fp32 = _mlp()
    program32 = compile_decoupled(fp32, _spec({}))
    for x, y in _batches():
        program32.train_step(x, y)
    assert not torch.equal(fp32[0].weight, model[0].weight)


def test_one_bf16_stage_and_a_delayed_late_backward():
    """Stage 0 in bf16 behind a delayed cut whose late backward runs the forward again (recompute): the stage's
    output is the model's first layers under autocast, widened to fp32, and training runs close to, not equal to,
    the fp32 program of the same spec."""
    cuts = [{"after": "1", "delayed_gradient": {"delay": 1, "weights": "recompute"}}, {"after": "3"}]
    model = _mlp()
    program = compile_decoupled(model, _spec({"0": {"precision": "bf16"}}, cuts))
    assert [s.precision for s in program.stages] == ["bf16", "fp32", "fp32"]
    x, _ = _batches(1)[0]
    (h,) = program.stages[0](x)
    assert h.dtype == torch.float32  # what leaves the stage is fp32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model[1](model[0](x)).float()
    torch.testing.assert_close(h.detach(), expected, rtol=0, atol=0)
    for x, y in _batches():
        program.train_step(x, y)
    fp32 = _mlp()
    other = compile_decoupled(fp32, _spec({}, cuts))
    for x, y in _batches():
        other.train_step(x, y)
    assert not torch.equal(fp32[0].weight, model[0].weight)
    torch.testing.assert_close(fp32[0].weight, model[0].weight, rtol=0.05, atol=0.05)  # close: the same method


@pytest.mark.parametrize("init_scale", [2.0**16, 2.0**40], ids=["default-scale", "overflowing-scale"])
def test_fp16_stages_with_their_scalers_train_like_the_model_with_a_grad_scaler(init_scale):
    """Every stage fp16 with a gradient scaler of its own, exact cuts: plain PyTorch under fp16 autocast with one
    torch.amp.GradScaler, to the bit (the scales are powers of two). At 2**40 the scaled gradients overflow fp16:
    both skip the same first updates and halve their scales until they fit."""
    model = _mlp()
    reference = copy.deepcopy(model)
    program = compile_decoupled(
        model, _spec({"default": {"optimizer": {"name": "Adam", "lr": 1e-2}, "precision": "fp16"}})
    )
    for stage in program.stages:
        stage.grad_scaler("cpu").load_state_dict({**torch.amp.GradScaler("cpu").state_dict(), "scale": init_scale})
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    skipped = 0
    for x, y in _batches(6):
        before = [p.clone() for p in model.parameters()]
        result = program.train_step(x, y)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = reference(x)
        loss = F.cross_entropy(out.float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        skipped += all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert result.loss == pytest.approx(loss.item(), rel=1e-6)
        assert [s.scaler.get_scale() for s in program.stages] == [scaler.get_scale()] * 3
    assert (skipped > 0) == (init_scale > 2.0**16)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_one_fp16_stage_behind_a_delayed_cut_keeps_its_scale_in_the_checkpoint():
    """Stage 0 fp16 behind a delayed cut (its backward a step late, unscaled by the scale of that step): it trains
    close to the fp32 program of the same spec, and the scaler's state is in the runtime's state."""
    cuts = [{"after": "1", "delayed_gradient": {"delay": 1, "weights": "stash"}}, {"after": "3"}]
    model = _mlp()
    program = compile_decoupled(model, _spec({"0": {"precision": "fp16"}}, cuts))
    for x, y in _batches():
        program.train_step(x, y)
    state = program.runtime.state_dict()
    assert state["stages"][0]["scaler"]["scale"] == program.stages[0].scaler.get_scale()
    assert "scaler" not in state["stages"][1]
    fp32 = _mlp()
    other = compile_decoupled(fp32, _spec({}, cuts))
    for x, y in _batches():
        other.train_step(x, y)
    assert not torch.equal(fp32[0].weight, model[0].weight)
    torch.testing.assert_close(fp32[0].weight, model[0].weight, rtol=0.05, atol=0.05)


def test_the_stage_table_shows_precision_and_clipping(capsys):
    from rich.console import Console

    from dnicompile.describe import summary_table

    stages = {"0": {"precision": "bf16", "optimizer": {"name": "SGD", "lr": 0.1, "clip_grad_norm": 1.0}}}
    Console(width=200).print(summary_table(compile_decoupled(_mlp(), _spec(stages))))
    out = capsys.readouterr().out
    assert "SGD(lr=0.1, clip_grad_norm=1), bf16" in out
    assert out.count("bf16") == 1
