"""Data for recurrent programs: the Copy and Repeat-Copy tasks with their curriculum, and text streams.

Copy (Graves et al. 2014): the network reads N random K-bit vectors, then a delimiter, and must then write
the N vectors back, one per step. Inputs have K + 1 channels (the bits, the delimiter):

    step      0 .. N-1        N            N+1 .. 2N
    input     the vectors     delimiter    zeros
    target    -               -            the vectors        (mask 1 only on these steps)

Repeat-Copy: after the N vectors the delimiter step also carries the number of repeats R (channel K + 1,
as R / max_repeats; R drawn from 1..max_repeats per sequence); the network writes the N vectors R times,
then raises an end marker (output channel K) on the next step. Inputs K + 2 channels, outputs K + 1;
sequences in a batch have different lengths and are padded (mask 0).

The error of a batch is the cross-entropy of the masked output steps in bits, summed over a step's
channels and averaged over the output steps (`bits per output step`; chance is K bits for Copy).
Curriculum (Jaderberg et al. 2017): N starts at `start_length` and grows by one whenever the error
averaged over the last `window` batches is below `threshold`; `solved_length` is the largest N solved.

Text: a file read as characters, split into a training part and a held-out part (the end of the file);
training streams are B contiguous strips of the training part read `seq_len` characters at a time, the
state carried from one chunk to the next; held-out bits per character (BPC) score the held-out part.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..compile.model_file import user_frame
from ..errors import DataError, DNIError, SpecError
from . import download
from .data import Batches
from .loop import Task

LN2 = math.log(2.0)


# --------------------------------------------------------------------------- copy and repeat-copy
@dataclass
class CopyBatch:
    x: torch.Tensor  # (B, L, channels) float
    y: torch.Tensor  # (B, L, outputs) float
    mask: torch.Tensor  # (B, L) float: 1 where the output is scored
    length: int  # N
    repeats: torch.Tensor | None = None  # (B,) for repeat-copy


class CopyTask:
    """Generates Copy (repeat=False) or Repeat-Copy (repeat=True) batches; reproducible from the seed."""

    def __init__(self, bits: int = 8, repeat: bool = False, max_repeats: int = 3, seed: int = 0):
        self.bits, self.repeat, self.max_repeats = bits, repeat, max_repeats
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def name(self) -> str:
        return "repeat_copy" if self.repeat else "copy"

    @property
    def input_size(self) -> int:
        return self.bits + (2 if self.repeat else 1)

    @property
    def output_size(self) -> int:
        return self.bits + (1 if self.repeat else 0)

    def sequence_length(self, n: int) -> int:
        """Time steps of a batch at length n (the longest repeat count, for repeat-copy)."""
        return n + 1 + (self.max_repeats * n + 1 if self.repeat else n)

    def batch(self, batch_size: int, n: int) -> CopyBatch:
        k = self.bits
        vectors = torch.randint(0, 2, (batch_size, n, k), generator=self.gen).float()
        length = self.sequence_length(n)
        x = torch.zeros(batch_size, length, self.input_size)
        y = torch.zeros(batch_size, length, self.output_size)
        mask = torch.zeros(batch_size, length)
        x[:, :n, :k] = vectors
        x[:, n, k] = 1.0  # delimiter
        if not self.repeat:
            y[:, n + 1 : 2 * n + 1, :k] = vectors
            mask[:, n + 1 : 2 * n + 1] = 1.0
            return CopyBatch(x, y, mask, n)
        repeats = torch.randint(1, self.max_repeats + 1, (batch_size,), generator=self.gen)
        x[:, n, k + 1] = repeats.float() / self.max_repeats
        for b in range(batch_size):
            r = int(repeats[b])
            out = vectors[b].repeat(r, 1)  # (r * n, k)
            y[b, n + 1 : n + 1 + r * n, :k] = out
            y[b, n + 1 + r * n, k] = 1.0  # end marker
            mask[b, n + 1 : n + 2 + r * n] = 1.0
        return CopyBatch(x, y, mask, n, repeats)

    @staticmethod
    def error_bits(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
        """Bits per output step: the masked cross-entropy in bits, summed over channels, averaged over steps."""
        ce = F.binary_cross_entropy_with_logits(logits.float(), y.float(), reduction="none").sum(-1)
        return float((ce * mask).sum() / mask.sum().clamp_min(1)) / LN2


class Curriculum:
    """N grows by one when the error averaged over the last `window` batches is below `threshold`."""

    def __init__(self, start: int = 1, max_length: int = 256, threshold: float = 0.15, window: int = 10):
        if start > max_length:
            raise DataError(f"the curriculum starts at length {start}, beyond its max_length {max_length}.")
        self.length, self.max_length, self.threshold, self.window = start, max_length, threshold, window
        self.errors: deque[float] = deque(maxlen=window)
        self.solved_length = start - 1

    def update(self, error: float) -> bool:
        """Record a batch's error at the current length; True when the length grew."""
        self.errors.append(error)
        if len(self.errors) < self.window or sum(self.errors) / len(self.errors) >= self.threshold:
            return False
        self.solved_length = max(self.solved_length, self.length)
        if self.length >= self.max_length:
            return False
        self.length += 1
        self.errors.clear()
        return True

    @property
    def average(self) -> float | None:
        return sum(self.errors) / len(self.errors) if self.errors else None

    def state_dict(self) -> dict:
        return {"length": self.length, "solved_length": self.solved_length, "errors": list(self.errors)}

    def load_state_dict(self, state: dict) -> None:
        self.length, self.solved_length = int(state["length"]), int(state["solved_length"])
        self.errors = deque((float(e) for e in state["errors"]), maxlen=self.window)


