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

import functools
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DataError

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
    """A UTF-8 text file as characters; the first `split` of it trains, the rest is held out."""
    if path is None:
        raise DataError(
            "a text data set needs a file: pass --data FILE (e.g. --data ../shared/data/tinyshakespeare/input.txt) "
            "or set `data.path` in the spec."
        )
    p = Path(path)
    if p.is_dir():
        candidates = sorted(q.name for q in p.glob("*.txt"))
        hint = f" It holds: {', '.join(candidates[:5])}." if candidates else ""
        raise DataError(f"--data {path}: is a directory; pass the text file itself.{hint}")
    if not p.is_file():
        raise DataError(f"--data {path}: no such file; pass a UTF-8 text file (e.g. tinyshakespeare's input.txt).")
    return _load_text(str(p.resolve()), split)


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
