"""Recurrent programs: truncated BPTT with synthetic gradients, the copy tasks, text, hierarchical clocks.

Every training check compares with plain PyTorch written out by hand (a truncated-BPTT loop, full BPTT over
the sequence), never with stored numbers.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dnicompile.cli import main
from dnicompile.recurrent import compile_recurrent
from dnicompile.spec import load_spec
from dnicompile.train.tasks import CopyTask, Curriculum, TextStreams, load_text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


# --------------------------------------------------------------------------- models
class CellModel(nn.Module):
    """readout(cell(x_t, state)) step by step, the way people write a cell-based RNN."""

    def __init__(self, cell: nn.Module, hidden: int, outputs: int):
        super().__init__()
        self.core = cell
        self.readout = nn.Linear(hidden, outputs)

    def forward(self, x):
        state, outs = None, []
        for t in range(x.shape[1]):
            if isinstance(self.core, nn.LSTMCell):
                state = self.core(x[:, t], state)
                outs.append(state[0])
            else:
                state = self.core(x[:, t], state)
                outs.append(state)
        return self.readout(torch.stack(outs, 1))


class SeqModel(nn.Module):
    def __init__(self, inputs: int, hidden: int, outputs: int, layers: int = 1):
        super().__init__()
        self.core = nn.LSTM(inputs, hidden, num_layers=layers, batch_first=True)
        self.readout = nn.Linear(hidden, outputs)

    def forward(self, x):
        return self.readout(self.core(x)[0])


class LinearCell(nn.Module):
    """h' = W h + U x: a linear RNN cell of our own."""

    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.hidden_size = hidden
        self.U = nn.Linear(inputs, hidden, bias=False)
        self.W = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x, h=None):
        h = torch.zeros(x.shape[0], self.hidden_size, dtype=x.dtype) if h is None else h
        return self.W(h) + self.U(x)


class ZeroSynth(nn.Module):
    """A synthetic-gradient model that always predicts zero (spec: 'test_recurrent:ZeroSynth')."""

    def __init__(self, shape, context, cfg):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, h, context=None):
        return torch.zeros_like(h) + 0 * self.w


def spec_yaml(core="core", sg="null", truncation=3, aux="false", extra="", lr=0.1, opt="SGD"):
    return (
        textwrap.dedent(f"""\
        recurrent: {{core: {core}, output: readout}}
        bptt: {{truncation: {truncation}, synthetic_gradient: {sg}, aux: {aux}}}
        stages: {{default: {{optimizer: {{name: {opt}, lr: {lr}}}}}}}
        loss: binary_cross_entropy
        """)
        + extra
    )