# --------------------------------------------------------------------------- text
@dataclass(frozen=True)
class TextData:
    vocab: str
    train: torch.Tensor  # int64 character indices
    valid: torch.Tensor
    source: str

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def load_text(path: str | None, split: float = 0.9) -> TextData:
    """A UTF-8 text file as characters; the first `split` of it trains, the rest is held out. Without a path,
    tiny Shakespeare from the cache folder, downloaded there on first use (train/download.py)."""
    if path is None:
        return _load_text(str(tiny_shakespeare().resolve()), split)
    p = Path(path)
    if p.is_dir():
        candidates = sorted(q.name for q in p.glob("*.txt"))
        hint = f" It holds: {', '.join(candidates[:5])}." if candidates else ""
        raise DataError(f"text data {path}: is a directory; pass the text file itself (--data FILE).{hint}")
    if not p.is_file():
        raise DataError(
            f"text data {path}: no such file (from --data, or else the spec's data.path, a relative one read from "
            "the working directory); pass a UTF-8 text file (e.g. tiny Shakespeare's input.txt), or give neither to "
            "use tiny Shakespeare from the cache folder (downloaded on first use)."
        )
    return _load_text(str(p.resolve()), split)


def tiny_shakespeare() -> Path:
    """tiny Shakespeare's input.txt in the cache folder, downloaded on first use."""
    try:
        return download.fetch("tinyshakespeare") / "input.txt"
    except download.DownloadError as e:
        cache = download.dataset_dir("tinyshakespeare")
        raise DataError(
            f"a text data set needs a file, and none was given: tiny Shakespeare is not in the cache folder {cache} "
            f"and could not be downloaded: {e}. Pass --data FILE (or set `data.path` in the spec) to a UTF-8 text "
            f"file, or put tiny Shakespeare's input.txt at {cache / 'input.txt'} (the cache folder; "
            f"{download.CACHE_ENV}=DIR moves it to DIR/tinyshakespeare), copied from {download.TINY_SHAKESPEARE_URL}. "
            "Without these, the next run tries the download again"
            + (f" once {download.OFFLINE_ENV} is unset." if download.offline() else ".")
        ) from None


@functools.lru_cache(maxsize=2)
def _load_text(path: str, split: float) -> TextData:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}).") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e}).") from None
    if len(text) < 200:
        raise DataError(f"{path}: only {len(text)} characters; a language model needs a longer text.")
    vocab = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(len(ids) * split)
    return TextData(vocab, ids[:cut], ids[cut:], path)


