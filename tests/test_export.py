"""The torch.export front end, against plain PyTorch on the same models.

The models are ones torch.fx cannot trace (examples/gpt.py, examples/untraceable.py): each compiles with the
default `frontend: auto`, which falls back to torch.export and says why. For each: program(...) equals the model
in train mode (same dropout masks from the same seed) and in eval mode; exact cuts leave plain backprop's
gradients; a few training steps equal eager training, parameters and buffers (batch-norm statistics, the
tied GPT embedding) alike; the stages hold the model's own tensors under the model's names.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dnicompile import compile_decoupled, load_spec
from dnicompile.cli import main
from dnicompile.compile.model_file import load_module
from dnicompile.errors import ModelError

ROOT = Path(__file__).resolve().parent.parent
GPT = load_module(ROOT / "examples" / "gpt.py")
UNTRACEABLE = load_module(ROOT / "examples" / "untraceable.py")
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
BATCH = 6


def _gpt():
    return GPT.build_model(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)


def _tokens(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 65, shape, generator=g)


def _floats(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# name -> (factory, spec, batch maker(seed) -> (inputs, labels), model-computes-its-loss)
CASES = {
    "gpt": (
        _gpt,
        {
            "inputs": {
                "idx": {"shape": [8, 16], "dtype": "int64", "high": 65},
                "targets": {"shape": [8, 16], "dtype": "int64", "high": 65},
            },
            "cuts": [{"after": "transformer.h.0"}, {"after": "transformer.h.1"}],
            "loss": {"from_output": 1, "labels": "targets"},
        },
        lambda seed: ((_tokens((BATCH, 16), seed), _tokens((BATCH, 16), seed + 100)), None),
        True,
    ),
    "size_branch": (
        UNTRACEABLE.build_size_branch,
        {"inputs": {"x": {"shape": [8, 784]}}, "cuts": [{"after": "conv1"}, {"after": "conv2"}]},
        lambda seed: ((_floats((BATCH, 784), seed),), _tokens((BATCH,), seed) % 10),
        False,
    ),
    "bn_dropout": (
        UNTRACEABLE.build_bn_dropout,
        {"inputs": {"x": {"shape": [8, 32]}}, "cuts": [{"after": f"layers.{i}"} for i in range(3)]},
        lambda seed: ((_floats((BATCH, 32), seed),), _tokens((BATCH,), seed) % 10),
        False,
    ),
    "helper": (
        UNTRACEABLE.build_helper,
        {"inputs": {"x": {"shape": [8, 6, 16]}}, "cuts": [{"after": "qkv"}, {"after": "mlp"}]},
        lambda seed: ((_floats((BATCH, 6, 16), seed),), _tokens((BATCH,), seed) % 5),
        False,
    ),
}


def _loss(out, labels, own_loss: bool) -> torch.Tensor:
    return out[1] if own_loss else F.cross_entropy(out, labels)


@pytest.fixture(scope="module", params=list(CASES))
def compiled(request):
    factory, spec, batch, own_loss = CASES[request.param]
    torch.manual_seed(0)
    model = factory()
    program = compile_decoupled(model, {**spec, "stages": {"default": {"optimizer": {"name": "Adam", "lr": 1e-2}}}})
    return request.param, model, program, batch, own_loss


def test_auto_falls_back_to_export_and_says_why(compiled):
    name, model, program, _, _ = compiled
    assert program.frontend == "export"
    assert program.frontend_reason.startswith("auto: torch.fx failed at ")
    assert program.frontend_reason.endswith(", torch.export worked")
    assert ("examples/gpt.py:" if name == "gpt" else "examples/untraceable.py:") in program.frontend_reason
    assert "front end: export, auto: torch.fx failed at" in " ".join(program.summary().split())


def test_forward_equals_model_in_train_and_eval_mode(compiled):
    _, model, program, batch, _ = compiled
    inputs, _ = batch(1)
    for train in (True, False):
        program.train(train)
        reference = copy.deepcopy(model)  # same weights and buffers; its forward must not touch ours
        with torch.no_grad():
            torch.manual_seed(7)
            expected = reference(*inputs)
            torch.manual_seed(7)  # the same dropout masks: the graph draws them in the model's order
            got = program(*inputs)
        torch.testing.assert_close(got, expected, msg=lambda m, t=train: f"train={t}: {m}")
        for (key, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
            torch.testing.assert_close(ours, theirs, msg=lambda m, k=key, t=train: f"buffer {k}, train={t}: {m}")
    program.train()


def _import_emitted(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"emitted_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_emitted_stage_files_import_on_their_own_and_compute_the_program(compiled, tmp_path):
    """[Note: emitted stage files] `--emit`'s stage_<i>.py import on their own (from dnicompile only the export
    front end's helpers their code calls); StageI(model), chained on the boundary tensors, computes the model's
    output (eval mode), on the model's own tensors."""
    from torch.utils._pytree import tree_leaves

    from dnicompile.inspect import write_emit

    _, model, program, batch, _ = compiled
    write_emit(program, tmp_path)
    stages = [
        getattr(_import_emitted(tmp_path / f"stage_{s.index}.py"), f"Stage{s.index}")(model) for s in program.stages
    ]
    for s in program.stages:
        text = (tmp_path / f"stage_{s.index}.py").read_text()
        assert {line for line in text.splitlines() if "import" in line and "dnicompile" in line} <= {
            "from dnicompile.compile.export import when_training as dnicompile_compile_export_when_training",
            "from dnicompile.compile.export import dropout_p as dnicompile_compile_export_dropout_p",
        }
    assert {id(p) for st in stages for p in st.parameters()} <= {id(p) for p in model.parameters()}
    inputs, _ = batch(1)
    program.eval()
    with torch.no_grad():
        values = inputs
        for stage in stages:
            values = stage.eval()(*values)
        expected = model.eval()(*inputs)
    program.train(), model.train()
    for got, want in zip(tree_leaves(values), tree_leaves(expected), strict=True):
        torch.testing.assert_close(got, want)