# --------------------------------------------------------------------------- reference: truncated BPTT by hand
def hand_tbptt(model: nn.Module, x, y, mask, T: int, lr: float):
    """Plain truncated BPTT, written out: per segment, unroll from the detached state, backward, SGD step.
    Returns each segment's gradients (name -> tensor)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    core = model.core
    b, length = x.shape[:2]
    z = {"dtype": x.dtype}
    if isinstance(core, nn.LSTM):
        state = (torch.zeros(core.num_layers, b, core.hidden_size, **z),) * 2
    elif isinstance(core, nn.LSTMCell):
        state = (torch.zeros(b, core.hidden_size, **z),) * 2
    else:
        state = torch.zeros(b, core.hidden_size, **z)
    grads = []
    for a in range(0, length, T):
        e = min(a + T, length)
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        if isinstance(core, nn.LSTM):
            out, state = core(x[:, a:e], state)
        else:
            outs = []
            for t in range(a, e):
                state = core(x[:, t], state)
                outs.append(state[0] if isinstance(state, tuple) else state)
            out = torch.stack(outs, 1)
        logits = model.readout(out)
        per_step = F.binary_cross_entropy_with_logits(logits, y[:, a:e], reduction="none").sum(-1) * mask[:, a:e]
        loss = per_step.sum(1).mean() / T
        opt.zero_grad()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return grads


def program_segment_grads(program):
    """Record the model's gradients at every optimizer step of the program's core."""
    grads = []
    opt = program.runtime.stages[0].optimizer
    names = {id(p): n for n, p in program.model.named_parameters()}

    def hook(optimizer, args, kwargs):
        grads.append({names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"]})

    opt.register_step_pre_hook(hook)
    return grads


def copy_batch(bits=4, n=3, batch=6, seed=0):
    b = CopyTask(bits, seed=seed).batch(batch, n)
    return b.x.double(), b.y.double(), b.mask.double()


@pytest.mark.parametrize(
    "make, sg",
    [
        (lambda: CellModel(nn.LSTMCell(5, 8), 8, 4), "{model: 'test_recurrent:ZeroSynth'}"),
        (lambda: CellModel(nn.RNNCell(5, 8), 8, 4), "{model: linear, scale: 0.0}"),
        (lambda: SeqModel(5, 8, 4, layers=2), "{model: mlp, hidden: 16, scale: 0.0}"),
        (lambda: SeqModel(5, 8, 4), "null"),
    ],
    ids=["lstm-cell-zero-synth", "rnn-cell-scale-0", "lstm-2-layers-mlp-scale-0", "lstm-no-synth"],
)
def test_zero_synthesizer_is_truncated_bptt(make, sg):
    torch.manual_seed(0)
    model = make().double()
    reference = copy.deepcopy(model)
    x, y, mask = copy_batch(bits=4, n=3)  # 7 steps: segments of 3, 3, 1
    # 'test_recurrent:ZeroSynth' imports this module: a spec may do that only when allowed
    program = compile_recurrent(model, load_spec(spec_yaml(sg=sg, truncation=3), allow_imports=True))
    got = program_segment_grads(program)
    for _ in range(2):  # two sequences: the second starts from the weights the first left
        program.train_step(x, y, mask)
    expected = hand_tbptt(reference, x, y, mask, T=3, lr=0.1) + hand_tbptt(reference, x, y, mask, T=3, lr=0.1)
    assert len(got) == len(expected) == 6
    for k, (g, e) in enumerate(zip(got, expected)):
        assert g.keys() == e.keys()
        for name in e:
            torch.testing.assert_close(
                g[name], e[name], rtol=0, atol=1e-13, msg=lambda m, k=k, n=name: f"seg {k} {n}: {m}"
            )
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)


def test_synthetic_gradient_enters_the_segment_backward():
    """A constant synthesizer's gradient reaches the parameters exactly as an extra term <g, s_T> would."""
    torch.manual_seed(1)
    model = CellModel(nn.RNNCell(5, 8), 8, 4).double()
    reference = copy.deepcopy(model)
    x, y, mask = copy_batch(bits=4, n=1, batch=3)  # 3 steps, T = 3: one segment, continued (end=False)
    program = compile_recurrent(model, spec_yaml(sg="{model: linear, scale: 0.5}", truncation=3))
    synth = program.runtime.boundary.models.grad["state"]
    with torch.no_grad():
        synth.net[-1].bias.copy_(torch.linspace(-1, 1, 8, dtype=synth.net[-1].bias.dtype))
    synth.double()
    got = program_segment_grads(program)
    program.train_step(x, y, mask, end=False)
    # by hand: loss + 0.5 / B * <bias, h_T>
    h, outs = torch.zeros(3, 8, dtype=torch.float64), []
    for t in range(3):
        h = reference.core(x[:, t], h)
        outs.append(h)
    logits = reference.readout(torch.stack(outs, 1))
    loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(-1) * mask).sum(1).mean() / 3
    bias = torch.linspace(-1, 1, 8, dtype=torch.float64)
    (loss + (0.5 / 3) * (h * bias).sum()).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(got[0][name], p.grad, rtol=0, atol=1e-13)