class TextStreams:
    """B parallel streams over the training text, `seq_len` characters per chunk.

    `next()` returns (x, y, start): x (B, seq_len) characters, y (B, seq_len + lookahead) the characters that
    follow each of them, and start=True when the streams (re)start from the beginning of their strips.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, lookahead: int = 0):
        strip = len(ids) // batch_size
        if strip < seq_len + lookahead + 2:
            raise DataError(
                f"the training text ({len(ids)} characters) is too short for {batch_size} streams of "
                f"{seq_len + lookahead + 1} characters; lower the batch size or data.seq_len."
            )
        self.strips = ids[: strip * batch_size].reshape(batch_size, strip)
        self.seq_len, self.lookahead, self.pos, self.epoch = seq_len, lookahead, 0, 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        start = self.pos == 0
        if self.pos + self.seq_len + self.lookahead + 1 > self.strips.shape[1]:
            self.pos, self.epoch, start = 0, self.epoch + 1, True
        p, n = self.pos, self.seq_len
        x = self.strips[:, p : p + n]
        y = self.strips[:, p + 1 : p + 1 + n + self.lookahead]
        self.pos += n
        return x, y, start


@torch.no_grad()
def evaluate_text(program, ids: torch.Tensor, streams: int = 32, chunk: int = 512, device=None) -> dict:
    """Held-out bits per character of the program (and of its upper core's predictions, if any)."""
    device = device or torch.device("cpu")
    strip = len(ids) // streams
    if strip < 2:
        streams, strip = 1, len(ids)
    data = ids[: strip * streams].reshape(streams, strip).to(device)
    program.eval()
    total, count, upper_total, upper_count = 0.0, 0, 0.0, 0
    state = upper_state = None
    horizon = program.upper.horizon if program.upper is not None else 0
    try:
        for p in range(0, strip - 1, chunk):
            x = data[:, p : min(p + chunk, strip - 1)]
            y = data[:, p + 1 : p + 1 + x.shape[1]]
            if program.upper is None:
                logits, state = program.run(x, state)
            else:
                if upper_state is None:
                    upper_state = program.upper.core.init_state(streams, device=device)
                logits, state, upper_state, up = _run_with_upper(program, x, state, upper_state, p)
                ahead = data[:, p + 1 :]
                for tick, t in enumerate(up["times"]):
                    tgt = ahead[:, t - p : t - p + horizon]
                    n = tgt.shape[1]
                    if n < horizon:
                        continue
                    pred = up["preds"][:, tick]
                    upper_total += float(
                        F.cross_entropy(pred.reshape(-1, pred.shape[-1]), tgt.reshape(-1), reduction="sum")
                    )
                    upper_count += tgt.numel()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
            count += y.numel()
    finally:
        program.train()
    out = {"bpc": total / max(count, 1) / LN2}
    if program.upper is not None:
        out["upper_bpc"] = upper_total / max(upper_count, 1) / LN2
    return out


def _run_with_upper(program, x, state, upper_state, time: int):
    out, state = program.lower_step_outputs(x, state)
    logits = program.output(out)
    preds, times = [], []
    for t in range(out.shape[1]):
        if program.upper.ticks_at(time + t):
            p, upper_state = program.upper.step(out[:, t], upper_state)
            preds.append(p)
            times.append(time + t)
    up = {"preds": torch.stack(preds, 1) if preds else None, "times": times}
    return logits, state, upper_state, up


# --------------------------------------------------------------------------- the loop's plug-ins
# [Note: one loop] in train/loop.py: each data set the command line knows is a Task of the one training loop.
class Classification(Task):
    """Labelled samples (Fashion-MNIST): batches drawn with the run's seed, training accuracy on each batch,
    test accuracy and cross-entropy on the held-out set at each evaluation."""

    name = "classification"

    def __init__(self, data):
        self.data = data
        self.loss_avg = self.acc_avg = None
        self.test_accuracy = None

    def setup(self, program, device, options, console) -> None:
        super().setup(program, device, options, console)
        self.batches = Batches(self.data.train_x, self.data.train_y, options.batch_size, options.seed)

    def next(self):
        x, y = self.batches.next()
        return shape_batch(self.program, x).to(self.device), y.to(self.device)

    def step(self, program, batch):
        return program.train_step(*batch)

    def measure(self, result, batch) -> dict:
        acc = float((result.output.argmax(-1) == batch[1]).float().mean())
        self.loss_avg = result.loss if self.loss_avg is None else 0.9 * self.loss_avg + 0.1 * result.loss
        self.acc_avg = acc if self.acc_avg is None else 0.9 * self.acc_avg + 0.1 * acc
        self.batch_size = len(batch[0])
        return {"train_accuracy": acc, **_step_fields(result)}

    def status(self, rate: float) -> str:
        return f"loss {self.loss_avg:.3f} acc {self.acc_avg:.3f} {rate / self.batch_size:.1f} steps/s"

    def evaluate(self, program, step: int):
        return self.scored(step, *evaluate_classifier(program, self.data.test_x, self.data.test_y, self.device))

    def scored(self, step: int, acc: float, loss: float):
        """The evaluation's line and fields, from the test accuracy and loss (however they were computed)."""
        self.test_accuracy = acc
        line = f"step {step:>6}: train loss {self.loss_avg:.4f}, test accuracy {acc:.4f}"
        return {"loss": self.loss_avg, "test_accuracy": acc, "test_loss": loss}, line

    def summary(self) -> dict:
        return {"test_accuracy": self.test_accuracy}

    def state_dict(self) -> dict:
        return {
            "batches": self.batches.state_dict(),
            "averages": [self.loss_avg, self.acc_avg],
            "test_accuracy": self.test_accuracy,
        }

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])
        self.loss_avg, self.acc_avg = state["averages"]
        self.test_accuracy = state["test_accuracy"]


