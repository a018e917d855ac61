"""A table of bad inputs: each exits with code 2 and a message that says what, where and how to fix it.

Every row writes a model file and a spec to a temporary folder, runs `dnicompile.cli.main` in process,
and checks the exit code, that no traceback is printed, and that stderr names the location (`spec.yaml:LINE:COL`
or `model.py:LINE`), the offending name and, for near-misses, a "did you mean".
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dnicompile.cli import main
from dnicompile.errors import SpecError
from dnicompile.spec import load_spec

# ----------------------------------------------------------------------------- models

MLP = """\
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.layers(x)
        h = torch.relu(h + 1)
        return self.head(h)


def build_model():
    return Net()
"""

TIED = """\
import torch.nn as nn


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, tokens):
        return self.head(self.body(self.emb(tokens)))


model = LM()
"""

NON_TENSOR = """\
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 8)
        self.l2 = nn.Linear(8, 8)

    def forward(self, x):
        n = x.size(1)
        h = self.l1(x)
        return self.l2(h) * n


model = Net()
"""

UNTRACEABLE = """\
import torch.nn as nn


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(8, 8)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.pre(x))


model = Net()
"""

SYNTAX_ERROR = """\
import torch.nn as nn

def build_model(:
    return nn.Linear(2, 2)
"""

IMPORT_RAISES = """\
import torch.nn as nn

SIZES = {"small": 8}
WIDTH = SIZES["large"]
"""

NO_FACTORY = """\
import torch.nn as nn


def make_net():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
"""

FACTORY_RAISES = """\
import torch.nn as nn


def build_model(width=8):
    if width % 3:
        raise ValueError(f"width must be a multiple of 3, got {width}")
    return nn.Linear(width, width)
"""

FACTORY_NOT_MODULE = """\
import torch.nn as nn


def build_model():
    return {"net": nn.Linear(8, 8)}
"""

SPEC = """\
model: build_model
inputs:
  x: {shape: [2, 8]}
cuts:
  - after: layers.1
"""


def spec_with(cuts: str, head: str = "model: build_model\ninputs:\n  x: {shape: [2, 8]}\n") -> str:
    """The MLP spec with the given `cuts:` block (and optionally other top-level keys before it)."""
    return head + "cuts:\n" + cuts


# ----------------------------------------------------------------------------- the table


@dataclass
class Row:
    id: str
    model: str | None  # source of model.py; None: no file is written
    spec: str | None  # text of spec.yaml; None: no file is written
    expect: list[str]  # substrings of stderr
    args: list[str] = field(default_factory=lambda: ["{model}", "--spec", "{spec}"])
    model_name: str = "model.py"  # where the model source is written
    marks: tuple = ()


ROWS = [
    # --- YAML and spec structure
    Row(
        "yaml-syntax-error",
        MLP,
        "model: build_model\ncuts:\n  - after: layers.1\n  bad: [1, 2\n",
        [
            "spec.yaml:4:3",
            "YAML syntax error",
            "block collection that starts at",
            "spec.yaml:3:3",
            "indented differently",
        ],
    ),
    Row("yaml-tab-indent", MLP, "cuts:\n\t- after: layers.1\n", ["spec.yaml:2:1", "YAML syntax error", "spaces only"]),
    Row("empty-spec", MLP, "", ["spec.yaml:1:1", "empty", "cuts:"]),
    Row("comment-only-spec", MLP, "# nothing yet\n", ["spec.yaml:1:1", "empty", "cuts:"]),
    Row("top-level-list", MLP, "- after: layers.1\n", ["spec.yaml:1:1", "list", "mapping"]),
    Row(
        "duplicate-yaml-key",
        MLP,
        "cuts:\n  - after: layers.1\ninputs:\n  x: {shape: [2, 8]}\ncuts:\n  - after: head\n",
        ["spec.yaml:5:1", "`cuts`", "twice", "spec.yaml:1:1"],
    ),
    Row(
        "unknown-top-level-key",
        MLP,
        "model: build_model\ninputs:\n  x: {shape: [2, 8]}\ncut:\n  - after: layers.1\n",
        ["spec.yaml:4:1", "unknown key `cut`", "did you mean 'cuts'", "missing required key `cuts`"],
    ),
    Row(
        "unknown-nested-key",
        MLP,
        spec_with("  - after: layers.1\n    synthetic_gradient:\n      model: mlp\n      hiden: 64\n"),
        ["spec.yaml:8:7", "cuts[0].synthetic_gradient.hiden", "did you mean 'hidden'", "Allowed here"],
    ),
    Row(
        "unknown-key-in-cut",
        MLP,
        spec_with("  - afte: layers.1\n"),
        ["spec.yaml:5:5", "unknown key `cuts[0].afte`", "did you mean 'after'", "missing required key `cuts[0].after`"],
    ),
    Row(
        "shape-wrong-type",
        MLP,
        'inputs:\n  x: {shape: "abc"}\ncuts:\n  - after: layers.1\n',
        ["spec.yaml:2:7", "inputs.x.shape", "valid list", '"abc"', "batch dimension first"],
    ),
    Row(
        "shape-negative-dim",
        MLP,
        "inputs:\n  x: {shape: [2, -8]}\ncuts:\n  - after: layers.1\n",
        ["spec.yaml:2:7", "inputs.x.shape", "positive integer"],
    ),
    Row(
        "dtype-unknown",
        MLP,
        "inputs:\n  x: {shape: [2, 8], dtype: float}\ncuts:\n  - after: layers.1\n",
        ["spec.yaml:2:22", "inputs.x.dtype", "'float32'", '"float"'],
    ),
    Row(
        "negative-lr",
        MLP,
        SPEC + "stages:\n  default:\n    optimizer: {name: SGD, lr: -0.1}\n",
        ["spec.yaml:8:28", "stages.default.optimizer.lr", "greater than 0", "-0.1", "Learning rate"],
    ),
    Row(
        "clock-every-and-probability",
        MLP,
        SPEC + "stages:\n  default:\n    clock: {every: 2, probability: 0.5}\n",
        ["spec.yaml:8:5", "stages.default.clock", "either `every` or `probability`, not both"],
    ),
    Row(
        "cuts-missing",
        MLP,
        "model: build_model\ninputs:\n  x: {shape: [2, 8]}\n",
        ["spec.yaml:1:1", "missing required key `cuts`", "Cut points"],
    ),
    Row(
        "cuts-empty",
        MLP,
        SPEC.replace("  - after: layers.1\n", "").replace("cuts:", "cuts: []"),
        ["spec.yaml:4:1", "`cuts`", "at least 1"],
    ),
    Row(
        "cuts-not-a-list",
        MLP,
        SPEC.replace("cuts:\n  - after: layers.1", "cuts: layers.1"),
        ["spec.yaml:4:1", "`cuts`", "valid list", "layers.1"],
    ),
    Row(
        "data-unknown",
        MLP,
        SPEC + "data: mnist\n",
        ["spec.yaml:6:1", "data.name", "'fashion-mnist'", '"mnist"'],
    ),
    # --- cuts that do not name a point of the graph, or do not separate it
    Row(
        "cut-near-miss-letter-O",
        MLP,
        spec_with("  - after: layers.O\n"),
        ["spec.yaml:5:5", "`layers.O`", "did you mean 'layers.0'", "--nodes"],
    ),
    Row(
        "cut-near-miss-layer",
        MLP,
        spec_with("  - after: layer.1\n"),
        ["spec.yaml:5:5", "`layer.1`", "did you mean 'layers.1'"],
    ),
    Row(
        "cut-near-miss-node-name",
        MLP,
        spec_with("  - after: layers.1\n  - after: relu_\n"),
        ["spec.yaml:6:5", "`relu_`", "did you mean 'relu'"],
    ),
    Row(
        "cut-after-input",
        MLP,
        spec_with("  - after: x\n"),
        ["spec.yaml:5:5", "`x`", "program input", "cut after a module"],
    ),
    Row(
        "cut-after-last-node",
        MLP,
        spec_with("  - after: layers.1\n  - after: head\n"),
        ["spec.yaml:6:5", "`head`", "last stage would be empty"],
    ),
    Row(
        "duplicate-cut-same-module",
        MLP,
        spec_with("  - after: layers.1\n  - after: layers.1\n"),
        ["spec.yaml:6:5", "spec.yaml:5:5", "same point", "`layers.1`", "Remove one"],
    ),
    Row(
        "duplicate-cut-module-vs-node",
        MLP,
        spec_with("  - after: layers.1\n  - after: layers_1\n"),
        ["spec.yaml:6:5", "spec.yaml:5:5", "same point", "`layers_1`", "`layers.1`"],
    ),
    Row(
        "duplicate-cut-nested-module",
        MLP,
        spec_with("  - after: layers\n  - after: layers.3\n"),
        ["spec.yaml:6:5", "spec.yaml:5:5", "same point", "`layers.3`", "`layers`"],
    ),
    Row(
        "cut-unused-module",
        MLP.replace(
            "self.head = nn.Linear(16, 4)", "self.head = nn.Linear(16, 4)\n        self.spare = nn.Linear(4, 4)"
        ),
        spec_with("  - after: spare\n"),
        ["spec.yaml:5:5", "`spare`", "computes nothing"],
    ),
    # tied weights across a cut are supported (tests/test_tied.py); the front end and the model's own loss
    Row(
        "frontend-unknown",
        MLP,
        SPEC + "trace:\n  frontend: torchscript\n",
        ["spec.yaml:7:3", "`trace.frontend`", "'fx', 'export' or 'auto'", "torchscript"],
    ),
    Row(
        "loss-from-output-of-a-single-tensor",
        MLP,
        SPEC + "loss: {from_output: 1}\n",
        ["spec.yaml:6:1", "from_output: 1", "a single tensor", "return logits, loss"],
    ),
    Row(
        "non-tensor-crosses-cut",
        NON_TENSOR,
        "inputs:\n  x: {shape: [2, 8]}\ncuts:\n  - after: l1\n",
        ["spec.yaml:4:5", "int value crosses", "`size`", "Only tensors"],
    ),
    # --- tracing and shapes
    Row(
        "untraceable-data-dependent-branch",
        UNTRACEABLE,
        "inputs:\n  x: {shape: [2, 8]}\ncuts:\n  - after: pre\n",
        ["model.py:10", "`gate`", "Gate", "if x.sum() > 0", "leaf_modules: ['gate']"],
    ),
    Row(
        "inputs-unknown-arg",
        MLP,
        "inputs:\n  xs: {shape: [2, 8]}\ncuts:\n  - after: layers.1\n",
        ["spec.yaml:2:3", "`xs`", "did you mean 'x'", "Net.forward"],
    ),
    Row(
        "inputs-missing",
        MLP,
        "cuts:\n  - after: layers.1\n",
        ["spec.yaml:1:1", "no example inputs", "inputs:"],
    ),
    Row(
        "inputs-wrong-shape",
        MLP,
        "inputs:\n  x: {shape: [2, 7]}\ncuts:\n  - after: layers.1\n",
        ["`layers_0`", "module `layers.0`", "(2, 7)", "spec.yaml:2:3", "inputs:"],
    ),
    Row(
        "leaf-module-unknown",
        MLP,
        SPEC + "trace:\n  leaf_modules: [Sequentail]\n",
        ["spec.yaml:7:18", "'Sequentail'", "did you mean 'Sequential'"],
    ),
    Row(
        "inputs-wrong-dtype",
        TIED,
        "inputs:\n  tokens: {shape: [2, 5], dtype: float32}\ncuts:\n  - after: emb\n",
        ["`emb`", "spec.yaml:2:3", "dtypes", "float"],
    ),
    Row(
        "concrete-arg-unknown",
        MLP,
        SPEC + "trace:\n  concrete_args: {trainng: false}\n",
        ["spec.yaml:7:19", "`trainng`", "Net.forward"],
    ),
    Row(
        "cut-after-wrong-type",
        MLP,
        spec_with("  - after: [layers.1]\n"),
        ["spec.yaml:5:5", "`cuts[0].after`", "valid string", "Module path or fx node name"],
    ),
    Row(
        "synthetic-gradient-not-a-mapping",
        MLP,
        spec_with("  - after: layers.1\n    synthetic_gradient: 3\n"),
        ["spec.yaml:6:5", "cuts[0].synthetic_gradient"],
    ),
    # --- the model file
    Row("model-file-missing", None, SPEC, ["model.py", "not found"]),
    Row(
        "model-file-typo",
        MLP,
        SPEC,
        ["modle.py", "not found", "did you mean", "model.py'?"],
        args=["{tmp}/modle.py", "--spec", "{spec}"],
    ),
    Row("model-file-is-directory", None, SPEC, ["is a directory"], args=["{tmp}", "--spec", "{spec}"]),
    Row("model-file-not-py", MLP, SPEC, ["model.txt", "not a .py file"], model_name="model.txt"),
    Row("model-syntax-error", SYNTAX_ERROR, SPEC, ["model.py:3:", "syntax error", "`def build_model(:`"]),
    Row("model-import-raises", IMPORT_RAISES, SPEC, ["model.py:4", "KeyError", "'large'"]),
    Row(
        "no-model-no-factory",
        NO_FACTORY,
        SPEC.replace("model: build_model\n", ""),
        ["model.py", "neither `model` nor `build_model`", "make_net"],
    ),
    Row(
        "model-name-near-miss",
        MLP,
        SPEC.replace("model: build_model", "model: buid_model"),
        ["model.py", "`buid_model`", "did you mean 'build_model'"],
    ),
    Row(
        "model-args-unknown",
        MLP,
        SPEC + "model_args: {depth: 3}\n",
        ["model.py:17", "build_model()", "unexpected keyword argument 'depth'", "model_args"],
    ),
    Row(
        "factory-raises",
        FACTORY_RAISES,
        SPEC + "model_args: {width: 8}\n",
        ["model.py:6", "ValueError", "multiple of 3"],
    ),
    Row(
        "factory-returns-non-module",
        FACTORY_NOT_MODULE,
        SPEC,
        ["model.py:4", "`build_model()`", "returned a dict", "torch.nn.Module"],
    ),
    # --- command line
    Row("spec-file-missing", MLP, None, ["spec.yaml", "not found", "--spec"]),
    Row(
        "spec-file-typo",
        MLP,
        SPEC,
        ["spce.yaml", "not found", "did you mean", "spec.yaml'?"],
        args=["{model}", "--spec", "{tmp}/spce.yaml"],
    ),
    Row("spec-file-is-directory", MLP, None, ["is a directory"], args=["{model}", "--spec", "{tmp}"]),
    Row(
        "flag-steps-negative",
        MLP,
        SPEC,
        ["--steps", "positive integer", "-3"],
        args=["{model}", "--spec", "{spec}", "--steps", "-3"],
    ),
    # --- per-stage overrides: keys must be `default`, a stage index, or `stageN`
    Row(
        "stage-override-index-out-of-range",
        MLP,
        SPEC + "stages:\n  7: {optimizer: {name: SGD, lr: 0.1}}\n",
        ["spec.yaml:7:3", "stage 7", "2 stages"],
    ),
    Row(
        "stage-override-unknown-name",
        MLP,
        SPEC + "stages:\n  stage9: {optimizer: {name: SGD, lr: 0.1}}\n",
        ["spec.yaml:7:3", "`stage9`", "2 stages", "stage0 or stage1"],
    ),
]


def _write(tmp_path: Path, row: Row) -> list[str]:
    model = tmp_path / row.model_name
    spec = tmp_path / "spec.yaml"
    if row.model is not None:
        model.write_text(row.model)
    if row.spec is not None:
        spec.write_text(row.spec)
    return [a.format(model=model, spec=spec, tmp=tmp_path) for a in row.args]


def _run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors exit instead of returning
        return e.code


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=r.marks) for r in ROWS])
def test_bad_input(row: Row, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = _write(tmp_path, row)
    code = _run_main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit code {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err and "Traceback" not in out
    assert "dnicompile: error:" in err
    assert "internal error" not in err
    missing = [s for s in row.expect if s not in err]
    assert not missing, f"stderr lacks {missing}:\n{err}"


def test_table_is_large_enough() -> None:
    assert len(ROWS) >= 30
    assert len({r.id for r in ROWS}) == len(ROWS)


# ----------------------------------------------------------------------------- stage override keys, directly


@pytest.mark.parametrize(
    ("stages", "expect"),
    [
        ("  7: {clock: {every: 2}}\n", ["spec.yaml:7:3", "stage 7", "2 stages", "0 or 1"]),
        (
            "  stage9: {clock: {every: 2}}\n",
            ["spec.yaml:7:3", "`stage9`", "the 1 cut makes 2 stages", "stage0 or stage1"],
        ),
        ("  defualt: {clock: {every: 2}}\n", ["spec.yaml:7:3", "`defualt`", "did you mean 'default'"]),
        ("  Stage1: {clock: {every: 2}}\n", ["spec.yaml:7:3", "`Stage1`", "did you mean 'stage1'"]),
        ("  -1: {clock: {every: 2}}\n", ["spec.yaml:7:3", "`-1`", "0 or 1"]),
    ],
    ids=["index-out-of-range", "unknown-stage-name", "default-typo", "stage-name-case", "negative-index"],
)
def test_check_stage_keys(tmp_path: Path, stages: str, expect: list[str]) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC + "stages:\n" + stages)
    spec = load_spec(path)
    with pytest.raises(SpecError) as info:
        spec.check_stage_keys(2)
    missing = [s for s in expect if s not in str(info.value)]
    assert not missing, f"message lacks {missing}:\n{info.value}"


def test_check_stage_keys_accepts_valid(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        SPEC + "stages:\n  default: {clock: {every: 1}}\n  0: {clock: {every: 2}}\n  stage1: {clock: {every: 3}}\n"
    )
    load_spec(path).check_stage_keys(2)


# ----------------------------------------------------------------------------- spec locations in model errors


def test_model_errors_name_the_spec_key(tmp_path: Path) -> None:
    """With `where=spec.where`, errors about `model:` and `model_args:` also point into the spec."""
    from dnicompile.compile.model_file import build_model
    from dnicompile.errors import ModelError

    (tmp_path / "model.py").write_text(MLP)
    (tmp_path / "spec.yaml").write_text(
        SPEC.replace("model: build_model", "model: buid_model") + "model_args: {d: 1}\n"
    )
    spec = load_spec(tmp_path / "spec.yaml")
    with pytest.raises(ModelError, match=r"spec\.yaml:1:1: .*`buid_model`.*did you mean 'build_model'"):
        build_model(tmp_path / "model.py", spec.model, spec.model_args, where=spec.where)
    with pytest.raises(ModelError, match=r"model\.py:17: .*model_args \{'d': 1\} \(.*spec\.yaml:6:1\)"):
        build_model(tmp_path / "model.py", "build_model", spec.model_args, where=spec.where)


# ----------------------------------------------------------------------------- the real console script


CONSOLE_ROWS = {
    "unknown-cut": (MLP, spec_with("  - after: layers.O\n"), ["spec.yaml:5:5", "did you mean 'layers.0'"]),
    "untraceable": (UNTRACEABLE, "inputs:\n  x: {shape: [2, 8]}\ncuts:\n  - after: pre\n", ["model.py:10", "`gate`"]),
    # torch itself prints a traceback when shape propagation fails: it must not reach the terminal
    "wrong-shape": (MLP, "inputs:\n  x: {shape: [2, 7]}\ncuts:\n  - after: layers.1\n", ["`layers_0`", "(2, 7)"]),
}


@pytest.fixture(scope="module")
def console_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Run `python -m dnicompile` on every CONSOLE_ROWS case at once (each start imports torch: seconds)."""
    procs = {}
    for key, (model, spec, _) in CONSOLE_ROWS.items():
        folder = tmp_path_factory.mktemp(key)
        if model is not None:
            (folder / "model.py").write_text(model)
        (folder / "spec.yaml").write_text(spec)
        argv = [sys.executable, "-m", "dnicompile", str(folder / "model.py"), "--spec", str(folder / "spec.yaml")]
        procs[key] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@pytest.mark.parametrize("key", list(CONSOLE_ROWS))
def test_console_script(console_runs: dict[str, subprocess.CompletedProcess], key: str) -> None:
    proc = console_runs[key]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert proc.stderr.startswith("dnicompile: error:"), proc.stderr
    missing = [s for s in CONSOLE_ROWS[key][2] if s not in proc.stderr]
    assert not missing, f"stderr lacks {missing}:\n{proc.stderr}"