@pytest.mark.parametrize("scale, discount", [(1.0, 1.0), (0.1, 1.0), (0.1, 0.1), (0.5, 0.3), (1.0, 0.0)])
def test_synthesizer_target_bootstraps_the_next_prediction(scale, discount):
    """The synthesizer at a boundary learns from B * (dL_segment/ds + discount * J^T g_next / B): the next
    boundary's prediction enters its target at `discount`, whatever `scale` the segment used it at."""
    torch.manual_seed(2)
    model = CellModel(nn.RNNCell(5, 8), 8, 4).double()
    reference = copy.deepcopy(model)
    x, y, mask = copy_batch(bits=4, n=3, batch=3)  # 7 steps, T = 3: segments of 3, 3 and 1
    extra = "stages: {default: {optimizer: {name: SGD, lr: 0.1}, clock: {offset: 1000000}}}\n"  # frozen RNN
    sg = f"{{model: linear, scale: {scale}, optimizer: {{name: SGD, lr: 0.01}}}}"
    spec = (
        spec_yaml(sg=sg, truncation=3)
        .replace("stages:", "#")
        .replace("aux: false", f"aux: false, discount: {discount}")
    )
    program = compile_recurrent(model, spec + extra)
    runtime = program.runtime
    bias = torch.linspace(-1, 1, 8, dtype=torch.float64)
    with torch.no_grad():
        runtime.boundary.models.grad["state"].net[-1].bias.copy_(bias)  # a constant prediction g at every boundary
    runtime.boundary.models.double()
    targets = []
    learn = runtime.boundary.learn
    runtime.boundary.learn = lambda h, context, delta, b, **kw: (
        targets.append(delta["state"] * b),
        learn(h, context, delta, b, **kw),
    )[1]
    program.train_step(x, y, mask)
    assert len(targets) == 2  # the predictions at s_3 and s_6 learn from segments 2 and 3

    # by hand: segment 2 runs from s_3 (a leaf) over steps 3..5, and its end s_6 receives g / B
    with torch.no_grad():
        h = torch.zeros(3, 8, dtype=torch.float64)
        for t in range(3):
            h = reference.core(x[:, t], h)
    s3 = h.clone().requires_grad_(True)
    h, outs = s3, []
    for t in range(3, 6):
        h = reference.core(x[:, t], h)
        outs.append(h)
    logits = reference.readout(torch.stack(outs, 1))
    per_step = F.binary_cross_entropy_with_logits(logits, y[:, 3:6], reduction="none").sum(-1) * mask[:, 3:6]
    (per_step.sum(1).mean() / 3 + discount * (h * bias).sum() / 3).backward()
    torch.testing.assert_close(targets[0], s3.grad * 3, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- the synthesizer learns the future gradient
def test_linear_synthesizer_learns_true_future_gradient_of_linear_rnn():
    torch.manual_seed(0)
    hidden, inputs, T, length, nb = 12, 6, 4, 40, 32
    cell = LinearCell(inputs, hidden)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(hidden, hidden))
        cell.W.weight.copy_(0.85 * q)  # every eigenvalue of modulus 0.85: the future fades over ~15 steps

    class LinearRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.core = cell
            self.readout = nn.Linear(hidden, hidden, bias=False)

        def forward(self, x):
            h, outs = None, []
            for t in range(x.shape[1]):
                h = self.core(x[:, t], h)
                outs.append(h)
            return self.readout(torch.stack(outs, 1))

    model = LinearRNN()
    spec = textwrap.dedent(f"""\
        recurrent: {{core: core, output: readout}}
        bptt: {{truncation: {T}, synthetic_gradient: {{model: linear, scale: 1.0, optimizer: {{name: Adam, lr: 0.01}}}}}}
        stages: {{default: {{optimizer: {{name: SGD, lr: 0.1}}, clock: {{offset: 1000000000}}}}}}
        loss: mse
        """)  # the RNN is frozen (its clock never ticks): the synthesizer learns a fixed future
    program = compile_recurrent(model, spec)
    gen = torch.Generator().manual_seed(0)

    def batch():
        x = 0.01 * torch.randn(nb, length, inputs, generator=gen)
        x[:, 0] = torch.randn(nb, inputs, generator=gen)  # a random start, then small inputs
        return x, torch.zeros(nb, length, hidden)

    for _ in range(250):
        program.train_step(*batch())
    assert program.runtime.stages[0].optimizer.state == {}  # never stepped

    # reference: full BPTT over the whole sequence; the gradient reaching each boundary state is its future's
    x, y = batch()
    h, states, outs = None, {}, []
    for t in range(length):
        h = cell(x[:, t], h)
        outs.append(h)
        if (t + 1) % T == 0 and t + 1 < length:
            h.retain_grad()
            states[t + 1] = h
    loss = ((model.readout(torch.stack(outs, 1)) - y) ** 2).sum(-1).sum(1).mean() / T
    loss.backward()
    synth = program.runtime.boundary.models.grad["state"]
    synth.eval()
    with torch.no_grad():
        pred = torch.cat([synth(s.detach()) for s in states.values()])
        true = torch.cat([s.grad * nb for s in states.values()])  # per-sample gradients
    cos = F.cosine_similarity(pred.flatten(), true.flatten(), dim=0).item()
    assert cos > 0.95, f"cos(M(h), true future gradient) = {cos:.3f}"
    first = F.cosine_similarity(pred[:nb], true[:nb], dim=1).mean().item()
    assert first > 0.95, f"mean per-sample cosine at the first boundary = {first:.3f}"