def shape_batch(program, x: torch.Tensor) -> torch.Tensor:
    """Reshape a batch of images to the program's first input, e.g. (B, 1, 28, 28) -> (B, 784)."""
    info = program.stages[0].inputs[0]
    per_sample = tuple(info.shape[1:])
    if math.prod(per_sample) != math.prod(x.shape[1:]):
        raise DNIError(
            f"the data's samples have shape {tuple(x.shape[1:])} but the model's input `{info.name}` expects "
            f"{per_sample} per sample; fix `inputs:` in the spec."
        )
    return x.reshape(x.shape[0], *per_sample).to(info.dtype)


@torch.no_grad()
def evaluate_classifier(program, x, y, device, batch_size: int = 1000) -> tuple[float, float]:
    """Test accuracy and mean cross-entropy, with every stage in eval mode."""
    program.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, len(x), batch_size):
        xb = shape_batch(program, x[i : i + batch_size]).to(device)
        yb = y[i : i + batch_size].to(device)
        out = program(xb)
        correct += int((out.argmax(-1) == yb).sum())
        loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
    program.train()
    return correct / len(x), loss_sum / len(x)


def _recurrent_fields(result) -> dict:
    return {"aux_loss": result.aux_loss} if result.aux_loss is not None else {}


class CopyCurriculum(Task):
    """Copy or Repeat-Copy with the curriculum: the sequence length grows as the error falls; a log line also
    whenever it grows; the summary's `solved_length` is the longest length solved."""

    def __init__(self, config, seed: int):
        self.name = config.name
        self.task = CopyTask(
            config.bits, repeat=config.name == "repeat_copy", max_repeats=config.max_repeats, seed=seed
        )
        self.curriculum = Curriculum(config.start_length, config.max_length, config.threshold, config.window)
        self.err_avg, self.grew = None, False

    def setup(self, program, device, options, console) -> None:
        super().setup(program, device, options, console)
        if program.upper is not None:
            raise SpecError(
                f"{program.spec.where('recurrent', 'upper')}: the upper core predicts the next characters of a text; "
                "train a hierarchical program on `data: text`."
            )
        check_recurrent_sizes(program, self.task.input_size, self.task.output_size, self.name)

    def next(self):
        b = self.task.batch(self.options.batch_size, self.curriculum.length)
        return b.x.to(self.device), b.y.to(self.device), b.mask.to(self.device)

    def step(self, program, batch):
        return program.train_step(*batch)

    def measure(self, result, batch) -> dict:
        error = self.task.error_bits(result.output, batch[1], batch[2])
        self.err_avg = error if self.err_avg is None else 0.9 * self.err_avg + 0.1 * error
        length = self.curriculum.length
        self.grew = self.curriculum.update(error)
        return {
            **_recurrent_fields(result),
            "error_bits": error,
            "length": length,
            "solved_length": self.curriculum.solved_length,
        }

    def log_now(self) -> bool:
        return self.grew

    def note(self, step: int) -> str | None:
        if self.grew:
            return f"step {step:>6}: solved length {self.curriculum.solved_length}, now {self.curriculum.length}"
        return None

    def status(self, rate: float) -> str:
        c = self.curriculum
        return f"length {c.length} solved {c.solved_length} error {self.err_avg:.3f} bits"

    def evaluate(self, program, step: int):
        c = self.curriculum
        return {"solved_length": c.solved_length, "length": c.length, "error_bits": c.average}, None

    def summary(self) -> dict:
        c = self.curriculum
        # error_bits: at `length`, over the last `window` batches
        return {"task": self.name, "solved_length": c.solved_length, "length": c.length, "error_bits": c.average}

    def state_dict(self) -> dict:
        return {"gen": self.task.gen.get_state(), "curriculum": self.curriculum.state_dict(), "err_avg": self.err_avg}

    def load_state_dict(self, state: dict) -> None:
        self.task.gen.set_state(state["gen"])
        self.curriculum.load_state_dict(state["curriculum"])
        self.err_avg, self.grew = state["err_avg"], False