def test_emitted_stage_files_of_the_fx_front_end_need_only_torch(tmp_path):
    from dnicompile.inspect import write_emit

    torch.manual_seed(0)
    model = _MLP()
    program = compile_decoupled(model, {"inputs": {"x": {"shape": [4, 8]}}, "cuts": [{"after": "layers.1"}]})
    assert program.frontend == "fx"
    write_emit(program, tmp_path)
    assert "dnicompile" not in "".join(p.read_text() for p in tmp_path.glob("stage_*.py"))
    stage0, stage1 = (_import_emitted(tmp_path / f"stage_{i}.py") for i in (0, 1))
    x = torch.randn(5, 8)
    torch.testing.assert_close(stage1.Stage1(model)(*stage0.Stage0(model)(x)), model(x))


def test_batch_dimension_stays_dynamic(compiled):
    _, model, program, batch, _ = compiled
    inputs, _ = batch(2)
    small = tuple(t[:3] for t in inputs)  # the spec traced a batch of 8
    program.eval()
    with torch.no_grad():
        torch.testing.assert_close(program(*small), copy.deepcopy(model)(*small))
    program.train()


def test_exact_cuts_give_backprop_gradients(compiled):
    _, model, program, batch, own_loss = compiled
    inputs, labels = batch(3)
    reference = copy.deepcopy(model)
    for m in (model, reference):
        m.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    _loss(reference(*inputs), labels, own_loss).backward()
    torch.manual_seed(11)
    _loss(program(*inputs), labels, own_loss).backward()
    ours = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        assert ours[name].grad is not None, name
        torch.testing.assert_close(ours[name].grad, p.grad, msg=lambda m, n=name: f"grad of {n}: {m}")
    model.zero_grad(set_to_none=True)


def test_training_steps_equal_eager_training(compiled):
    """train_step with exact cuts == the same Adam steps in eager PyTorch: parameters, batch-norm statistics
    and the tied GPT embedding (used by stage 0, updated once per step by the last stage)."""
    _, model, program, batch, own_loss = compiled
    reference = copy.deepcopy(model)
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for step in range(3):
        inputs, labels = batch(10 + step)
        torch.manual_seed(step)
        result = program.train_step(*inputs) if own_loss else program.train_step(*inputs, labels)
        torch.manual_seed(step)
        opt.zero_grad()
        loss = _loss(reference(*inputs), labels, own_loss)
        loss.backward()
        opt.step()
        assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], msg=lambda m, k=key: f"{k}: {m}")