# --------------------------------------------------------------------------- hierarchical clocks
def hierarchical_program(interface="{model: linear, optimizer: {name: Adam, lr: 0.01}}", every=3, offset=1, T=1):
    from hierarchical import build_model

    torch.manual_seed(0)
    model = build_model(vocab=11, embed=6, hidden=10, upper_hidden=7, every=every, offset=offset)
    spec = textwrap.dedent(f"""\
        inputs: {{x: {{shape: [3, 10], dtype: int64, high: 11}}}}
        recurrent:
          core: lower
          input: embed
          output: head
          upper: {{core: upper, output: upper_head, synthetic_gradient: {interface}}}
        bptt: {{truncation: {T}, synthetic_gradient: {{model: linear}}}}
        stages:
          default: {{optimizer: {{name: SGD, lr: 0.5}}}}
          1: {{clock: {{every: {every}, offset: {offset}}}}}
        loss: cross_entropy
        """)
    return model, compile_recurrent(model, spec)


def test_hierarchical_clocks_tick_as_declared_and_upper_changes_only_on_ticks():
    model, program = hierarchical_program(every=3, offset=1)
    upper_params = [p for n, p in model.named_parameters() if n.startswith("upper")]
    lower_params = [p for n, p in model.named_parameters() if not n.startswith("upper")]
    ids = torch.randint(0, 11, (4, 40), generator=torch.Generator().manual_seed(0))
    horizon = program.upper.horizon
    assert horizon == 3
    ticks, changed = [], []
    for t in range(30):  # one character per call, a continuing stream
        before = [p.detach().clone() for p in upper_params]
        lower_before = [p.detach().clone() for p in lower_params]
        r = program.train_step(ids[:, t : t + 1], ids[:, t + 1 : t + 1 + horizon], start=t == 0, end=False)
        ticks += r.upper_ticks
        if any(not torch.equal(a, p) for a, p in zip(before, upper_params)):
            changed.append(t)
        assert any(not torch.equal(a, p) for a, p in zip(lower_before, lower_params)), f"lower idle at {t}"
        assert all(time in r.upper_ticks for stage, time in r.updates if stage == 1)
    declared = [t for t in range(30) if t >= 1 and (t - 1) % 3 == 0]
    assert ticks == declared
    assert changed == declared
    assert program.runtime.stages[1].clock.ticks == len(declared)


def test_hierarchical_exact_interface_every_step_updates_both_every_step():
    model, program = hierarchical_program(interface="null", every=1, offset=0, T=2)
    ids = torch.randint(0, 11, (4, 20), generator=torch.Generator().manual_seed(1))
    r = program.train_step(ids[:, :8], ids[:, 1:9], start=True, end=True)
    assert r.upper_ticks == list(range(8))
    assert [t for s, t in r.updates if s == 0] == [1, 3, 5, 7]  # the lower at its segment ends
    assert [t for s, t in r.updates if s == 1] == [1, 3, 5, 7]  # the locked upper with it
    assert "upper" not in r.cosine  # no interface synthesizer


