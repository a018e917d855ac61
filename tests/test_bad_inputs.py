"""A table of bad inputs: each exits with code 2 and a message that says what, where and how to fix it.

Every row writes a model file and a spec to a temporary folder, runs `dnicompile.cli.main` in process,
and checks the exit code, that no traceback is printed, and that stderr names the location (`spec.yaml:LINE:COL`
or `model.py:LINE`), the offending name and, for near-misses, a "did you mean".
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dnicompile.cli import main
from dnicompile.errors import SpecError
from dnicompile.spec import ALLOW_IMPORTS_ENV, load_spec

ROOT = Path(__file__).resolve().parent.parent

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
        n = x.argmax().item()  # a size (x.size(1)) is read again behind the cut; this depends on x's values
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
    setup: Callable[[Path], None] | None = None  # writes other files into the temporary folder
    absent: list[str] = field(default_factory=list)  # substrings stderr must not have


# ----------------------------------------------------------------------------- issue 19: hostile and unchecked input

BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
cuts: *i
"""

SYS_EXIT = """\
import sys
import torch.nn as nn

model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
sys.exit(0)
"""

INTERRUPTS = """\
import torch.nn as nn

model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
raise KeyboardInterrupt
"""

FACTORY_EXITS = """\
import sys
import torch.nn as nn


def build_model():
    sys.exit("no GPU")
"""

RNN = """\
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.core = nn.GRU(4, 8, batch_first=True)
        self.readout = nn.Linear(8, 3)

    def forward(self, x):
        return self.readout(self.core(x)[0])


model = Net()
"""

RNN_SPEC = """\
inputs:
  x: {shape: [2, 6, 4]}
recurrent: {core: core, output: readout}
bptt: {truncation: 3, synthetic_gradient: {model: linear}}
"""


def sg_spec(sg: str) -> str:
    """The MLP spec with one synthetic cut whose synthesizer mapping is `sg`."""
    return spec_with(f"  - after: layers.1\n    synthetic_gradient: {sg}\n")


def files(contents: dict[str, str]) -> Callable[[Path], None]:
    """A Row.setup that writes files ({name: text}) into the temporary folder."""

    def setup(tmp: Path) -> None:
        for name, text in contents.items():
            (tmp / name).write_text(text)

    return setup


def idx(shape: tuple[int, ...], body: bytes | None = None) -> bytes:
    """An IDX file of unsigned bytes: magic, dimensions, data (zeros unless given)."""
    size = 1
    for d in shape:
        size *= d
    head = bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
    return head + (bytes(size) if body is None else body)


def small_fashion_mnist(tmp: Path, train_images: bytes | None = None) -> None:
    """A tiny Fashion-MNIST in tmp/data (128 train, 64 test images); `train_images` replaces that file."""
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    parts = {
        "train-images-idx3-ubyte.gz": train_images or gzip.compress(idx((128, 28, 28))),
        "train-labels-idx1-ubyte.gz": gzip.compress(idx((128,))),
        "t10k-images-idx3-ubyte.gz": gzip.compress(idx((64, 28, 28))),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(idx((64,))),
    }
    for name, blob in parts.items():
        (data / name).write_bytes(blob)


def gzip_bomb(declared: tuple[int, ...] = (60000, 28, 28), gib: float = 1.0) -> bytes:
    """About 1 MiB of gzip that holds an IDX header and `gib` GiB of zeros: gzip members, one after another,
    each 16 MiB of zeros (a reader sees one stream)."""
    head = idx(declared, body=b"")
    zeros = gzip.compress(bytes(1 << 24), compresslevel=9)
    return gzip.compress(head) + zeros * int(gib * 64)


