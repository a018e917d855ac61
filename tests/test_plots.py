"""What a run draws (issue 20, item 3): curves.png marks the evaluations and puts round numbers on log axes; the
stage diagrams (stages.dot, stages.svg) carry a legend of the cut kinds they draw."""

from __future__ import annotations

import pytest
import torch.nn as nn

from dnicompile import compile_decoupled
from dnicompile.inspect import CUT_STYLES, stages_dot, stages_svg
from dnicompile.train import outputs


@pytest.fixture
def figures(monkeypatch):
    """The figures plot_curves / plot_recurrent draw, kept open instead of written."""
    drawn = []
    monkeypatch.setattr(outputs, "_finish", lambda fig, title, path: drawn.append(fig))
    yield drawn
    import matplotlib.pyplot as plt

    for fig in drawn:
        plt.close(fig)


def _rows(steps: int = 60, every: int = 20) -> list[dict]:
    rows = []
    for s in range(1, steps + 1):
        rows.append(
            {
                "step": s,
                "loss": 2.0 * 0.97**s,
                "samples_per_s": 100.0,
                "train_accuracy": min(1.0, s / steps),
                "cosine": {"c0": 0.5, "c1": 0.2},
                "synth_loss": {},
                "head_accuracy": {"c2": 0.4},
            }
        )
        if s % every == 0:
            rows.append({"step": s, "loss": 1.0, "test_loss": 1.5 - s / 100, "test_accuracy": s / 100})
    return rows


def test_the_curves_mark_each_evaluation_and_name_the_cut_kinds(figures):
    rows = _rows()
    outputs.plot_curves(rows, None, "t", {"c0": "synthetic", "c1": "delayed", "c2": "local"})
    loss, accuracy, cosine = figures[0].axes
    evals = [r for r in rows if "test_loss" in r]
    test = next(line for line in loss.get_lines() if line.get_label() == "test")
    assert list(test.get_xdata()) == [20, 40, 60] and list(test.get_ydata()) == [r["test_loss"] for r in evals]
    assert test.get_marker() == "o" and test.get_linestyle() == "None"
    test = next(line for line in accuracy.get_lines() if line.get_label() == "test")
    assert list(test.get_ydata()) == [r["test_accuracy"] for r in evals] and test.get_marker() == "o"
    assert "c2 head" in [line.get_label() for line in accuracy.get_lines()]
    assert [t.get_text() for t in cosine.get_legend().get_texts()] == ["c0: synthetic vs true", "c1: stale vs fresh"]
    # the training loss spans 2.0 * 0.97**60 = 0.32 .. 1.94: a log axis, labelled in plain numbers
    assert loss.get_yscale() == "log"
    labels = [t.get_text() for t in loss.get_yticklabels()]
    assert "1" in labels and "0.5" in labels and not any("10^" in t or "times" in t for t in labels)


@pytest.mark.parametrize(
    "lo, hi, want",
    [
        (0.05, 20.0, [0.1, 1, 10]),  # powers of ten where there are three
        (0.3, 2.5, [0.5, 1, 2]),  # else 1, 2, 5 per decade
        (0.45, 1.2, [0.5, 0.6, 0.7, 0.8, 0.9, 1]),  # else every digit
    ],
)
def test_log_ticks_are_round_numbers(lo, hi, want):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_yscale("log")
    ticks = outputs.log_ticks(ax.yaxis, lo, hi)
    assert [round(t, 10) for t in ticks] == want
    assert ax.yaxis.get_major_formatter()(0.5, 0) == "0.5"
    plt.close(fig)


def test_the_recurrent_curves_mark_the_evaluations(figures):
    rows = [
        {"step": s, "loss": 1.0 / s, "elapsed_s": s, "cosine": {"bptt": 0.1}, "solved_length": s // 10}
        for s in range(1, 31)
    ]
    rows += [{"step": s, "solved_length": s // 10, "length": s // 10 + 1, "elapsed_s": s} for s in (15, 30)]
    outputs.plot_recurrent(rows, None, "copy")
    solved = figures[0].axes[1]
    marks = next(line for line in solved.get_lines() if line.get_label() == "evaluations")
    assert list(marks.get_xdata()) == [15, 30] and list(marks.get_ydata()) == [1, 3]
    assert all(float(t).is_integer() for t in solved.get_yticks())


SPEC = """
inputs: {input: {shape: [4, 8]}}
cuts:
  - after: '0'
    synthetic_gradient: {model: linear}
  - after: '2'
    delayed_gradient: {delay: 1}
"""


def test_the_stage_diagrams_have_a_legend_of_the_kinds_they_draw():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    program = compile_decoupled(model, SPEC)
    dot, svg = stages_dot(program), stages_svg(program)
    for kind in ("synthetic", "delayed"):
        color, style, dash, words = CUT_STYLES[kind]
        assert words in dot and words in svg
        assert f'style={style}, color="{color}"' in dot  # the edge is drawn as its legend line
        assert f'stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"' in svg
    for kind in ("exact", "local"):  # not in this program: not in its legend
        assert CUT_STYLES[kind][3] not in dot and CUT_STYLES[kind][3] not in svg
    assert sum(" -> " in line for line in dot.splitlines()) == 4  # the legend adds no edge