def test_hierarchical_exact_interface_gradient_equals_joint_backprop():
    """Through an exact interface the upper's loss reaches the lower like plain backprop through both."""
    model, program = hierarchical_program(interface="null", every=2, offset=1, T=4)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 11, (3, 12), generator=torch.Generator().manual_seed(2))
    x, y = ids[:, :4], ids[:, 1:6]  # one segment; the upper ticks at 1 and 3 and looks 2 ahead
    got = program_segment_grads(program)
    program.train_step(x, y, start=True, end=True)
    lower_logits, upper_preds = reference(x)
    loss = F.cross_entropy(lower_logits.reshape(-1, 11), y[:, :4].reshape(-1), reduction="none").reshape(3, 4)
    total = loss.sum(1).mean() / 4
    for k, t in enumerate([1, 3]):
        tgt = y[:, t : t + 2]
        n = tgt.shape[1]
        up = F.cross_entropy(upper_preds[:, k, :n].reshape(-1, 11), tgt.reshape(-1), reduction="none")
        total = total + up.reshape(3, n).sum(1).mean() / 2
    total.backward()
    for name, p in reference.named_parameters():
        if not name.startswith("upper"):
            torch.testing.assert_close(got[0][name], p.grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the copy task and its curriculum
def test_copy_batch_layout_by_hand():
    task = CopyTask(bits=3, seed=0)
    b = task.batch(2, 2)
    v = b.x[:, :2, :3]  # the vectors drawn
    assert set(v.unique().tolist()) <= {0.0, 1.0}
    expected_x = torch.zeros(2, 5, 4)
    expected_x[:, :2, :3] = v
    expected_x[:, 2, 3] = 1.0
    expected_y = torch.zeros(2, 5, 3)
    expected_y[:, 3:5] = v
    assert torch.equal(b.x, expected_x)
    assert torch.equal(b.y, expected_y)
    assert b.mask.tolist() == [[0, 0, 0, 1, 1]] * 2
    assert task.input_size == 4 and task.output_size == 3 and task.sequence_length(2) == 5
    # the same seed draws the same batches
    assert torch.equal(CopyTask(bits=3, seed=0).batch(2, 2).x, b.x)


def test_repeat_copy_batch_layout_by_hand():
    task = CopyTask(bits=2, repeat=True, max_repeats=3, seed=3)
    b = task.batch(4, 2)
    assert b.x.shape == (4, 2 + 1 + 3 * 2 + 1, 4) and b.y.shape == (4, 10, 3)
    for i in range(4):
        r = int(b.repeats[i])
        v = b.x[i, :2, :2]
        assert b.x[i, 2].tolist() == pytest.approx([0.0, 0.0, 1.0, r / 3])
        assert torch.equal(b.x[i, 3:], torch.zeros(7, 4))
        rows = [v[0], v[1]] * r
        for j, row in enumerate(rows):
            assert b.y[i, 3 + j].tolist() == row.tolist() + [0.0]
        assert b.y[i, 3 + 2 * r].tolist() == [0.0, 0.0, 1.0]  # end marker
        assert b.mask[i].tolist() == [0.0] * 3 + [1.0] * (2 * r + 1) + [0.0] * (6 - 2 * r)
    assert sorted(set(b.repeats.tolist())) != [] and all(1 <= r <= 3 for r in b.repeats.tolist())


def test_error_bits():
    y = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[0.0, 1.0]])
    assert CopyTask.error_bits(torch.zeros(1, 2, 2), y, mask) == pytest.approx(2.0)  # chance: 1 bit per bit
    assert CopyTask.error_bits((2 * y - 1) * 50, y, mask) < 1e-10
    # the unmasked step does not count
    assert CopyTask.error_bits(torch.tensor([[[-50.0, 50.0], [-50.0, 50.0]]]), y, mask) < 1e-10


