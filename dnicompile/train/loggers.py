"""Where a run's metrics records go: JSON lines, CSV, TensorBoard, or a logger of the user's own.

[Note: loggers] The training loop hands every metrics record (a dict: `step`, then numbers, strings or None,
and dicts of them per cut such as `cosine: {cut: value}`) to one `MetricsWriter`, which keeps it for the
summary's `rows` and passes it to each of the run's loggers, saying whether it is a training line or an
evaluation's. A logger writes one record (`write`) and is closed when the run ends (`close`), also after Ctrl-C
or an error. Only the driver rank logs ([Note: runners] in train/loop.py). The built-in ones, by name:

- `jsonl`: metrics.jsonl, one JSON object per line, flushed as written;
- `csv`: metrics.csv, one row per record, nested dicts flattened to `cosine/<cut>` columns; the header is the
  union of the keys seen, so a record with a new key rewrites the file (atomically) with the wider header, and
  the others are appended and flushed: a crash leaves a file every CSV reader takes;
- `tensorboard`: torch.utils.tensorboard's event files in tensorboard/, one scalar per number under
  `train/<key>` or `eval/<key>` (flattened as in the CSV) at the record's step.

A resumed run's loggers go on from its checkpoint's step: the JSONL and CSV files are cut back to it and
TensorBoard hides the events written after it (SummaryWriter's purge_step).
"""

from __future__ import annotations

import csv
import difflib
import importlib.util
import inspect
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import DNIError
from ..files import write_text_atomic

LOGGERS = ("jsonl", "csv", "tensorboard")
CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
INSTALL_TB = 'pip install -e ".[tb]"'


@runtime_checkable
class Logger(Protocol):
    """Where metrics records go. `kind` is "train" (a log line) or "eval" (an evaluation's scores)."""

    def write(self, record: dict, kind: str) -> None: ...

    def close(self) -> None: ...


def flatten(record: dict, prefix: str = "") -> dict:
    """{"cosine": {"cut": 0.5}} -> {"cosine/cut": 0.5}, at any depth; other values as they are."""
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def read_metrics(path: Path, step: int) -> list[dict]:
    """The records of a metrics.jsonl up to `step`; a line torn by a crash is dropped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                rows.append(row)
    return rows


class JsonlLogger:
    """One JSON object per line, flushed as written, so an interrupted run keeps what it logged. `history`: a
    resumed run's records up to its checkpoint, which replace the file's (atomically) before it goes on."""

    def __init__(self, path: Path, history: list[dict] | None = None):
        self.path = Path(path)
        if history is not None:
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in history))
        self._f = open(self.path, "a" if history is not None else "w")  # noqa: SIM115 - held open for the run

    def write(self, record: dict, kind: str = "train") -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _cell(value) -> str:
    """A CSV cell: numbers as Python writes them (floats round-trip), None empty, lists as JSON."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return json.dumps(value)
    return str(value)


class CsvLogger:
    """metrics.csv: a header of every key seen (nested dicts flattened, `cosine/<cut>`), one row per record. A
    record with a new key rewrites the file atomically with the wider header; the others are appended and
    flushed. `start`: a resumed run's checkpoint step; the rows of `source` (the resumed run's metrics.csv, this
    file where it has none) up to it are kept."""

    def __init__(self, path: Path, start: int = 0, source: Path | None = None):
        self.path = Path(path)
        self.columns: list[str] = []
        self.rows: list[dict] = []  # every row written, flat, to rewrite the file with a new column
        if start:
            src = source if source is not None and source.is_file() else self.path
            if src.is_file():
                with open(src, newline="") as f:
                    reader = csv.DictReader(f)
                    self.columns = list(reader.fieldnames or [])
                    kept = (r for r in reader if _step(r.get("step")) is not None and _step(r["step"]) <= start)
                    self.rows = [{k: v for k, v in r.items() if k is not None} for r in kept]  # no torn cells
        self._rewrite()

    def _rewrite(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, restval="", lineterminator="\n")
        if self.columns:
            writer.writeheader()
            writer.writerows(self.rows)
        if getattr(self, "_f", None) is not None:
            self._f.close()
        write_text_atomic(self.path, text.getvalue())
        self._f = open(self.path, "a", newline="")  # noqa: SIM115 - held open for the run

    def write(self, record: dict, kind: str = "train") -> None:
        row = {k: _cell(v) for k, v in flatten(record).items()}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
            return
        csv.DictWriter(self._f, self.columns, restval="", lineterminator="\n").writerow(row)
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _step(text) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def tensorboard_missing() -> bool:
    return importlib.util.find_spec("tensorboard") is None


class TensorBoardLogger:
    """Event files in `folder` (torch.utils.tensorboard.SummaryWriter): every number of a record a scalar under
    `train/<key>` or `eval/<key>` (flattened: `train/cosine/<cut>`) at the record's step. A fresh run removes
    the event files of a run it replaces; a resumed one (`start`) hides those after its checkpoint's step."""

    def __init__(self, folder: Path, start: int = 0):
        if tensorboard_missing():
            raise DNIError(f"the tensorboard logger needs the `tensorboard` package: {INSTALL_TB}.")
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(folder)
        if not start and folder.is_dir():
            for old in folder.glob("events.out.tfevents.*"):
                old.unlink()
        self._w = SummaryWriter(str(folder), purge_step=start + 1 if start else None, flush_secs=10)

    def write(self, record: dict, kind: str = "train") -> None:
        step = record["step"]
        for key, value in flatten(record).items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._w.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._w.close()


