"""The program is the model: sizes read before a cut and used after it, and the model's own output types.

Sizes: a model reads `x.size(0)`, `x.shape[:-1]` and `B // 2` before its first cut and uses them after it (a view,
`new_zeros`, a reshape, `torch.zeros(B, ...)`, an `expand` and an `arange` of the batch size). Each stage reads
the size again from a tensor it receives, so only the one activation crosses the cut, the batch dimension
stays dynamic (the program equals the model at two batch sizes, neither the example's), and exact cuts give
plain backprop's gradients. Both front ends. A size no tensor behind the cut carries is an error that says so.

Output types: a dataclass, a namedtuple, nested dicts, tuples and lists, an OrderedDict, and a Hugging Face
`ModelOutput` (where transformers is installed) come back from the program as the model returns them; the
model's keyword inputs (with an argument between them left at its default); `loss: {from_output: loss}` by key
or field name as well as by position, in the runtime's training step.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import importlib.util
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dnicompile import compile_decoupled
from dnicompile.errors import PartitionError, SpecError

FRONTENDS = ["fx", "export"]


def _same(a, b) -> bool:
    """Equal values of equal types, all the way down (tensors by value)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    if dataclasses.is_dataclass(a):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# ----------------------------------------------------------------------------- sizes across cuts


class SizeModel(nn.Module):
    """Reads sizes before the cut after `a` (and `b`) and uses them after it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        B = x.size(0)
        lead = x.shape[:-1]
        half = B // 2
        h = self.a(x).relu()
        h = self.b(h)
        z = h.new_zeros(B, 4, 1)
        out = self.c(h.view(B, 4, 8)) + z
        return out.reshape(lead + (16,)) * half


class ExportSizeModel(nn.Module):
    """What torch.fx cannot trace and torch.export reads once, at the input: sizes in factory functions."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(8, 4)
        self.cls = nn.Parameter(torch.randn(1, 4))

    def forward(self, x):
        B, D = x.shape
        assert D == 16
        h = self.b(self.a(x).relu())
        z = torch.zeros(B, 4, 1)
        cls = self.cls.expand(B, -1)
        out = self.c(h.view(B * 4, 8)).view(B, 4, 4) + z + cls[:, :, None]
        return out.flatten(1), torch.arange(B)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_size_after_a_cut(frontend):
    torch.manual_seed(0)
    model = SizeModel()
    reference = copy.deepcopy(model)
    spec = {"inputs": {"x": {"shape": [8, 16]}}, "cuts": [{"after": "a"}], "trace": {"frontend": frontend}}
    program = compile_decoupled(model, spec)
    assert program.frontend == frontend
    # one activation crosses the cut, no size and no extra tensor (the input is not sent along for its size)
    assert [(b.shape, b.dtype) for b in program.cuts[0].boundary] == [((8, 32), torch.float32)]
    for batch in (3, 5):
        x = torch.randn(batch, 16)
        assert _same(program(x), reference(x))
    # exact cut: one backward through the program is plain backprop
    x = torch.randn(5, 16)
    program(x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_sizes_in_factory_functions_export():
    torch.manual_seed(0)
    model = ExportSizeModel()
    reference = copy.deepcopy(model)
    spec = {"inputs": {"x": {"shape": [8, 16]}}, "cuts": [{"after": "a"}, {"after": "b"}]}
    program = compile_decoupled(model, spec)  # auto: torch.fx fails at the assert
    assert program.frontend == "export"
    assert [[b.shape for b in c.boundary] for c in program.cuts] == [[(8, 32)], [(8, 32)]]
    for batch in (3, 5):
        x = torch.randn(batch, 16)
        assert _same(program(x), reference(x))
    x = torch.randn(5, 16)
    program(x)[0].pow(2).sum().backward()
    reference(x)[0].pow(2).sum().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_size_model_trains_decoupled(frontend):
    """The local runtime detaches what crosses a cut: the size is still read from it."""
    torch.manual_seed(0)
    spec = {
        "inputs": {"x": {"shape": [8, 16]}},
        "cuts": [{"after": "a", "synthetic_gradient": {"model": "linear"}}],
        "loss": "mse",
        "trace": {"frontend": frontend},
    }
    program = compile_decoupled(SizeModel(), spec)
    for batch in (4, 6):
        result = program.train_step(torch.randn(batch, 16), torch.randn(batch, 16))
        assert torch.isfinite(torch.tensor(result.loss))
        assert result.output.shape == (batch, 16)


class WithAux(nn.Module):
    """A leaf module that returns a tensor and None."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x), None


class OtherValues(nn.Module):
    """Unpacked sizes, a dimension count, a bool and a None, read before the cut and used after it."""

    def __init__(self):
        super().__init__()
        self.m = WithAux()
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        B, T, C = x.size()
        ndim = x.dim()
        is_float = x.is_floating_point()
        h, bias = self.m(x)
        h = F.linear(h.relu(), self.head.weight, bias)  # bias is None
        return h.reshape(B * T, C) * ndim * is_float


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_other_non_tensor_values_after_a_cut(frontend):
    model = OtherValues()
    spec = {
        "inputs": {"x": {"shape": [4, 5, 8]}},
        "cuts": [{"after": "m"}],
        "trace": {"frontend": frontend, "leaf_modules": ["m"] if frontend == "fx" else []},
    }
    program = compile_decoupled(model, spec)
    assert [b.shape for b in program.cuts[0].boundary] == [(4, 5, 8)]
    # torch.export fixes every dimension but the batch; the fx program reads T again too
    for shape in ((2, 5, 8), (6, 5, 8)) if frontend == "export" else ((2, 3, 8), (6, 7, 8)):
        x = torch.randn(shape)
        assert torch.allclose(program(x), model(x))


class Reduce(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 4)

    def forward(self, x):
        B = x.size(0)
        h = self.a(x.sum(0))  # no batch dimension from here on
        return self.b(h).expand(B, -1)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_size_no_tensor_carries_is_an_error(frontend):
    spec = {"inputs": {"x": {"shape": [8, 16]}}, "cuts": [{"after": "a"}], "trace": {"frontend": frontend}}
    with pytest.raises(PartitionError) as e:
        compile_decoupled(Reduce(), spec)
    text = str(e.value)
    assert "crosses the cut after `a`" in text
    assert "dimension 0 of input `x`" in text
    assert "has that size in its shape" in text


class TwoHeads(nn.Module):
    """A module that returns a tuple, cut right after it: its elements cross, not the tuple."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 4)

    def forward(self, x):
        left, right = self.a(x).chunk(2, dim=-1)
        return self.b(left) * self.c(right)


def test_tuple_of_tensors_across_a_cut():
    model = TwoHeads()
    spec = {"inputs": {"x": {"shape": [8, 8]}}, "cuts": [{"after": "chunk"}], "trace": {"frontend": "fx"}}
    program = compile_decoupled(model, spec)
    assert [b.shape for b in program.cuts[0].boundary] == [(8, 4), (8, 4)]
    x = torch.randn(3, 8)
    assert torch.allclose(program(x), model(x))


# ----------------------------------------------------------------------------- output types


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden: tuple = ()


class Pair(NamedTuple):
    logits: torch.Tensor
    loss: torch.Tensor


class Returns(nn.Module):
    """Returns its result as `kind` says."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 4)

    def forward(self, x):
        h = self.a(x).relu()
        logits = self.b(h)
        loss = logits.pow(2).mean()
        if self.kind == "dataclass":
            return Out(logits, loss, (h, {"h2": h * 2}))
        if self.kind == "namedtuple":
            return Pair(logits, loss)
        if self.kind == "nested":
            return {"out": (logits, {"loss": loss}), "all": [h, Pair(logits, loss)]}
        if self.kind == "ordered":
            return collections.OrderedDict(logits=logits, loss=loss)
        return logits, loss


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("kind", ["dataclass", "namedtuple", "nested", "ordered", "tuple"])
def test_output_type_round_trips(kind, frontend):
    torch.manual_seed(0)
    model = Returns(kind)
    spec = {"inputs": {"x": {"shape": [8, 16]}}, "cuts": [{"after": "a"}], "trace": {"frontend": frontend}}
    program = compile_decoupled(model, spec)
    x = torch.randn(5, 16)
    got, expected = program(x), model(x)
    assert type(got) is type(expected)
    assert _same(got, expected)


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("kind,key", [("dataclass", "loss"), ("namedtuple", "loss"), ("namedtuple", 1), ("tuple", 1)])
def test_loss_from_output_by_key_field_or_position(kind, key, frontend):
    torch.manual_seed(0)
    model = Returns(kind)
    reference = copy.deepcopy(model)
    spec = {
        "inputs": {"x": {"shape": [8, 16]}},
        "cuts": [{"after": "a"}],
        "loss": {"from_output": key},
        "stages": {"default": {"optimizer": {"name": "SGD", "lr": 0.1}}},
        "trace": {"frontend": frontend},
    }
    program = compile_decoupled(model, spec)
    x = torch.randn(5, 16)
    result = program.train_step(x)
    # an exact cut and SGD: one step of the program is one step of plain backprop on the model's own loss
    out = reference(x)
    loss = out.loss if kind != "tuple" else out[1]
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_loss_from_output_unknown_field_names_the_fields():
    spec = {"inputs": {"x": {"shape": [8, 16]}}, "cuts": [{"after": "a"}], "loss": {"from_output": "los"}}
    with pytest.raises(SpecError) as e:
        compile_decoupled(Returns("dataclass"), spec)
    assert "Out with fields ['logits', 'loss', 'hidden']" in str(e.value)


class KeywordModel(nn.Module):
    """Hugging Face style: keyword inputs, an argument between them left at its default, the loss when labels
    are given, and a dataclass output."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50)

    def forward(self, input_ids, past_key_values=None, attention_mask=None, labels=None, return_dict=True):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        B, T = input_ids.shape
        h = self.block(h).relu().view(B, T, 16)
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), labels.view(-1))
        return Out(logits=logits, loss=loss) if return_dict else (loss, logits)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_keyword_inputs(frontend):
    torch.manual_seed(0)
    model = KeywordModel()
    spec = {
        "inputs": {
            "input_ids": {"shape": [4, 6], "dtype": "int64", "high": 50},
            "attention_mask": {"shape": [4, 6], "dtype": "float32"},
            "labels": {"shape": [4, 6], "dtype": "int64", "high": 50},
        },
        "cuts": [{"after": "block", "synthetic_gradient": {"model": "linear", "condition_on_labels": False}}],
        "loss": {"from_output": "loss", "labels": "labels"},
        "trace": {"frontend": frontend},
    }
    program = compile_decoupled(model, spec)
    assert program.input_names == ("input_ids", "attention_mask", "labels")
    ids, labels = torch.randint(0, 50, (3, 6)), torch.randint(0, 50, (3, 6))
    mask = torch.ones(3, 6)
    got = program(input_ids=ids, attention_mask=mask, labels=labels)
    assert _same(got, model(input_ids=ids, attention_mask=mask, labels=labels))
    assert _same(program(ids, mask, labels=labels), got)
    with pytest.raises(TypeError, match="given twice"):
        program(ids, input_ids=ids, attention_mask=mask, labels=labels)
    result = program.train_step(ids, mask, labels)
    assert result.loss == pytest.approx(got.loss.item(), rel=1e-5)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_keyword_inputs_with_a_concrete_flag(frontend):
    """A flag fixed by `trace: {concrete_args: ...}` (`use_cache: false`, `return_dict: false`) is not an input."""
    torch.manual_seed(0)
    model = KeywordModel()
    spec = {
        "inputs": {
            "input_ids": {"shape": [4, 6], "dtype": "int64", "high": 50},
            "labels": {"shape": [4, 6], "dtype": "int64", "high": 50},
        },
        "cuts": [{"after": "block"}],
        "loss": {"from_output": 0, "labels": "labels"},
        "trace": {"frontend": frontend, "concrete_args": {"return_dict": False}},
    }
    program = compile_decoupled(model, spec)
    assert program.input_names == ("input_ids", "labels")
    ids, labels = torch.randint(0, 50, (3, 6)), torch.randint(0, 50, (3, 6))
    got = program(ids, labels=labels)
    assert _same(got, model(ids, labels=labels, return_dict=False))
    assert program.train_step(ids, labels).loss == pytest.approx(got[0].item(), rel=1e-5)