MLP_TRAIN = ["{root}/examples/mlp.py", "--spec", "{root}/specs/mlp_cdni.yaml", "--train", "--steps", "1"]
NARROW_MLP = """import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(784, 32), nn.ReLU())
        self.head = nn.Linear(32, 5)  # 5 classes, the data has 10

    def forward(self, x):
        return self.head(self.body(x))


def build_model():
    return Net()
"""
DICT_MLP = """import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(784, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return {"logits": self.head(self.body(x))}


def build_model():
    return Net()
"""
LOSS_SPEC = (
    "model: build_model\ninputs:\n  x: {{shape: [16, 784]}}\ncuts:\n  - after: body\n"
    "loss: {loss}\ndata: fashion-mnist\ntrain: {{batch_size: 16}}\n"
)

SECURITY_ROWS = [
    # --- bounded parsing
    Row(
        "yaml-billion-laughs",
        MLP,
        BILLION_LAUGHS,
        ["spec.yaml:", "aliases", "billion laughs", "Write the values out"],
    ),
    Row(
        "yaml-deep-nesting",
        MLP,
        "cuts: " + "[" * 5000 + "]" * 5000 + "\n",
        ["spec.yaml:1:", "more than 32 levels deep"],
        absent=["RecursionError"],
    ),
    Row(
        "yaml-python-tag",
        MLP,
        SPEC + "loss: !!python/object/apply:os.system ['echo pwned']\n",
        ["spec.yaml:6:7", "unsafe YAML tag `!!python/object/apply:os.system`", "plain value"],
        absent=["syntax error", "pwned"],
    ),
    Row(
        "yaml-binary-tag",
        MLP,
        SPEC + "model_args: {blob: !!binary aGVsbG8=}\n",
        ["spec.yaml:6:20", "unsupported YAML tag `!!binary`"],
        absent=["syntax error"],
    ),
    Row(
        "spec-file-too-large",
        MLP,
        SPEC + "# " + "x" * (1 << 20) + "\n",
        ["spec.yaml", "more than 1,048,576 bytes"],
    ),
    Row(
        "data-gzip-bomb",
        None,
        "cuts: []\n",  # not used: the row trains examples/mlp.py with specs/mlp_cdni.yaml
        ["train-images-idx3-ubyte.gz", "header says shape (60000, 28, 28)", "holds more"],
        args=[*MLP_TRAIN, "--data", "{tmp}/data"],
        setup=lambda tmp: small_fashion_mnist(tmp, gzip_bomb()),
    ),
    Row(
        "data-idx-header-too-large",
        None,
        "cuts: []\n",
        ["train-images-idx3-ubyte.gz", "(4294967295, 28, 28)", "more than"],
        args=[*MLP_TRAIN, "--data", "{tmp}/data"],
        setup=lambda tmp: small_fashion_mnist(tmp, gzip.compress(idx((2**32 - 1, 28, 28), body=b""))),
    ),
    Row(
        "data-idx-wrong-dimensions",
        None,
        "cuts: []\n",
        ["train-images-idx3-ubyte.gz", "header says 1 dimensions", "should have 3"],
        args=[*MLP_TRAIN, "--data", "{tmp}/data"],
        setup=lambda tmp: small_fashion_mnist(tmp, gzip.compress(idx((784,)))),
    ),
    # --- no code runs from a spec unless allowed
    Row(
        "loss-imports-without-allow",
        MLP,
        SPEC + "loss: os:system\n",
        ["spec.yaml:6:1", "`loss: os:system`", "imports module `os`", "--allow-imports"],
    ),
    Row(
        "synthesizer-class-without-allow",
        MLP,
        sg_spec("{model: 'mysynth:Synth'}"),
        ["spec.yaml:6:26", "cuts[0].synthetic_gradient.model: mysynth:Synth", "--allow-imports"],
        setup=files({"mysynth.py": "raise SystemExit('this module must not be imported')\n"}),
    ),
    Row(
        "synthetic-input-class-without-allow",
        MLP,
        spec_with(
            "  - after: layers.1\n    synthetic_gradient: {model: linear}\n    synthetic_input: {model: 'a.b:C'}\n"
        ),
        ["spec.yaml:7:23", "synthetic-input class", "--allow-imports"],
    ),
    Row(
        "step-loss-imports-without-allow",
        RNN,
        RNN_SPEC + "loss: mylosses:per_step\n",
        ["spec.yaml:5:1", "`loss: mylosses:per_step`", "--allow-imports"],
    ),
    Row(
        "synthesizer-module-raises-on-import",
        MLP,
        sg_spec("{model: 'badsynth_19:Synth'}"),
        ["spec.yaml:5:5", "importing module 'badsynth_19' for synthesizer class", "ZeroDivisionError"],
        args=["{model}", "--spec", "{spec}", "--allow-imports"],
        setup=files({"badsynth_19.py": "x = 1 / 0\n"}),
    ),
    Row(
        "synthetic-input-class-raises",
        MLP,
        spec_with(
            "  - after: layers.1\n    synthetic_gradient: {model: linear}\n"
            "    synthetic_input: {model: 'badinput_19:Input'}\n"
        ),
        ["spec.yaml:5:5", "building synthetic-input model badinput_19:Input", "ValueError", "no inputs today"],
        args=["{model}", "--spec", "{spec}", "--allow-imports"],
        setup=files(
            {
                "badinput_19.py": "class Input:\n    def __init__(self, *args):\n        raise ValueError('no inputs today')\n"
            }
        ),
    ),
    Row(
        "local-head-class-missing",
        MLP,
        spec_with("  - after: layers.1\n    local_loss: {head: 'myheads_19:Hed'}\n"),
        ["spec.yaml:5:5", "module 'myheads_19' has no local-loss head class 'Hed'", "did you mean 'Head'"],
        args=["{model}", "--spec", "{spec}", "--allow-imports"],
        setup=files({"myheads_19.py": "class Head:\n    pass\n"}),
    ),
    Row(
        "loss-module-missing-with-allow",
        MLP,
        SPEC + "loss: nosuchmodule_19:loss\n",
        ["spec.yaml:6:1", "cannot import module 'nosuchmodule_19' for loss function 'nosuchmodule_19:loss'"],
        args=["{model}", "--spec", "{spec}", "--allow-imports"],
    ),
    # --- checking a spec without --train checks all that --train would use
    Row(
        "optimizer-unknown",
        MLP,
        SPEC + "stages:\n  default:\n    optimizer: {name: Adamm}\n",
        ["spec.yaml:8:17", "unknown optimizer 'Adamm'", "did you mean 'Adam'"],
    ),
    Row(
        "optimizer-betas-not-a-list",
        MLP,
        SPEC + "stages:\n  default:\n    optimizer: {name: Adam, betas: 5}\n",
        ["spec.yaml:8:29", "`betas: 5`", "list of 2 numbers", "[0.9, 0.999]"],
        absent=["subscriptable"],
    ),
    Row(
        "optimizer-betas-out-of-range",
        MLP,
        SPEC + "stages:\n  default:\n    optimizer: {name: Adam, betas: [5, 0.9]}\n",
        ["spec.yaml:8:5", "optimizer Adam", "Invalid beta parameter"],
    ),
    Row(
        "optimizer-unknown-argument",
        MLP,
        SPEC + "stages:\n  default:\n    optimizer: {name: SGD, lr: 0.1, momentun: 0.9}\n",
        ["spec.yaml:8:37", "takes no argument 'momentun'", "did you mean 'momentum'"],
    ),
    Row(
        "optimizer-argument-wrong-type",
        MLP,
        SPEC + "stages:\n  default:\n    optimizer: {name: SGD, lr: 0.1, nesterov: 3}\n",
        ["spec.yaml:8:37", "`nesterov: 3`", "true or false"],
    ),
    Row(
        "optimizer-lbfgs",
        MLP,
        SPEC + "stages:\n  default:\n    optimizer: {name: LBFGS}\n",
        ["spec.yaml:8:17", "LBFGS needs a closure"],
    ),
    Row(
        "optimizer-unknown-in-synthesizer",
        MLP,
        sg_spec("{model: linear, optimizer: {name: Adamm}}"),
        ["spec.yaml:6:53", "unknown optimizer 'Adamm'"],
    ),
    Row(
        "optimizer-unknown-in-recurrent",
        RNN,
        RNN_SPEC + "stages:\n  default: {optimizer: {name: Adamm}}\n",
        ["spec.yaml:6:", "unknown optimizer 'Adamm'"],
    ),
    Row(
        "scheduler-unknown",
        MLP,
        SPEC + "stages:\n  default:\n    optimizer: {name: Adam, scheduler: {name: StepLr, step_size: 10}}\n",
        ["spec.yaml:8:41", "unknown lr scheduler 'StepLr'", "did you mean 'StepLR'"],
    ),
    Row(
        "scheduler-reduce-on-plateau",
        MLP,
        SPEC + "stages:\n  default:\n    optimizer: {name: Adam, scheduler: {name: ReduceLROnPlateau}}\n",
        ["spec.yaml:8:41", "ReduceLROnPlateau steps on a metric"],
    ),
    Row(
        "scheduler-missing-argument",
        MLP,
        SPEC + "stages:\n  default:\n    optimizer: {name: Adam, scheduler: {name: StepLR}}\n",
        ["spec.yaml:8:29", "scheduler StepLR needs the argument step_size"],
    ),
    Row(
        "scheduler-argument-wrong-type",
        MLP,
        SPEC + "stages:\n  default:\n    optimizer: {name: Adam, scheduler: {name: StepLR, step_size: ten}}\n",
        ["spec.yaml:8:55", '`step_size: "ten"`', "must be an integer"],
    ),
    Row(
        "scheduler-bad-value",
        MLP,
        SPEC + "stages:\n  default:\n    optimizer: {name: Adam, scheduler: {name: LinearLR, start_factor: 5}}\n",
        ["spec.yaml:8:29", "scheduler LinearLR", "multiplicative factor"],
    ),
    Row(
        "loss-unknown",
        MLP,
        SPEC + "loss: cross_entropyy\n",
        ["spec.yaml:6:1", "unknown loss 'cross_entropyy'", "did you mean 'cross_entropy'"],
    ),
    Row(
        "step-loss-unknown",
        RNN,
        RNN_SPEC + "loss: nll\n",
        ["spec.yaml:5:1", "unknown loss 'nll' for a recurrent program"],
    ),
    Row(
        "synthesizer-unknown",
        MLP,
        sg_spec("{model: mlpp}"),
        ["spec.yaml:5:5", "unknown synthesizer model 'mlpp'", "did you mean 'mlp'"],
    ),
    Row(
        "synthesizer-conv-on-flat-tensor",
        MLP,
        sg_spec("{model: conv}"),
        ["spec.yaml:5:5", "conv synthesizer needs a (C, H, W) feature map", "[16]"],
    ),
    Row(
        "synthesizer-conv-on-recurrent-state",
        RNN,
        RNN_SPEC.replace("{model: linear}", "{model: conv}"),
        ["spec.yaml:4:", "conv synthesizer needs a (C, H, W) feature map"],
    ),
    Row(
        "lr-infinite",
        MLP,
        SPEC + "stages:\n  default:\n    optimizer: {name: Adam, lr: .inf}\n",
        ["spec.yaml:8:29", "`stages.default.optimizer.lr` is inf", "finite"],
    ),
    Row(
        "scale-nan",
        MLP,
        sg_spec("{model: linear, scale: .nan}"),
        ["spec.yaml:6:41", "`cuts[0].synthetic_gradient.scale` is nan", "finite"],
    ),
    Row(
        "optimizer-argument-nan",
        MLP,
        SPEC + "stages:\n  default:\n    optimizer: {name: SGD, lr: 0.1, momentum: .nan}\n",
        ["spec.yaml:8:37", "`stages.default.optimizer.momentum` is nan"],
    ),
    Row(
        "seed-overflows",
        MLP,
        SPEC + "train: {seed: 100000000000000000000000}\n",
        ["spec.yaml:6:9", "`train.seed`", "less than or equal to 4294967295"],
    ),
    Row(
        "flag-seed-overflows",
        MLP,
        SPEC,
        ["--seed", "0 to 4294967295"],
        args=["{model}", "--spec", "{spec}", "--seed", "100000000000000000000000"],
    ),
    Row(
        "shape-overflows",
        MLP,
        "inputs:\n  x: {shape: [100000000000, 8]}\ncuts:\n  - after: layers.1\n",
        ["spec.yaml:2:7", "inputs.x.shape", "small batch"],
    ),
    Row(
        "int-input-low-not-below-high",
        TIED,
        "inputs:\n  tokens: {shape: [2, 5], dtype: int64, low: 50, high: 50}\ncuts:\n  - after: emb\n",
        ["spec.yaml:2:3", "`low` (50) must be below `high` (50)"],
    ),
    Row(
        "flag-threads-too-many",
        MLP,
        SPEC,
        ["--threads 100000", "core"],
        args=["{model}", "--spec", "{spec}", "--threads", "100000"],
    ),
    # --- files that cannot be written: the path and the cause, not an internal error
    Row(
        "emit-onto-a-file",
        MLP,
        SPEC,
        ["--emit", "taken.txt", "not a directory"],
        args=["{model}", "--spec", "{spec}", "--emit", "{tmp}/taken.txt"],
        setup=files({"taken.txt": "mine\n"}),
    ),
    Row(
        "emit-under-a-file",
        MLP,
        SPEC,
        ["--emit {tmp}/taken.txt/out", "a part of the path is a file"],
        args=["{model}", "--spec", "{spec}", "--emit", "{tmp}/taken.txt/out"],
        setup=files({"taken.txt": "mine\n"}),
    ),
    Row(
        "metrics-is-a-directory",
        MLP,
        SPEC,
        ["--metrics", "is a directory", "metrics.jsonl"],
        args=[*MLP_TRAIN, "--data", "{tmp}/data", "--metrics", "{tmp}/data"],
        setup=small_fashion_mnist,
    ),
    Row(
        "out-under-a-file",
        None,
        "cuts: []\n",
        ["--out {tmp}/taken.txt/run", "a part of the path is a file, not a directory"],
        args=[*MLP_TRAIN, "--data", "{tmp}/data", "--out", "{tmp}/taken.txt/run"],
        setup=lambda tmp: (small_fashion_mnist(tmp), files({"taken.txt": "mine\n"})(tmp)),
    ),
    Row(
        "data-path-relative-not-found",
        None,
        "model: build_model\ninputs:\n  x: {shape: [2, 784]}\ncuts:\n  - after: layers.0\n"
        "data: {name: fashion-mnist, path: no/such/fm}\n",
        ["Fashion-MNIST not found in no/such/fm (that is, ", "data.path", "working directory"],
        args=["{root}/examples/mlp.py", "--spec", "{spec}", "--train", "--steps", "1"],
    ),
    # --- a model file is imported: script code at its top level is reported, not obeyed
    Row("model-calls-sys-exit", SYS_EXIT, SPEC, ["model.py:5", "called sys.exit(0)", "__main__"]),
    Row("model-raises-keyboard-interrupt", INTERRUPTS, SPEC, ["model.py:4", "KeyboardInterrupt"]),
    Row("factory-calls-sys-exit", FACTORY_EXITS, SPEC, ["model.py:6", "`build_model()` called sys.exit('no GPU')"]),
    # --- the model's output and the labels against the loss, checked once at step 0 with the shapes
    Row(
        "labels-out-of-range-for-the-model",
        NARROW_MLP,
        LOSS_SPEC.format(loss="cross_entropy"),
        [
            "the labels run from 0 to ",
            "the model gives 5 class scores",
            "float32[16, 5]",
            "make its last layer at least",
        ],
        args=["{model}", "--spec", "{spec}", "--train", "--steps", "1", "--data", "{tmp}/data"],
        setup=lambda tmp: (
            small_fashion_mnist(tmp),
            (tmp / "data" / "train-labels-idx1-ubyte.gz").write_bytes(
                gzip.compress(idx((128,), bytes(range(10)) * 12 + bytes(8)))
            ),
        ),
    ),
    Row(
        "mse-with-class-labels",
        NARROW_MLP,
        LOSS_SPEC.format(loss="mse"),
        ["loss `mse` compares the output with float targets", "class indices", "int64[16]", "cross_entropy"],
        args=["{model}", "--spec", "{spec}", "--train", "--steps", "1", "--data", "{tmp}/data"],
        setup=small_fashion_mnist,
    ),
    Row(
        "forward-returns-a-dict-with-a-named-loss",
        DICT_MLP,
        LOSS_SPEC.format(loss="cross_entropy"),
        ["loss `cross_entropy` needs the model to return one tensor", "it returned dict", "from_output"],
        args=["{model}", "--spec", "{spec}", "--train", "--steps", "1", "--data", "{tmp}/data"],
        setup=small_fashion_mnist,
    ),
]