class TextTask(Task):
    """Character-level text: B streams read `seq_len` characters at a time, the state carried between chunks;
    held-out bits per character (and the upper core's, for a hierarchical program) at each evaluation."""

    name = "text"
    rate_key = "chars_per_s"

    def __init__(self, config, path: str | None):
        self.config, self.path = config, path
        self.bpc_avg = None
        self.scores: dict = {"bpc": None}

    def setup(self, program, device, options, console) -> None:
        super().setup(program, device, options, console)
        d = self.config
        data = load_text(self.path, d.split)
        check_recurrent_sizes(program, None, data.vocab_size, "text")
        lookahead = program.upper.horizon - 1 if program.upper is not None else 0
        self.streams = TextStreams(data.train, options.batch_size, d.seq_len, lookahead)
        self.valid = data.valid[: d.eval_chars] if d.eval_chars else data.valid
        console.print(
            f"text {data.source}: {len(data.train)} training / {len(data.valid)} held-out characters, "
            f"{data.vocab_size} symbols; {options.batch_size} streams of {d.seq_len} characters per step",
            highlight=False,
        )

    def next(self):
        x, y, first = self.streams.next()
        return x.to(self.device), y.to(self.device), first

    def step(self, program, batch):
        x, y, first = batch
        return program.train_step(x, y, start=first, end=False)

    def count(self, batch) -> int:
        return batch[0].numel()

    def measure(self, result, batch) -> dict:
        train_bpc = result.loss / LN2
        self.bpc_avg = train_bpc if self.bpc_avg is None else 0.95 * self.bpc_avg + 0.05 * train_bpc
        fields = {**_recurrent_fields(result), "train_bpc": train_bpc}
        if result.upper_loss is not None:
            fields["upper_train_bpc"] = result.upper_loss / LN2
        return fields

    def status(self, rate: float) -> str:
        return f"train bpc {self.bpc_avg:.3f}"

    def evaluate(self, program, step: int):
        self.scores = evaluate_text(program, self.valid, device=self.device)
        up = f", upper {self.scores['upper_bpc']:.4f}" if "upper_bpc" in self.scores else ""
        line = f"step {step:>6}: train bpc {self.bpc_avg:.4f}, held-out bpc {self.scores['bpc']:.4f}{up}"
        return {**self.scores, "train_bpc_avg": self.bpc_avg}, line

    def summary(self) -> dict:
        return {"task": "text", **self.scores}

    def state_dict(self) -> dict:
        # the streams' place in the text; the core's state carried between chunks is the runtime's and starts
        # again from zero on resuming (the recurrent runtime's state_dict does not hold it)
        return {"pos": self.streams.pos, "epoch": self.streams.epoch, "bpc_avg": self.bpc_avg, "scores": self.scores}

    def load_state_dict(self, state: dict) -> None:
        self.streams.pos, self.streams.epoch = int(state["pos"]), int(state["epoch"])
        self.bpc_avg, self.scores = state["bpc_avg"], dict(state["scores"])