# ----------------------------------------------------------------------------- Hugging Face ModelOutput

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (pip install transformers)")
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_model_output_round_trips(frontend):
    from transformers.modeling_outputs import CausalLMOutput

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.block = nn.Linear(16, 16)
            self.head = nn.Linear(16, 50)

        def forward(self, input_ids, labels=None):
            h = self.block(self.embed(input_ids)).relu()
            logits = self.head(h)
            loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten())
            return CausalLMOutput(loss=loss, logits=logits, hidden_states=(h,))

    torch.manual_seed(0)
    model = LM()
    ids = {"shape": [4, 6], "dtype": "int64", "high": 50}
    for inputs, key in (({"input_ids": ids}, None), ({"input_ids": ids, "labels": ids}, "loss")):
        spec = {"inputs": inputs, "cuts": [{"after": "block"}], "trace": {"frontend": frontend}}
        if key:
            spec["loss"] = {"from_output": key, "labels": "labels"}
        program = compile_decoupled(model, spec)
        args = [torch.randint(0, 50, (3, 6)) for _ in inputs]
        got, expected = program(*args), model(*args)
        assert type(got) is CausalLMOutput
        assert list(got.keys()) == list(expected.keys())
        assert _same(got.to_tuple(), expected.to_tuple())
        assert torch.equal(got.logits, expected.logits) and torch.equal(got[0], expected[0])
        if key:
            assert program.train_step(*args).loss == pytest.approx(expected.loss.item(), rel=1e-5)
