"""cDNI's label context on a small encoder-decoder of plain torch ([Note: label context] in dnicompile/synthesizers.py).

One synthetic cut after the encoder; three float tensors cross it: the encoder's hidden states (B, S, W), S source
tokens; the decoder's embedded targets (B, T, W), the labels' T tokens; and a (1, H, S, S) position bias made from
a parameter, without a batch dimension (as T5's relative position bias). Every reference is computed by hand from
the labels, with loops, and compared with what the synthesizers' networks read during `train_step`s.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dnicompile import SpecError, compile_decoupled
from dnicompile.spec import SyntheticGradientConfig
from dnicompile.synthesizers import build_synthetic_gradient, one_hot_context

V, W, H = 7, 8, 2  # classes (the vocabulary), width, heads of the bias
T = 4  # target tokens (the labels')


class TinySeq2Seq(nn.Module):
    def __init__(self, src_len: int):
        super().__init__()
        self.src_embed, self.tgt_embed = nn.Embedding(V, W), nn.Embedding(V, W)
        self.rel = nn.Parameter(torch.randn(H, src_len, src_len))
        self.enc, self.dec, self.head = nn.Linear(W, W), nn.Linear(W, W), nn.Linear(W, V)

    def forward(self, src, tgt, labels):
        bias = torch.tanh(self.rel)[None]  # (1, H, S, S): read behind the cut only
        d = self.tgt_embed(tgt)
        e = self.enc(self.src_embed(src))  # the cut
        e = e + (torch.softmax(bias, -1) @ e[:, None]).mean(1)
        att = torch.softmax(d @ e.transpose(1, 2) / W**0.5, -1) @ e  # the decoder attends to the source
        logits = self.head(torch.tanh(self.dec(d + att)))
        return {"loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}


def _spec(src_len: int, **synth) -> dict:
    ids = {"dtype": "int64", "high": V}
    return {
        "inputs": {
            "src": {"shape": [4, src_len], **ids},
            "tgt": {"shape": [4, T], **ids},
            "labels": {"shape": [4, T], **ids},
        },
        "trace": {"frontend": "fx"},
        "cuts": [
            {
                "after": "enc",
                "synthetic_gradient": {
                    "model": "linear",
                    "condition_on_labels": True,
                    "optimizer": {"name": "Adam", "lr": 1e-2},
                    **synth,
                },
            }
        ],
        "loss": {"from_output": "loss", "labels": "labels"},
    }


def _batch(batch: int, src_len: int, g: torch.Generator):
    src = torch.randint(0, V, (batch, src_len), generator=g)
    tgt = torch.randint(0, V, (batch, T), generator=g)
    labels = torch.randint(0, V, (batch, T), generator=g)
    labels[0, 1] = -100  # ignored by the loss: no part of any context
    labels[1, :] = -100  # a sample with no label counted: an all-zero context
    return src, tgt, labels


def _one_hot(label: int) -> torch.Tensor:
    return torch.zeros(V) if label < 0 else torch.eye(V)[label]


def _sample_mean(labels: torch.Tensor, b: int) -> torch.Tensor:
    counted = [_one_hot(int(y)) for y in labels[b] if y >= 0]
    return torch.stack(counted).mean(0) if counted else torch.zeros(V)


def _batch_mean(labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([_one_hot(int(y)) for y in labels.flatten() if y >= 0]).mean(0)


def _watch(program) -> dict[str, list]:
    """What each synthesizer's network reads (its input, labels last) and what the synthesizer reads and gives,
    at every call."""
    seen: dict[str, list] = {}
    for name, synth in program.runtime.interfaces[0].models.grad.items():
        calls = seen.setdefault(name, [])
        synth.net.register_forward_pre_hook(lambda m, args, calls=calls: calls.append({"net_in": args[0].detach()}))
        synth.register_forward_hook(
            lambda m, args, out, calls=calls: calls[-1].update(h=args[0].detach(), pred=out.detach())
        )
    return seen


def test_each_tensor_reads_the_labels_as_its_axes_allow_and_the_bias_gradient_reaches_its_parameter(one_thread):
    S = 5  # source tokens: not the labels' 4
    torch.manual_seed(0)
    model = TinySeq2Seq(S)
    program = compile_decoupled(model, _spec(S))
    synths = program.runtime.interfaces[0].models.grad
    assert {n: (m.mode, m.num_classes) for n, m in synths.items()} == {
        "getitem": ("map", V),  # the bias: (H, S, S) per "sample", a map
        "tgt_embed": ("token", V),
        "enc": ("token", V),
    }
    seen = _watch(program)
    g = torch.Generator().manual_seed(1)
    for step, batch in enumerate((4, 3, 4)):
        src, tgt, labels = _batch(batch, S, g)
        result = program.train_step(src, tgt, labels)
        assert torch.isfinite(torch.tensor(result.loss))

        enc, dec, bias = seen["enc"][step], seen["tgt_embed"][step], seen["getitem"][step]
        # the encoder's tokens are not the labels': each token reads its sample's mean one-hot
        want = torch.stack([_sample_mean(labels, b) for b in range(batch) for _ in range(S)])
        torch.testing.assert_close(enc["net_in"][:, W:], want)
        assert enc["net_in"].shape == (batch * S, W + V)
        # the decoder's tokens are: token t reads label t's one-hot (zeros where ignored)
        want = torch.stack([_one_hot(int(labels[b, t])) for b in range(batch) for t in range(T)])
        torch.testing.assert_close(dec["net_in"][:, W:], want)
        # the bias has no batch dimension: every position reads the mean one-hot of the whole batch's labels
        ctx = bias["net_in"][:, H:]
        assert ctx.shape == (1, V, S, S)
        torch.testing.assert_close(ctx, _batch_mean(labels)[None, :, None, None].expand(1, V, S, S))
        # a gradient of each tensor's shape
        for call, shape in ((enc, (batch, S, W)), (dec, (batch, T, W)), (bias, (1, H, S, S))):
            assert call["h"].shape == call["pred"].shape == shape

        # the bias's synthetic gradient goes back into the parameter it was made from (stage 0 has no loss of its
        # own: rel's gradient is that alone): d tanh(rel) = 1 - tanh(rel)^2, times pred / batch (scale 1)
        want = (1 - bias["h"][0] ** 2) * bias["pred"][0] / batch
        torch.testing.assert_close(model.rel.grad, want)
        if step > 0:  # the synthesizer has learned from the true gradient: it is no longer zero
            assert bias["pred"].abs().max() > 0 and model.rel.grad.abs().max() > 0


def test_equal_lengths_are_read_as_token_aligned_unless_the_spec_says_otherwise(one_thread):
    """Shapes cannot tell the encoder's tensor from the decoder's when S == T: `auto` joins both token by token;
    `label_context` settles one tensor (`sample`: its sample's mean; `none`: no labels at all)."""
    S = T
    g = torch.Generator().manual_seed(2)
    src, tgt, labels = _batch(4, S, g)
    torch.manual_seed(0)
    auto = compile_decoupled(TinySeq2Seq(S), _spec(S))
    seen = _watch(auto)
    auto.train_step(src, tgt, labels)
    per_token = torch.stack([_one_hot(int(labels[b, t])) for b in range(4) for t in range(T)])
    torch.testing.assert_close(seen["enc"][0]["net_in"][:, W:], per_token)

    torch.manual_seed(0)
    spec = _spec(S, label_context={"enc": "sample", "getitem": "none"})
    program = compile_decoupled(TinySeq2Seq(S), spec)
    synths = program.runtime.interfaces[0].models.grad
    assert synths["getitem"].num_classes == 0 and synths["getitem"].net[0].in_channels == H
    seen = _watch(program)
    program.train_step(src, tgt, labels)
    want = torch.stack([_sample_mean(labels, b) for b in range(4) for _ in range(S)])
    torch.testing.assert_close(seen["enc"][0]["net_in"][:, W:], want)
    torch.testing.assert_close(seen["tgt_embed"][0]["net_in"][:, W:], per_token)  # not named: auto
    assert seen["getitem"][0]["net_in"].shape == (1, H, S, S)


@pytest.mark.parametrize(
    "synth, message",
    [
        ({"label_context": {"enc": "smaple"}}, "unknown label context 'smaple' (did you mean 'sample'?)"),
        (
            {"label_context": {"encc": "sample"}},
            "'encc', which is not a float tensor crossing cut `enc` (did you mean 'enc'?)",
        ),
        ({"label_context": {"enc": "sample"}, "condition_on_labels": False}, "set `condition_on_labels: true`"),
        ({"label_context": {"getitem": "token"}}, "label_context `token` joins the labels token by token"),
    ],
)
def test_label_context_errors(synth, message):
    """Errors of the spec's values at compile time; of the tensor names when the interfaces are built (the
    runtime, before the first step)."""
    with pytest.raises(SpecError) as e:
        _ = compile_decoupled(TinySeq2Seq(5), _spec(5, **synth)).runtime
    assert message in str(e.value)


def test_token_on_a_tensor_of_other_length_is_refused_at_the_step(one_thread):
    program = compile_decoupled(TinySeq2Seq(5), _spec(5, label_context={"enc": "token"}))
    with pytest.raises(ValueError, match=r"needs as many tokens as the labels: the tensor is \[4, 5, 8\]"):
        program.train_step(*_batch(4, 5, torch.Generator().manual_seed(3)))


def test_batch_for_a_shared_tensor_whose_leading_size_happens_to_be_the_batch():
    """The case shapes get wrong: a (2, 3, W) tensor shared by a batch of 2 reads as the batch's, token by token;
    `label_context: batch` gives it the whole batch's mean one-hot over the counted positions."""
    cfg = SyntheticGradientConfig(model="linear", condition_on_labels=True)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    ctx = one_hot_context(labels, V)
    h = torch.randn(2, 3, W)
    assert build_synthetic_gradient(cfg, (3, W), V, "here").context_kind(h.shape, ctx.shape) == "token"
    synth = build_synthetic_gradient(cfg, (3, W), V, "here", "batch")
    assert synth.context_kind(h.shape, ctx.shape) == "batch"
    want = (_one_hot(1) + _one_hot(2) + _one_hot(3)) / 3
    torch.testing.assert_close(synth.label_features(h, ctx), want.expand(2, V))
    assert synth(h, ctx).shape == h.shape