def check_recurrent_sizes(program, inputs: int | None, outputs: int, what: str) -> None:
    """The model's input and output sizes must fit the data set; say which model_args to change."""
    where = program.spec.where("model_args")
    x_size = None
    core = program.core.module
    if program.input is None:
        x_size = getattr(core, "input_size", None)
    elif isinstance(program.input, torch.nn.Embedding):
        if program.input.num_embeddings < outputs and what == "text":
            raise DataError(
                f"{where}: the text has {outputs} distinct characters but the model's embedding "
                f"`{program.spec.recurrent.input}` has {program.input.num_embeddings} rows; set the vocabulary size "
                f"in `model_args` to {outputs}."
            )
    if inputs is not None and x_size is not None and x_size != inputs:
        raise DataError(
            f"{where}: {what} feeds {inputs} channels per step but the core `{program.spec.recurrent.core}` takes "
            f"{x_size}; set the model's input size to {inputs} in `model_args`."
        )
    with torch.no_grad():
        h = program.core.step_output(program.core.init_state(1))
        y = program.output(h[:, None])
    if y.shape[-1] != outputs:
        unit = "characters" if what == "text" else "output channels"
        raise DataError(
            f"{where}: {what} has {outputs} {unit} but the model's readout `{program.spec.recurrent.output}` gives "
            f"{y.shape[-1]}; set its output size to {outputs} in `model_args`."
        )


# --------------------------------------------------------------------------- any data
LABEL_KEYS = ("labels", "label", "targets", "target", "y")  # where a dict batch's labels are looked for


def describe_batch(batch, depth: int = 0) -> str:
    """A batch's structure, for errors: tuple(Tensor[64, 1, 28, 28] float32, Tensor[64] int64)."""
    if isinstance(batch, torch.Tensor):
        return f"Tensor[{', '.join(str(d) for d in batch.shape)}] {str(batch.dtype).removeprefix('torch.')}"
    if depth > 2:
        return type(batch).__name__
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k!r}: {describe_batch(v, depth + 1)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__}(" + ", ".join(describe_batch(v, depth + 1) for v in batch) + ")"
    return type(batch).__name__