def test_stages_hold_the_models_own_tensors(compiled):
    _, model, program, _, _ = compiled
    model_keys = set(model.state_dict())
    for stage in program.stages:
        gm = stage.graph_module
        for name, p in gm.named_parameters():
            assert p is model.get_parameter(name), f"{stage.name}: {name} is a copy"
        for name, b in gm.named_buffers():
            if not name.startswith("_export_constant_"):
                assert b is model.get_buffer(name), f"{stage.name}: buffer {name} is a copy"
        assert set(gm.state_dict()) <= model_keys, set(gm.state_dict()) - model_keys
    assert {id(p) for p in program.parameters()} == {id(p) for p in model.parameters()}
    assert program.state_dict().keys() == model.state_dict().keys()


def test_moving_the_program_keeps_the_stages_on_the_models_buffers():
    """program.to(...) moves the model; Module.to makes new buffer tensors, and the stages follow them."""
    torch.manual_seed(0)
    model = UNTRACEABLE.build_bn_dropout()
    program = compile_decoupled(model, CASES["bn_dropout"][1])
    program.to(torch.float64)
    for stage in program.stages:
        for name, b in stage.graph_module.named_buffers():
            assert b is model.get_buffer(name) and (b.dtype == torch.float64 or not b.is_floating_point()), name
    x = _floats((BATCH, 32), 0).double()
    program.eval()
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x))


# ----------------------------------------------------------------------------- front-end choice and errors


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.layers(x))


def test_export_front_end_on_a_model_fx_can_trace_too():
    torch.manual_seed(0)
    model = _MLP()
    spec = {"inputs": {"x": {"shape": [4, 8]}}, "trace": {"frontend": "export"}, "cuts": [{"after": "linear_1"}]}
    program = compile_decoupled(model, spec)
    assert program.frontend == "export" and program.frontend_reason == "as the spec asks"
    assert program.cuts[0].node == "linear_1"  # a cut by node name of the exported graph
    x = torch.randn(5, 8)
    torch.testing.assert_close(program(x), model(x))
    auto = compile_decoupled(model, {**spec, "trace": {}, "cuts": [{"after": "layers.2"}]})
    assert auto.frontend == "fx" and auto.frontend_reason == "auto: torch.fx traced the model"


def test_fx_front_end_does_not_fall_back():
    spec = {**CASES["gpt"][1], "trace": {"frontend": "fx"}}
    with pytest.raises(ModelError, match="torch.fx could not trace GPT at .*gpt.py:") as info:
        compile_decoupled(_gpt(), spec)
    assert "torch.export" not in str(info.value)


class _KeywordTargets(nn.Module):
    """Labels as a keyword-only input, the loss computed inside, a dict returned."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x, *, targets):
        assert x.shape[-1] == 6
        logits = self.b(torch.relu(self.a(x)))
        return {"logits": logits, "loss": F.cross_entropy(logits, targets)}


def test_keyword_only_targets_and_a_dict_output_with_the_models_loss():
    torch.manual_seed(0)
    model = _KeywordTargets()
    reference = copy.deepcopy(model)
    spec = {
        "inputs": {"x": {"shape": [5, 6]}, "targets": {"shape": [5], "dtype": "int64", "high": 3}},
        "cuts": [{"after": "a"}],
        "loss": {"from_output": "loss", "labels": "targets"},
        "stages": {"default": {"optimizer": {"name": "SGD", "lr": 0.1}}},
    }
    program = compile_decoupled(model, spec)
    assert program.frontend == "export" and program.input_names == ("x", "targets")
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(2):
        x, y = _floats((4, 6), step), _tokens((4,), step) % 3
        torch.testing.assert_close(program(x, y), reference(x, targets=y))
        result = program.train_step(x, y)  # both are inputs; `targets` also gives the labels
        opt.zero_grad()
        loss = reference(x, targets=y)["loss"]
        loss.backward()
        opt.step()
        assert result.loss == pytest.approx(loss.item(), rel=1e-6)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(8, 8)
        self.post = nn.Linear(8, 8)

    def forward(self, x):
        h = self.pre(x)
        if h.sum() > 0:  # a branch on a tensor's value: neither front end can trace it
            h = -h
        return self.post(h)


def test_when_both_front_ends_fail_the_error_gives_both_reasons_and_the_line():
    spec = {"inputs": {"x": {"shape": [2, 8]}}, "cuts": [{"after": "pre"}]}
    with pytest.raises(ModelError) as info:
        compile_decoupled(_DataDependent(), spec)
    text = str(info.value)
    assert "neither front end could trace _DataDependent" in text
    assert "torch.fx:" in text and "torch.export:" in text
    assert text.count("test_export.py:") >= 2 and "`if h.sum() > 0:" in text
    assert "What to do:" in text and "torch.where" in text


class _TrainOnlyBranch(nn.Module):
    """Drop-path written with `if self.training`: export fixes the branch at train mode."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        assert x.shape[-1] == 8
        h = self.lin(x)
        if self.training:
            h = h * (torch.rand(h.shape[0], 1) > 0.5) * 2.0
        return x + h