# ----------------------------------------------------------------------------- issue 20: data.loader from a spec
def loader_spec(loader: str) -> str:
    """The MLP spec with `data: {loader: ...}` (its value at spec.yaml:6:8)."""
    return SPEC + f"data: {{loader: '{loader}'}}\n"


LOADER_TRAIN = ["{model}", "--spec", "{spec}", "--allow-imports", "--train", "--steps", "1"]


def loader_file(body: str, head: str = "") -> Callable[[Path], None]:
    """A Row.setup writing data.py with `make_loaders(batch_size)` returning `body` (an expression)."""
    return files({"data.py": f"import torch\n{head}\n\ndef make_loaders(batch_size):\n    return {body}\n"})


GOOD_BATCHES = "[(torch.zeros(2, 8), torch.zeros(2).long())] * 3"
RAISING_ITERABLE = """
class Broken:
    def __iter__(self):
        yield (torch.zeros(2, 8), torch.zeros(2).long())
        raise OSError("the disk went away")
"""

LOADER_ROWS = [
    Row(
        "data-loader-without-allow",
        MLP,
        loader_spec("data.py:make_loaders"),
        ["spec.yaml:6:8", "`data.loader: data.py:make_loaders` names a data loader function", "--allow-imports"],
        setup=files({"data.py": "raise SystemExit('this file must not be imported')\n"}),
        absent=["must not be imported"],
    ),
    Row(
        "data-loader-file-missing",
        MLP,
        loader_spec("dat.py:make_loaders"),
        ["spec.yaml:6:8", "no file {tmp}/dat.py (did you mean 'data.py'?)", "read from the spec's folder"],
        args=LOADER_TRAIN,
        setup=loader_file(GOOD_BATCHES),
    ),
    Row(
        "data-loader-function-missing",
        MLP,
        loader_spec("data.py:make_loader"),
        ["spec.yaml:6:8", "data.py has no function `make_loader`", "did you mean 'make_loaders'"],
        args=LOADER_TRAIN,
        setup=loader_file(GOOD_BATCHES),
    ),
    Row(
        "data-loader-raises",
        MLP,
        loader_spec("data.py:make_loaders"),
        ["spec.yaml:6:8", "make_loaders(batch_size=128) raised at {tmp}/data.py:5", "KeyError: 'path'"],
        args=LOADER_TRAIN,
        setup=loader_file("{}['path']"),
    ),
    Row(
        "data-loader-arguments-do-not-fit",
        MLP,
        SPEC + "data:\n  loader: data.py:make_loaders\n  loader_args: {size: 3}\n",
        [
            "spec.yaml:8:3",
            "spec.yaml:7:3",
            "calling make_loaders(size=3, batch_size=128) failed",
            "make `data.loader_args` match",
        ],
        args=LOADER_TRAIN,
        setup=loader_file(GOOD_BATCHES),
    ),
    Row(
        "data-loader-returns-one-iterable",
        MLP,
        loader_spec("data.py:make_loaders"),
        ["spec.yaml:6:8", "make_loaders() returned a list of 3", "it must return (train, eval)"],
        args=LOADER_TRAIN,
        setup=loader_file(GOOD_BATCHES),
    ),
    Row(
        "data-loader-returns-no-iterable",
        MLP,
        loader_spec("data.py:make_loaders"),
        ["spec.yaml:6:8", "returned int as its train data, not an iterable of batches"],
        args=LOADER_TRAIN,
        setup=loader_file("60000, None"),
    ),
    Row(
        "data-loader-batch-without-labels",
        MLP,
        loader_spec("data.py:make_loaders"),
        ["spec.yaml:6:8", "the training data", "a batch is Tensor[2, 8] float32, but the program takes 1 input(s)"],
        args=LOADER_TRAIN,
        setup=loader_file("[torch.zeros(2, 8)], None"),
    ),
    Row(
        "data-loader-batch-of-other-features",
        MLP,
        loader_spec("data.py:make_loaders"),
        ["spec.yaml:6:8", "input `x` is Tensor[2, 5] float32, but the model was traced with (2, 8) float32"],
        args=LOADER_TRAIN,
        setup=loader_file("[(torch.zeros(2, 5), torch.zeros(2).long())], None"),
        absent=["internal error"],
    ),
    Row(
        "data-loader-eval-batch-of-other-rank",
        MLP,
        loader_spec("data.py:make_loaders"),
        ["spec.yaml:6:8", "a batch of the evaluation data does not fit the program: input `x` is Tensor[2, 2, 4]"],
        args=LOADER_TRAIN,
        setup=loader_file(f"{GOOD_BATCHES}, [(torch.zeros(2, 2, 4), torch.zeros(2).long())]"),
    ),
    Row(
        "data-loader-iteration-raises",
        MLP,
        loader_spec("data.py:make_loaders"),
        ["spec.yaml:6:8", "drawing a batch of the training data raised at {tmp}/data.py:6", "OSError"],
        args=[*LOADER_TRAIN[:-1], "2"],
        setup=loader_file("Broken(), None", head=RAISING_ITERABLE),
    ),
    Row(
        "data-loader-and-a-name",
        MLP,
        SPEC + "data: {name: fashion-mnist, loader: 'data.py:make_loaders'}\n",
        ["spec.yaml:6:1", "`data`: give either `name: fashion-mnist` (a built-in data set) or `loader`"],
    ),
    Row(
        "data-loader-with-data-flag",
        MLP,
        loader_spec("data.py:make_loaders"),
        ["--data {tmp}", "the spec's data come from `data.loader`", "drop --data"],
        args=[*LOADER_TRAIN, "--data", "{tmp}"],
        setup=loader_file(GOOD_BATCHES),
    ),
    Row(
        "data-loader-on-workers",
        MLP,
        loader_spec("data.py:make_loaders"),
        ["spec.yaml:6:8", "`data.loader` trains in one process; drop --workers"],
        args=[*LOADER_TRAIN, "--workers", "2"],
        setup=loader_file(GOOD_BATCHES),
    ),
]


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
        ["spec.yaml:4:5", "int value crosses", "`item`", "values in a tensor", "Only tensors", "keep it a tensor"],
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
    *SECURITY_ROWS,
    *LOADER_ROWS,
]


def _write(tmp_path: Path, row: Row) -> list[str]:
    model = tmp_path / row.model_name
    spec = tmp_path / "spec.yaml"
    if row.model is not None:
        model.write_text(row.model)
    if row.spec is not None:
        spec.write_text(row.spec)
    if row.setup is not None:
        row.setup(tmp_path)
    return [a.format(model=model, spec=spec, tmp=tmp_path, root=ROOT) for a in row.args]


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
    assert "internal error" not in err and "bug" not in err
    expect = [s.format(tmp=tmp_path) for s in row.expect]
    missing = [s for s in expect if s not in err]
    assert not missing, f"stderr lacks {missing}:\n{err}"
    present = [s for s in row.absent if s in err or s in out]
    assert not present, f"output has {present}:\n{err}"
    assert os.environ.get(ALLOW_IMPORTS_ENV) is None, "--allow-imports leaked into this process's environment"


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