class DataTask(Task):
    """Batches from any iterables (a DataLoader, a list, a generator), for `dnicompile.fit` ([Note: batches]).

    [Note: batches] A batch's parts go to the program's inputs (`program.input_names`, the model's forward()
    arguments) and its labels: a tuple or list holds the inputs in that order and then the labels (no labels where
    the model computes its own loss, `loss: {from_output: ...}`); a dict names them (the inputs by name, the labels
    under `target` or the first of labels / label / targets / target / y); a tensor is the one input of a model
    that needs no labels. Anything else, or a part of the wrong rank, is a DataError that shows the batch's
    structure. The training data are iterated again at the end of each pass (an epoch); a checkpoint keeps the
    epoch, the place in it and the random state at its start, so a resumed run draws the same batches as one
    that never stopped (for a DataLoader whose shuffling comes from torch's generator, the default)."""

    name = "data"

    def __init__(self, train_data, eval_data=None, target: str | None = None, origin: str | None = None):
        """`origin`: where the data come from (the command line's `spec.yaml:9:11: data.loader: ...`); with it,
        every error about a batch starts there, and an exception while drawing one becomes a DataError."""
        self.train_data, self.eval_data, self.target, self.origin = train_data, eval_data, target, origin
        self.epoch, self.index = 0, 0  # the pass over train_data, and batches drawn in it
        self._iter = None
        self._epoch_rng: torch.Tensor | None = None
        self.loss_avg = self.acc_avg = None
        self.scores: dict = {}
        self._checked = False

    def setup(self, program, device, options, console) -> None:
        super().setup(program, device, options, console)
        if not hasattr(program, "input_names"):
            raise DNIError(
                "dnicompile.fit takes a feed-forward program (compile_decoupled); recurrent programs train "
                "with the command line's tasks."
            )
        self.names = list(program.input_names)
        self.own_loss = not isinstance(program.spec.loss, str)  # the model returns its loss: no labels
        self.loss_fn = program.runtime.loss_fn

    # ---------------------------------------------------------------- batches
    def _start_epoch(self) -> None:
        self._epoch_rng = torch.get_rng_state()
        self._iter = iter(self.train_data)
        self.index = 0

    def next(self):
        with self._located("training"):
            if self._iter is None:
                self._start_epoch()
            try:
                batch = next(self._iter)
            except StopIteration:
                self.epoch += 1
                self._start_epoch()
                try:
                    batch = next(self._iter)
                except StopIteration:
                    raise DataError(
                        "the training data gave no batch: it is empty (or a generator already used up; "
                        "pass a list or a DataLoader, which can be iterated again)."
                    ) from None
            self.index += 1
            return self.split(batch)

    @contextlib.contextmanager
    def _located(self, which: str):
        """With an `origin`: errors about the data start with it, and the data's own exceptions become DataErrors
        that name the line of the user's code that raised."""
        if self.origin is None:
            yield
            return
        try:
            yield
        except DataError as e:
            raise DataError(f"{self.origin}, the {which} data: {e}") from None
        except Exception as e:  # drawing a batch ran the user's code (a Dataset, a collate_fn, a generator)
            at = user_frame(e.__traceback__)
            raise DataError(
                f"{self.origin}: drawing a batch of the {which} data raised"
                + (f" at {at}" if at else "")
                + f": {type(e).__name__}: {e}"
            ) from None

    def split(self, batch) -> tuple[tuple, torch.Tensor | None]:
        """(the program's inputs, the labels or None) of a batch, on the device ([Note: batches])."""
        n, names = len(self.names), self.names
        want = f"{n} input(s) {names}" + ("" if self.own_loss else " and then the labels")
        if isinstance(batch, dict):
            missing = [k for k in names if k not in batch]
            key = self.target or next((k for k in LABEL_KEYS if k in batch), None)
            if missing or (not self.own_loss and key not in batch):
                lack = missing + ([] if self.own_loss or key in batch else [self.target or "labels"])
                raise DataError(
                    f"a batch is {describe_batch(batch)}, without {lack}: a dict batch names the program's inputs "
                    f"{names}" + ("" if self.own_loss else " and its labels (fit(..., target='key'))") + "."
                )
            inputs, target = [batch[k] for k in names], None if self.own_loss else batch[key]
        elif isinstance(batch, (tuple, list)) and len(batch) == n + (0 if self.own_loss else 1):
            inputs, target = list(batch[:n]), None if self.own_loss else batch[n]
        elif isinstance(batch, torch.Tensor) and n == 1 and self.own_loss:
            inputs, target = [batch], None
        else:
            raise DataError(
                f"a batch is {describe_batch(batch)}, but the program takes {want}: give batches as a tuple "
                f"({', '.join(names)}{'' if self.own_loss else ', labels'}) or a dict by name."
            )
        if not all(isinstance(t, torch.Tensor) for t in inputs):
            raise DataError(f"a batch is {describe_batch(batch)}: the program's inputs {names} must be tensors.")
        if not self._checked:
            self._check_ranks(inputs, batch)
        inputs = tuple(t.to(self.device) for t in inputs)
        return inputs, (target.to(self.device) if isinstance(target, torch.Tensor) else target)

    def _check_ranks(self, inputs: list, batch) -> None:
        for name, t, info in zip(self.names, inputs, self.program.stages[0].inputs):
            if len(t.shape) != len(info.shape):
                raise DataError(
                    f"input `{name}`: the model was traced with {tuple(info.shape)} (the spec's `inputs:`), but a "
                    f"batch gives {tuple(t.shape)} (the batch: {describe_batch(batch)}); reshape it in the dataset or "
                    f"the DataLoader's collate_fn, e.g. x.reshape(len(x), {', '.join(map(str, info.shape[1:]))})."
                )
        self._checked = True

    # ---------------------------------------------------------------- steps and scores
    def step(self, program, batch):
        inputs, target = batch
        try:
            return program.runtime.train_step(inputs, target)
        except RuntimeError as e:
            self._does_not_fit(inputs, e, "training")
            raise

    def count(self, batch) -> int:
        return len(batch[0][0])  # the first input's batch dimension

    def _does_not_fit(self, inputs, error: RuntimeError, which: str) -> None:
        """The program failed on a batch: where an input's sample shape or dtype is not the traced one, that is
        the cause; say so as a DataError (else the error is the program's, and is raised as it is)."""
        for name, t, info in zip(self.names, inputs, self.program.stages[0].inputs):
            if tuple(t.shape[1:]) != tuple(info.shape[1:]) or t.dtype != info.dtype:
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                where = f"{self.origin}: " if self.origin else ""
                traced = f"({', '.join(map(str, info.shape))}) {str(info.dtype).removeprefix('torch.')}"
                raise DataError(
                    f"{where}a batch of the {which} data does not fit the program: input `{name}` is "
                    f"{describe_batch(t)}, but the model was traced with {traced} (the spec's `inputs:`), and running "
                    f"it failed ({type(error).__name__}: {first}). Make the batches' samples match `inputs:`, or "
                    "change `inputs:` to the data's."
                ) from None

    def measure(self, result, batch) -> dict:
        fields = _step_fields(result)
        self.loss_avg = result.loss if self.loss_avg is None else 0.9 * self.loss_avg + 0.1 * result.loss
        acc = _accuracy(result.output, batch[1])
        if acc is not None:
            fields["train_accuracy"] = acc
            self.acc_avg = acc if self.acc_avg is None else 0.9 * self.acc_avg + 0.1 * acc
        return fields

    def status(self, rate: float) -> str:
        acc = f" acc {self.acc_avg:.3f}" if self.acc_avg is not None else ""
        return f"loss {self.loss_avg:.3f}{acc} epoch {self.epoch}"

    @torch.no_grad()
    def evaluate(self, program, step: int):
        if self.eval_data is None:
            return None
        program.eval()
        loss_sum, correct, count, scored = 0.0, 0, 0, True
        # a DataLoader draws a seed from torch's generator for every pass, shuffled or not: evaluating must not move
        # the training's random stream, or a run that evaluates at another step (a stop) draws other batches after
        try:
            with torch.random.fork_rng(devices=[]):
                with self._located("evaluation"):
                    batches = iter(self.eval_data)
                while True:
                    with self._located("evaluation"):
                        batch = next(batches, _END)
                        if batch is _END:
                            break
                        inputs, target = self.split(batch)
                    try:
                        out = program(*inputs)
                    except RuntimeError as e:
                        self._does_not_fit(inputs, e, "evaluation")
                        raise
                    size = len(inputs[0])
                    loss_sum += float(self.loss_fn(out, target)) * size
                    count += size
                    acc = _accuracy(out, target)
                    scored = scored and acc is not None
                    correct += round(acc * size) if acc is not None else 0
        finally:
            program.train()
        if count == 0:
            raise DataError("the evaluation data gave no batch.")
        self.scores = {"test_loss": loss_sum / count}
        if scored:
            self.scores["test_accuracy"] = correct / count
        acc = f", test accuracy {self.scores['test_accuracy']:.4f}" if scored else ""
        line = f"step {step:>6}: train loss {self.loss_avg:.4f}, test loss {self.scores['test_loss']:.4f}{acc}"
        return {"loss": self.loss_avg, **self.scores}, line

    def summary(self) -> dict:
        return {
            "test_accuracy": self.scores.get("test_accuracy"),
            "test_loss": self.scores.get("test_loss"),
            "epochs_begun": self.epoch + (1 if self._iter is not None else 0),
        }

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "epoch_rng": self._epoch_rng,
            "averages": [self.loss_avg, self.acc_avg],
            "scores": dict(self.scores),
        }

    def load_state_dict(self, state: dict) -> None:
        """Draw the batches of this epoch up to the checkpoint's place again, from the epoch's random state."""
        self.epoch, index = int(state["epoch"]), int(state["index"])
        self.loss_avg, self.acc_avg = state["averages"]
        self.scores = dict(state["scores"])
        if state["epoch_rng"] is None:
            return
        now = torch.get_rng_state()
        torch.set_rng_state(state["epoch_rng"])
        self._start_epoch()
        for _ in range(index):
            next(self._iter)
        self.index = index
        torch.set_rng_state(now)


_END = object()  # the end of an iterator, for next(it, _END)


def _accuracy(output, target) -> float | None:
    """The batch's accuracy where the output is class scores (B, K) and the labels class indices (B,)."""
    if not (isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor)):
        return None
    if output.dim() != 2 or target.shape != output.shape[:1] or target.dtype.is_floating_point:
        return None
    return float((output.argmax(-1) == target).float().mean())


def _step_fields(result) -> dict:
    """A feed-forward step's per-cut fields beyond loss, cosine and synth_loss: synthetic inputs' loss, local
    heads' accuracy, the age of the gradient each delayed cut applied."""
    fields = {}
    if result.input_loss:
        fields["input_loss"] = result.input_loss
    if result.head_accuracy:  # local-loss cuts: their head's accuracy on this batch (its loss is in synth_loss)
        fields["head_accuracy"] = result.head_accuracy
    if getattr(result, "staleness", None):  # delayed cuts
        fields["staleness"] = result.staleness
    return fields