def test_a_train_only_branch_export_cannot_follow_is_reported():
    spec = {"inputs": {"x": {"shape": [4, 8]}}, "cuts": [{"after": "lin"}]}
    with pytest.raises(ModelError, match="in eval mode the graph does not compute what model.eval"):
        compile_decoupled(_TrainOnlyBranch(), spec)


def test_gpt_specs_cut_between_real_blocks():
    for name, cuts in (("gpt_cdni.yaml", 1), ("gpt_backprop.yaml", 4)):
        spec = load_spec(ROOT / "specs" / name)
        model = GPT.build_model(**spec.model_args)
        modules = dict(model.named_modules())
        assert len(spec.cuts) == cuts and all(c.after in modules for c in spec.cuts), name
        assert spec.loss.from_output == 1 and spec.loss.labels == "targets"


def test_cli_shows_front_end_and_tied_tensor(capsys):
    spec, stages = "gpt_cdni.yaml", 2
    assert main([str(ROOT / "examples" / "gpt.py"), "--spec", str(ROOT / "specs" / spec)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"GPT: {stages} stages" in out
    assert "front end: export, auto: torch.fx failed at" in out and "gpt.py:" in out
    used = ", ".join(f"stage{s}" for s in (0, stages - 1))
    owner = f"stage{stages - 1}"
    assert f"tied: transformer.wte.weight = lm_head.weight [65, 64], used by {used}; updated by {owner}" in out


# ----------------------------------------------------------------------------- tiny Shakespeare


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not found")
def test_cdni_gpt_learns_tiny_shakespeare(one_thread):
    """A short cDNI run of the GPT (a synthetic gradient at the cut, the tied embedding across it) learns."""
    spec = {
        "model_args": {"vocab_size": 65, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32},
        "inputs": {
            "idx": {"shape": [16, 32], "dtype": "int64", "high": 65},
            "targets": {"shape": [16, 32], "dtype": "int64", "high": 65},
        },
        "cuts": [
            {
                "after": "transformer.h.0",
                "synthetic_gradient": {
                    "model": "mlp",
                    "hidden": 128,
                    "layers": 1,
                    "condition_on_labels": True,
                    "optimizer": {"name": "Adam", "lr": 1e-3},
                },
            }
        ],
        "loss": {"from_output": 1, "labels": "targets"},
        "stages": {"default": {"optimizer": {"name": "AdamW", "lr": 3e-3}}},
    }
    history = GPT.train_shakespeare(SHAKESPEARE, spec, steps=300, batch_size=16, log=None)
    start, end = history["val_start"], history["val_end"]
    assert start > 4.0  # log(65) = 4.17: the model starts out guessing
    assert end < start - 1.0, f"validation loss {start:.3f} -> {end:.3f}"
    first, last = history["train"][:20], history["train"][-20:]
    assert sum(last) / 20 < sum(first) / 20 - 0.7