def test_curriculum_grows_when_average_error_is_below_threshold():
    c = Curriculum(start=1, max_length=3, threshold=0.15, window=3)
    assert not c.update(0.1) and not c.update(0.1)  # window not full yet
    assert c.solved_length == 0
    assert c.update(0.2)  # average 0.133 < 0.15
    assert (c.length, c.solved_length) == (2, 1)
    assert not c.update(0.1) and not c.update(0.1) and not c.update(0.3)  # average 0.167: not yet
    assert c.update(0.0)  # the window slides: 0.1, 0.3, 0.0 -> 0.133: grows
    assert (c.length, c.solved_length) == (3, 2)
    for _ in range(3):
        c.update(0.0)
    assert (c.length, c.solved_length) == (3, 3)  # max_length reached: solved, no further growth


def test_curriculum_window_slide_grows():
    c = Curriculum(start=2, max_length=10, threshold=0.15, window=2)
    assert not c.update(0.5)
    assert not c.update(0.0)  # 0.25
    assert c.update(0.1)  # 0.05
    assert (c.length, c.solved_length) == (3, 2)


# --------------------------------------------------------------------------- text
def test_text_streams_and_split(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 30)  # 300 characters, 10 symbols
    data = load_text(str(path), split=0.9)
    assert data.vocab == "abcdefghij" and len(data.train) == 270 and len(data.valid) == 30
    streams = TextStreams(data.train, batch_size=3, seq_len=4, lookahead=2)
    x, y, start = streams.next()
    assert start and x.shape == (3, 4) and y.shape == (3, 6)
    assert torch.equal(y[:, :4], streams.strips[:, 1:5]) and torch.equal(x, streams.strips[:, :4])
    x2, _, start2 = streams.next()
    assert not start2 and torch.equal(x2, streams.strips[:, 4:8])


# --------------------------------------------------------------------------- command line
def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


COPY_SPEC = """\
    model: build_model
    model_args: {inputs: 5, outputs: 4, hidden: 16}
    inputs:
      x: {shape: [2, 5, 5]}
    recurrent: {core: core, output: readout}
    bptt:
      truncation: 2
      synthetic_gradient: {model: linear, scale: 0.1}
      aux: true
    loss: binary_cross_entropy
    data: {name: copy, bits: 4, window: 2}
    train: {steps: 6, batch_size: 8, eval_every: 3}
    """