def log_folder(out_dir: Path | None, metrics_path: Path | None) -> Path | None:
    """Where metrics.csv and tensorboard/ go: --out, else the folder of --metrics; None where neither is given."""
    if out_dir is not None:
        return Path(out_dir)
    return Path(metrics_path).parent if metrics_path is not None else None


def chosen_loggers(args) -> list[str]:
    """The command line's --logger names (jsonl where it has none)."""
    return list(getattr(args, "logger", None) or ["jsonl"])


def logger_names(text: str) -> list[str]:
    """--logger jsonl,csv,tensorboard: the names, each known, in order, without repeats; ValueError else."""
    names: list[str] = []
    for part in text.split(","):
        name = part.strip().lower()
        if name not in LOGGERS:
            raise ValueError(f"unknown logger {part.strip()!r}{_choose(name)}")
        if name not in names:
            names.append(name)
    return names


def _choose(name: str) -> str:
    close = difflib.get_close_matches(name, LOGGERS, n=1)
    return (f" (did you mean {close[0]!r}?)" if close else "") + f"; choose from {', '.join(LOGGERS)}"


def check_loggers(chosen: Iterable, has_folder: bool, where: str, folder: str, fix: str) -> None:
    """Before a run starts: csv and tensorboard need a folder to write to, tensorboard its package. In the
    messages, `where` names the option (`--logger `, `fit: loggers=`), `folder` where the files go and `fix`
    what gives it."""
    names = [c for c in chosen if isinstance(c, str)]
    for name in names:
        if name not in LOGGERS:
            raise DNIError(f"{where}{name}: unknown logger{_choose(name)}.")
    for obj in chosen:
        if not isinstance(obj, str) and not isinstance(obj, Logger):
            raise DNIError(
                f"{where}{type(obj).__name__}: not a logger; give a name ({', '.join(LOGGERS)}) or an object "
                "with write(record, kind) and close()."
            )
        if not isinstance(obj, str):
            try:
                inspect.signature(obj.write).bind({}, "train")
            except TypeError:
                raise DNIError(
                    f"{where}{type(obj).__name__}.write{inspect.signature(obj.write)}: a logger's write is called "
                    "with (record, kind), kind being 'train' or 'eval'; add the `kind` argument."
                ) from None
            except ValueError:  # no signature to read (a builtin): it is tried at the first record
                pass
    needs_folder = [n for n in names if n != "jsonl"]
    if needs_folder and not has_folder:
        name = needs_folder[0]
        raise DNIError(
            f"{where}{name}: writes {CSV_FILE if name == 'csv' else TENSORBOARD_DIR + '/'} {folder}; {fix}, or "
            f"leave {name} out."
        )
    if "tensorboard" in names and tensorboard_missing():
        raise DNIError(
            f"{where}tensorboard: the `tensorboard` package is not installed; install the tb extra: {INSTALL_TB} "
            "(or pip install tensorboard)."
        )


def open_loggers(
    chosen: Iterable,
    jsonl: Path | None,
    folder: Path | None,
    start: int,
    history: list[dict] | None,
    previous: Path | None,
) -> list:
    """The run's loggers: names opened (`jsonl` at `jsonl`, csv and tensorboard in `folder`; a name without
    its place is left out), objects as they are. `start`, `history` and `previous` (the resumed run's folder)
    for a resumed run."""
    opened: list = []
    try:
        for item in chosen:
            if not isinstance(item, str):
                opened.append(item)
            elif item == "jsonl" and jsonl is not None:
                opened.append(JsonlLogger(jsonl, history if start else None))
            elif item == "csv" and folder is not None:
                source = previous / CSV_FILE if previous is not None else None
                opened.append(CsvLogger(folder / CSV_FILE, start, source))
            elif item == "tensorboard" and folder is not None:
                opened.append(TensorBoardLogger(folder / TENSORBOARD_DIR, start))
    except BaseException:
        close_all(opened)
        raise
    return opened


class MetricsWriter:
    """The one place a run's records go ([Note: loggers]): kept in `rows` (the summary's), and written by every
    logger."""

    def __init__(self, loggers: list, rows: list[dict] | None = None):
        self.loggers = loggers
        self.rows: list[dict] = rows if rows is not None else []

    def write(self, row: dict, kind: str = "train") -> None:
        self.rows.append(row)
        for logger in self.loggers:
            logger.write(row, kind)

    def close(self) -> None:
        close_all(self.loggers)


def close_all(loggers: list) -> None:
    """Close every logger, the others too when one fails; the first failure is raised."""
    failed: BaseException | None = None
    for logger in loggers:
        try:
            logger.close()
        except BaseException as e:  # noqa: BLE001 - raised below, after the others are closed
            failed = failed or e
    if failed is not None:
        raise failed