def test_cli_copy_trains_and_writes_outputs(tmp_path, capsys):
    spec = write(tmp_path, "copy.yaml", COPY_SPEC)
    out = tmp_path / "run"
    code, stdout, err = run_cli([ROOT / "examples/copy_rnn.py", "--spec", spec, "--train", "--out", out], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("solved_length" in r for r in rows) and any("aux_loss" in r for r in rows)
    assert {"model.pt", "checkpoint.pt", "curves.png", "summary.json"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 6 and "solved_length" in summary
    state = torch.load(out / "model.pt")
    assert set(state) == {"core.weight_ih_l0", "core.weight_hh_l0", "core.bias_ih_l0", "core.bias_hh_l0",
                          "readout.weight", "readout.bias"}  # fmt: skip


def test_cli_charlm_reports_heldout_bpc(tmp_path, capsys):
    text = write(tmp_path, "tiny.txt", "To be, or not to be, that is the question.\n" * 40)
    vocab = len(set(text.read_text()))
    spec = write(
        tmp_path,
        "lm.yaml",
        f"""\
        model: build_model
        model_args: {{vocab: {vocab}, embed: 8, hidden: 16}}
        inputs:
          chars: {{shape: [2, 6], dtype: int64, high: {vocab}}}
        recurrent: {{core: core, input: embed, output: readout}}
        bptt: {{truncation: 4, synthetic_gradient: {{model: linear, scale: 0.1}}}}
        loss: cross_entropy
        data: {{name: text, seq_len: 8, eval_chars: 200}}
        train: {{steps: 5, batch_size: 4, eval_every: 5}}
        """,
    )
    metrics = tmp_path / "m.jsonl"
    args = [ROOT / "examples/charlm.py", "--spec", spec, "--train", "--data", text, "--metrics", metrics]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    bpc = [r["bpc"] for r in rows if "bpc" in r]
    assert bpc and 0 < bpc[-1] < math.log2(vocab) + 1


def test_cli_summary_without_train(capsys):
    code, out, err = run_cli([ROOT / "examples/copy_rnn.py", "--spec", ROOT / "specs/copy_dni.yaml"], capsys)
    assert code == 0, err
    assert "truncated BPTT with T = 4" in out and "synthetic gradient" in out


MODEL = """\
    import torch.nn as nn

    class M(nn.Module):
        def __init__(self, bidirectional=False):
            super().__init__()
            self.core = nn.LSTM(3, 4, batch_first=True, bidirectional=bidirectional)
            self.readout = nn.Linear(8 if bidirectional else 4, 2)
            self.other = nn.Linear(3, 3)
            self.head2 = nn.Linear(4, 2)

        def forward(self, x):
            return self.readout(self.core(x)[0])

    def build_model(bidirectional=False):
        return M(bidirectional)
    """

GOOD = """\
    model: build_model
    inputs:
      x: {shape: [2, 5, 3]}
    recurrent:
      core: core
      output: readout
    bptt:
      truncation: 2
      synthetic_gradient: {model: linear}
    loss: binary_cross_entropy
    """


@pytest.mark.parametrize(
    "name, edit, expected",
    [
        (
            "truncation-zero",
            ("truncation: 2", "truncation: 0"),
            ["spec.yaml:8:3", "bptt.truncation", "greater than or equal to 1"],
        ),
        (
            "truncation-typo",
            ("truncation: 2", "truncaton: 2"),
            ["spec.yaml:8:3", "unknown key `bptt.truncaton`", "did you mean 'truncation'"],
        ),
        ("core-typo", ("core: core", "core: cor"), ["spec.yaml:5:3", "no module `cor`", "did you mean 'core'"]),
        ("core-not-recurrent", ("core: core", "core: other"), ["spec.yaml:5:3", "`other` is a Linear", "hidden_size"]),
        (
            "output-wrong",
            ("output: readout", "output: head2"),
            ["spec.yaml:4:1", "does not compute what the model's forward computes"],
        ),
        (
            "output-mismatch",
            ("output: readout", "output: other"),
            ["spec.yaml:4:1", "unrolling `core`", "raised RuntimeError"],
        ),
        (
            "aux-without-synth",
            ("synthetic_gradient: {model: linear}", "aux: true"),
            ["spec.yaml:7:1", "aux: true", "needs a `synthetic_gradient`"],
        ),
        (
            "bptt-missing",
            ("bptt:\n  truncation: 2\n  synthetic_gradient: {model: linear}\n", ""),
            ["spec.yaml:4:1", "needs `bptt: {truncation: T}`"],
        ),
        ("cuts-and-recurrent", ("loss:", "cuts:\n  - after: core\nloss:"), ["spec.yaml:10:1", "cut in time"]),
        ("stage-key", ("loss:", "stages: {1: {clock: {every: 2}}}\nloss:"), ["spec.yaml:10:10", "stage 0 (the core)"]),
        ("loss-unknown", ("loss: binary_cross_entropy", "loss: bce"), ["spec.yaml:10:1", "unknown loss 'bce'"]),
        (
            "cdni",
            ("{model: linear}", "{model: linear, condition_on_labels: true}"),
            ["spec.yaml:9:39", "condition_on_labels"],
        ),
        ("data-name", ("loss:", "data: {name: copyy}\nloss:"), ["spec.yaml:10:8", "`data.name`", "'copy'"]),
    ],
)
def test_bad_recurrent_specs_name_file_line_col(tmp_path, capsys, name, edit, expected):
    model = write(tmp_path, "model.py", MODEL)
    old, new = edit
    text = textwrap.dedent(GOOD)
    assert old in text
    spec = tmp_path / "spec.yaml"
    spec.write_text(text.replace(old, new))
    code, out, err = run_cli([model, "--spec", spec], capsys)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    for piece in expected:
        assert piece in err, f"{piece!r} not in: {err}"


def test_bidirectional_core_is_refused(tmp_path, capsys):
    model = write(tmp_path, "model.py", MODEL)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        textwrap.dedent(GOOD).replace("model: build_model", "model: build_model\nmodel_args: {bidirectional: true}")
    )
    code, out, err = run_cli([model, "--spec", spec], capsys)
    assert code == 2 and "spec.yaml:6:3" in err and "bidirectional" in err


def test_recurrent_train_data_errors(tmp_path, capsys):
    model = write(tmp_path, "model.py", MODEL)
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(GOOD) + "data: {name: copy, bits: 8}\n")
    code, out, err = run_cli([model, "--spec", spec, "--train", "--steps", "1"], capsys)
    assert code == 2 and "feeds 9 channels" in err and "takes 3" in err
    spec.write_text(textwrap.dedent(GOOD) + "data: text\n")
    code, out, err = run_cli(
        [model, "--spec", spec, "--train", "--steps", "1", "--data", tmp_path / "nope.txt"], capsys
    )
    assert code == 2 and "nope.txt: no such file" in err
    spec.write_text(textwrap.dedent(GOOD) + "data: {name: text, path: gone/input.txt}\n")  # no --data: the spec's
    code, out, err = run_cli([model, "--spec", spec, "--train", "--steps", "1"], capsys)
    assert code == 2 and "gone/input.txt: no such file (from --data, or else the spec's data.path" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- hierarchical, two processes
HIER_SPEC = """\
    model: build_model
    model_args: {{vocab: {vocab}, embed: 8, hidden: 16, upper_hidden: 12, every: 3, offset: 2}}
    inputs:
      chars: {{shape: [2, 9], dtype: int64, high: {vocab}}}
    recurrent:
      core: lower
      input: embed
      output: head
      upper: {{core: upper, output: upper_head, synthetic_gradient: {{model: linear, scale: {scale}}}}}
    bptt: {{truncation: 4, synthetic_gradient: {{model: linear, scale: 0.1}}}}
    stages:
      default: {{optimizer: {{name: Adam, lr: 3.0e-3}}}}
      1: {{clock: {{every: 3, offset: 2}}}}
    loss: cross_entropy
    data: {{name: text, seq_len: 12, eval_chars: 300}}
    train: {{steps: 6, batch_size: 4, eval_every: 3}}
    """


def _text(tmp_path: Path) -> tuple[Path, int]:
    import random

    rng = random.Random(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    path = tmp_path / "t.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(2000)))
    return path, len(set(path.read_text()))


def test_hierarchical_on_two_workers_equals_local_runtime(tmp_path, capsys):
    """With the interface's synthetic gradient scaled to 0, the lower core cannot feel when the gradients
    come back, so two processes must train exactly the weights one process does."""
    text, vocab = _text(tmp_path)
    spec = write(tmp_path, "h.yaml", HIER_SPEC.format(vocab=vocab, scale=0.0))
    base = [ROOT / "examples/hierarchical.py", "--spec", spec, "--train", "--data", text]
    code, out, err = run_cli([*base, "--workers", "2", "--out", tmp_path / "dist"], capsys)
    assert code == 0, err
    code, out, err = run_cli([*base, "--out", tmp_path / "local"], capsys)
    assert code == 0, err
    dist_state, local_state = torch.load(tmp_path / "dist/model.pt"), torch.load(tmp_path / "local/model.pt")
    assert dist_state.keys() == local_state.keys()
    for k in local_state:
        torch.testing.assert_close(dist_state[k], local_state[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    rows = [json.loads(line) for line in (tmp_path / "dist/metrics.jsonl").read_text().splitlines()]
    ticks = [t for t in range(6 * 12) if t >= 2 and (t - 2) % 3 == 0]
    assert rows[-2]["upper_updates"] == len(ticks)  # one update per tick (truncation 1), on rank 1
    local = [json.loads(line) for line in (tmp_path / "local/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["bpc"] == local[-1]["bpc"] and rows[-1]["upper_bpc"] == local[-1]["upper_bpc"]


def test_two_workers_need_a_hierarchical_program(tmp_path, capsys):
    spec = write(tmp_path, "copy.yaml", COPY_SPEC)
    code, out, err = run_cli([ROOT / "examples/copy_rnn.py", "--spec", spec, "--train", "--workers", "2"], capsys)
    assert code == 2 and "has one core" in err
