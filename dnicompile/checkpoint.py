"""Run checkpoints in torch.distributed.checkpoint's format, one for every runtime.

[Note: dcp checkpoints] A checkpoint is a folder `ckpt-<step, 8 digits>/` written with torch.distributed.checkpoint
(DCP: a `.metadata` file and `__<rank>_<n>.distcp` data files), whether one process or several workers wrote it.
Its keys:
  - `model.<fqn>`: the model's tensors by their state_dict names (so `dcp.load({"model": sd}, ...)` reads them);
  - `stage/<i>`: stage i's state (optimizer, scheduler, clock, what StageState adds), by stage index;
  - `interface/<cut name>`: each cut's interface (synthesizers, heads, queues), by cut name;
  - `runtime`: the rest of the runtime's state (its step; the recurrent runtime's stream);
  - `task`: the task's state (data position, curriculum, running averages), from the driver;
  - `rng/<rank>`: each rank's random state; `tied/<rank>`: a rank's replicas of tied tensors shared with others;
  - `meta/format`, `meta/step`, `meta/world` (how many workers wrote it) and `meta/placement` ([first, last]
    stages of each rank).
A part that is a nested state (everything but the model's tensors) is stored as its layout under its own key, a
structure of dicts, lists and plain values in which each tensor is replaced by the key it is stored under
(`("\\x00tensor", key)`); DCP keeps the layout and plain values as `torch.save`d bytes and the tensors as tensors.
So nothing depends on what a stage's state holds, and every rank writes the keys of its own stages and reads the
keys of its stages, whatever the number of workers that wrote it ([Note: resuming on other workers]).

Writing (`write_checkpoint`): the driver makes `.ckpt-<step>.tmp/`; one process calls dcp.save without a process
group; several call it with `use_collectives=False`, so each rank writes its own `__<rank>_0.distcp` and
`__<rank>.metadata` and the ranks meet only at barriers (no pickled object travels between them); the driver then
merges the ranks' metadata into `.metadata`, fsyncs every file and the folder, renames it to `ckpt-<step>/`,
points `LATEST` at it and keeps the newest K ([Note: checkpoint files]).

Reading never runs code (issue 19): DCP reads `.metadata` with plain `pickle.load`, so `SafeReader` reads it with
an unpickler that builds DCP's metadata classes, torch.Size, dtypes and layouts and nothing else (anything else is
an UnsafeFileError naming what was asked for); its data files must be plain names inside the folder; tensors are
read with `torch.load(weights_only=True)` (DCP's own reader), and the plain values, which DCP's default planner
reads with `weights_only=False`, are read by `SafeLoadPlanner` with `weights_only=True`.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from .errors import DNIError
from .files import (
    DamagedFileError,
    UnsafeFileError,
    _first_line,
    _fsync,
    checkpoint_name,
    prune_checkpoints,
    write_text_atomic,
)

FORMAT = 3  # meta/format: 1 and 2 were the ckpt-<step>.pt files and rank<k>.pt shards of dnicompile 0.1.0
METADATA = ".metadata"
_TENSOR = "\x00tensor"
_RANK_METADATA = re.compile(r"^__(\d+)\.metadata$")


# --------------------------------------------------------------------------- reading without running code
def _safe_globals() -> dict[tuple[str, str], object]:
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md
    from torch.serialization import _get_layout

    allowed = {("torch.distributed.checkpoint.metadata", n): getattr(md, n) for n in md.__all__ if hasattr(md, n)}
    for name in ("_MEM_FORMAT_ENCODING", "StorageMeta", "TensorProperties", "ChunkStorageMetadata"):
        allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(md, name)
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = _get_layout
    for name in dir(torch):  # dtypes (torch.float32, ...) and memory formats are constants, not code
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.memory_format, torch.layout)):
            allowed[("torch", name)] = value
    # DCP records the folder it was written to (storage_meta.checkpoint_id): a path is a value
    for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        allowed[("pathlib", name)] = __import__("pathlib").__dict__[name]
    return allowed


_ALLOWED: dict | None = None


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata and nothing else: any other class or function is refused before it is touched."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _safe_globals()
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UnsafeFileError(
                f"{self.path}: refused: the file asks to load {module}.{name}, which is not checkpoint metadata; a "
                "checkpoint that dnicompile writes holds only tensors and plain values, so this one was made or "
                "changed by something else. Nothing from it was run."
            )
        return found


def read_metadata(path: Path):
    """A DCP `.metadata` file, read without running code from it (UnsafeFileError where it asks to), checked to
    name only data files inside its folder (DamagedFileError otherwise, or where it cannot be read)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except UnsafeFileError:
        raise
    except OSError as e:
        if e.errno is not None and not isinstance(e, FileNotFoundError):
            raise
        raise DamagedFileError(f"{path.parent}: not a readable checkpoint (no {path.name})") from None
    except Exception as e:  # truncated, not a pickle
        raise DamagedFileError(
            f"{path}: not a readable checkpoint ({_first_line(str(e)) or type(e).__name__})"
        ) from None
    md = _dcp().md
    if not isinstance(metadata, md.Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise DamagedFileError(f"{path}: not checkpoint metadata")
    for key, entry in metadata.state_dict_metadata.items():
        tensor = isinstance(entry, md.TensorStorageMetadata) and (
            isinstance(entry.size, torch.Size) and isinstance(getattr(entry.properties, "dtype", None), torch.dtype)
        )
        if not isinstance(key, str) or not (tensor or isinstance(entry, md.BytesStorageMetadata)):
            raise DamagedFileError(f"{path}: its entry {key!r} is neither a tensor nor a value")
    for index, info in (metadata.storage_data or {}).items():
        name = getattr(info, "relative_path", None)
        if (
            not isinstance(name, str)
            or name != os.path.basename(name)
            or name in ("", ".", "..")
            or getattr(info, "transform_descriptors", None)
        ):
            raise DamagedFileError(f"{path}: `{getattr(index, 'fqn', index)}` is stored outside the checkpoint")
    return metadata


_DCP: SimpleNamespace | None = None


def _dcp() -> SimpleNamespace:
    """torch.distributed.checkpoint and dnicompile's safe reader and planner, imported on first use (the import
    takes a second or two, which a run that never checkpoints should not pay)."""
    global _DCP
    if _DCP is not None:
        return _DCP
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.metadata as md
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

    class SafeReader(FileSystemReader):
        """DCP's file reader with `read_metadata` that never runs code ([Note: dcp checkpoints])."""

        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            name = METADATA if rank is None else f"__{rank}{METADATA}"
            metadata = read_metadata(Path(self.path) / name)
            if getattr(metadata, "storage_meta", None) is not None:
                metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's load planner, reading plain values with weights_only=True (DCP's own reads them with False)."""

        def __init__(self) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    _DCP = SimpleNamespace(
        dcp=dcp,
        md=md,
        FileSystemWriter=FileSystemWriter,
        CheckpointException=CheckpointException,
        DefaultSavePlanner=DefaultSavePlanner,
        SafeReader=SafeReader,
        SafeLoadPlanner=SafeLoadPlanner,
    )
    return _DCP


# --------------------------------------------------------------------------- nested states as flat keys
def flatten(name: str, value, into: dict) -> None:
    """Put the nested state `value` into `into` under `name`: its layout there, its tensors beside it."""

    def walk(v, path: str):
        if isinstance(v, torch.Tensor):
            key = f"{name}/{path}" if path else f"{name}/tensor"
            while key in into:
                key += "'"
            t = v.detach().cpu()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
                t = t.clone()  # a view: only its own elements
            into[key] = t
            return (_TENSOR, key)
        if isinstance(v, dict):
            out = {k: walk(x, f"{path}/{k}" if path else str(k)) for k, x in v.items()}
            return _like(v, out)
        if isinstance(v, (list, tuple)):
            items = [walk(x, f"{path}/{i}" if path else str(i)) for i, x in enumerate(v)]
            return items if isinstance(v, list) else tuple(items)
        return v

    into[name] = walk(value, "")


def _like(original: dict, items: dict) -> dict:
    """`items` as the kind of dict `original` is: a module's state_dict is an OrderedDict with its version
    `_metadata`, which load_state_dict reads."""
    if not isinstance(original, OrderedDict):
        return items
    out = OrderedDict(items)
    if hasattr(original, "_metadata"):
        out._metadata = original._metadata
    return out


def _tensor_keys(layout) -> list[str]:
    keys = []

    def walk(v):
        if isinstance(v, tuple) and len(v) == 2 and v[0] == _TENSOR:
            keys.append(v[1])
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(layout)
    return keys


def _rebuild(layout, tensors: dict):
    if isinstance(layout, tuple) and len(layout) == 2 and layout[0] == _TENSOR:
        return tensors[layout[1]]
    if isinstance(layout, dict):
        return _like(layout, {k: _rebuild(v, tensors) for k, v in layout.items()})
    if isinstance(layout, list):
        return [_rebuild(v, tensors) for v in layout]
    if isinstance(layout, tuple):
        return tuple(_rebuild(v, tensors) for v in layout)
    return layout


# --------------------------------------------------------------------------- writing
def _quiet(call):
    with warnings.catch_warnings():
        # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*use_collectives.*")
        return call()


def write_checkpoint(out_dir: Path, step: int, entries: dict, keep: int, rank: int = 0, world: int = 1) -> Path:
    """Write `entries` (flat keys: tensors and plain values) as `out_dir/ckpt-<step>/` ([Note: dcp checkpoints]).
    With `world` > 1 every rank of the default process group calls this with its own keys; rank `world - 1`
    (the driver) finishes the folder. Returns its path."""
    out_dir = Path(out_dir)
    name = checkpoint_name(step, "dir")
    final, tmp = out_dir / name, out_dir / f".{name}.tmp"
    driver = rank == world - 1
    if driver:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
    lib = _dcp()
    planner = lib.DefaultSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
    writer = lib.FileSystemWriter(tmp)
    if world > 1:
        dist.barrier()
    try:
        if world > 1:
            # each rank its own data file and metadata; the ranks meet at barriers only (tensors, never objects)
            _quiet(lambda: lib.dcp.save(entries, storage_writer=writer, planner=planner, use_collectives=False))
        else:
            _quiet(lambda: lib.dcp.save(entries, storage_writer=writer, planner=planner, no_dist=True))
    except BaseException as wrapped:  # DCP wraps what failed (a full disk) in a CheckpointException
        if driver:
            shutil.rmtree(tmp, ignore_errors=True)
        e = _original(wrapped)
        if e is wrapped:
            raise
        raise e from None
    if driver:
        if world > 1:
            _merge_metadata(tmp, world)
        for p in tmp.iterdir():
            _fsync(p)
        _fsync(tmp, directory=True)
        old = out_dir / f".{name}.old"
        if final.exists():  # the same step written again (a resumed run that stopped at once): replace it
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(out_dir, directory=True)
        if old.exists():
            shutil.rmtree(old)
        write_text_atomic(out_dir / "LATEST", name + "\n")
        prune_checkpoints(out_dir, keep, "dir")
    if world > 1:
        dist.barrier()
    return final


def _merge_metadata(folder: Path, world: int) -> None:
    """The ranks' `__<rank>.metadata` as one `.metadata`: the keys of every rank (a key that several ranks wrote,
    a tied tensor's replicas, from the lowest)."""
    merged = None
    for r in range(world):
        path = folder / f"__{r}{METADATA}"
        part = read_metadata(path)
        if merged is None:
            merged = part
            merged.storage_data = dict(part.storage_data or {})
            merged.planner_data = dict(part.planner_data or {})
        else:
            new = {k: v for k, v in part.state_dict_metadata.items() if k not in merged.state_dict_metadata}
            merged.state_dict_metadata.update(new)
            merged.storage_data.update({i: s for i, s in (part.storage_data or {}).items() if i.fqn in new})
            merged.planner_data.update({k: v for k, v in (part.planner_data or {}).items() if k in new})
        path.unlink()
    with open(folder / METADATA, "wb") as f:
        pickle.dump(merged, f)


# --------------------------------------------------------------------------- reading
def _original(e: BaseException) -> BaseException:
    """The exception a rank raised inside DCP, which wraps it in a CheckpointException."""
    if isinstance(e, _dcp().CheckpointException):
        for failure in e.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException):
                return _original(inner)
    return e


class Checkpoint:
    """A `ckpt-<step>/` folder opened for reading: its metadata, and its parts loaded on request."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.metadata = read_metadata(self.path / METADATA)
        self.cache: dict = {}
        meta = self.load(["meta/format", "meta/step", "meta/world", "meta/placement"], missing_ok=True)
        if not isinstance(meta.get("meta/format"), int):
            raise DamagedFileError(f"{self.path}: not a dnicompile checkpoint (no meta/format)")
        if meta["meta/format"] > FORMAT:
            raise DamagedFileError(
                f"{self.path}: checkpoint format {meta['meta/format']} is newer than this dnicompile reads ({FORMAT})"
            )
        self.step, self.world, placement = meta.get("meta/step"), meta.get("meta/world"), meta.get("meta/placement")
        if not isinstance(self.step, int) or self.step < 0 or not isinstance(self.world, int):
            raise DamagedFileError(f"{self.path}: its step {self.step!r} is not a step")
        try:
            self.placement = [(int(a), int(b)) for a, b in placement]
        except (TypeError, ValueError):
            raise DamagedFileError(f"{self.path}: its placement {placement!r} is not one") from None

    def keys(self) -> set[str]:
        return set(self.metadata.state_dict_metadata)

    def load(self, keys, missing_ok: bool = False) -> dict:
        """The entries `keys` (flat), tensors on the CPU. A key the checkpoint lacks is a DamagedFileError unless
        `missing_ok` (then it is left out)."""
        lib = _dcp()
        known = self.metadata.state_dict_metadata
        want = [k for k in dict.fromkeys(keys) if k not in self.cache]
        lost = [k for k in want if k not in known]
        if lost and not missing_ok:
            raise DamagedFileError(f"{self.path}: holds no `{lost[0]}`")
        target = {}
        for k in want:
            md = known.get(k)
            if isinstance(md, lib.md.TensorStorageMetadata):
                target[k] = torch.empty(md.size, dtype=md.properties.dtype)
            elif isinstance(md, lib.md.BytesStorageMetadata):
                target[k] = None
        if target:
            try:
                _quiet(
                    lambda: lib.dcp.load(
                        target, storage_reader=lib.SafeReader(self.path), planner=lib.SafeLoadPlanner(), no_dist=True
                    )
                )
            except BaseException as wrapped:
                e = _original(wrapped)
                if isinstance(e, (DNIError, KeyboardInterrupt)):
                    raise e from None
                if isinstance(e, pickle.UnpicklingError) and re.search(r"GLOBAL ([\w.]+)", str(e)):
                    what = re.search(r"GLOBAL ([\w.]+)", str(e)).group(1)
                    raise UnsafeFileError(
                        f"{self.path}: refused: a data file asks to load {what}, which is code, not tensors; a "
                        "checkpoint that dnicompile writes holds only tensors and plain values, so this one was made "
                        "or changed by something else. Nothing from it was run."
                    ) from None
                if isinstance(e, OSError) and e.errno is not None and not isinstance(e, FileNotFoundError):
                    raise e from None
                raise DamagedFileError(
                    f"{self.path}: not a readable checkpoint ({_first_line(str(e)) or type(e).__name__})"
                ) from None
            self.cache.update(target)
        return {k: self.cache[k] for k in keys if k in self.cache}

    def load_all(self) -> None:
        """Read every entry (checks that the whole checkpoint reads; later loads come from memory)."""
        self.load(sorted(self.keys()))

    def parts(self, names, missing_ok: bool = False) -> dict:
        """Nested parts by name (see flatten), each rebuilt from its layout and tensors."""
        layouts = self.load(names, missing_ok=missing_ok)
        tensors = self.load([k for v in layouts.values() for k in _tensor_keys(v)])
        return {n: _rebuild(v, tensors) for n, v in layouts.items()}

    def part_names(self, prefix: str) -> list[str]:
        """The names after `prefix` of the nested parts stored under it ("interface/" gives the cut names): the
        plain entries there, since only layouts are plain (tensors have keys of their own)."""
        return sorted(
            k[len(prefix) :]
            for k, v in self.metadata.state_dict_metadata.items()
            if k.startswith(prefix) and isinstance(v, _dcp().md.BytesStorageMetadata)
        )


def model_keys(checkpoint: Checkpoint) -> list[str]:
    """The checkpoint's model tensors, `model.<fqn>`."""
    return sorted(k for k in checkpoint.keys() if k.startswith("model."))


# --------------------------------------------------------------------------- what a run keeps
def _rng_state() -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(rng, device: torch.device) -> None:
    if isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor):
        torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and isinstance(rng, dict) and rng.get("cuda"):
        torch.cuda.set_rng_state_all(rng["cuda"])


def _meta(entries: dict, step: int, placement) -> None:
    entries["meta/format"] = FORMAT
    entries["meta/step"] = int(step)
    entries["meta/world"] = len(placement)
    entries["meta/placement"] = [[int(a), int(b)] for a, b in placement]


@dataclass
class Share:
    """One rank's share of a run whose ranks each build the whole program and train a part of it, with a runtime
    whose state has the one-process layout (a hierarchical program on two workers, train/hierarchical.py): the
    rank, the run's placement ([first, last] stage of each rank), the rank's runtime and the names of the model
    tensors it trains. So their checkpoint resumes in one process too, and a one-process checkpoint on them."""

    rank: int
    placement: list[tuple[int, int]]
    runtime: object
    model_keys: list[str]


def program_entries(program, task_state: dict | None, step: int, share: Share | None = None) -> dict:
    """A run in one process: the whole model, runtime, task and random state as checkpoint entries. With `share`,
    one rank's: its model tensors and stages, what its runtime state holds beyond them, its random state, and
    the task and meta keys where `task_state` is given (one rank gives it)."""
    state = program.model.state_dict()
    entries = {f"model.{k}": state[k].detach().cpu() for k in (share.model_keys if share else state)}
    runtime = dict((share.runtime if share else program.runtime).state_dict())
    placement = share.placement if share else [(0, program.num_stages - 1)]
    rank = share.rank if share else 0
    first, last = placement[rank]
    stages = runtime.pop("stages")
    for i, stage in stages.items() if isinstance(stages, dict) else enumerate(stages):
        if first <= i <= last:
            flatten(f"stage/{i}", stage, entries)
    for name, iface in runtime.pop("interfaces", {}).items():
        flatten(f"interface/{name}", iface, entries)
    if runtime:
        flatten("runtime", runtime, entries)
    flatten(f"rng/{rank}", _rng_state(), entries)
    if task_state is not None:
        flatten("task", task_state, entries)
        _meta(entries, step, placement)
    return entries


def worker_entries(worker, task_state: dict | None, step: int) -> dict:
    """One rank of several: the keys of its stages (model tensors, stage and outgoing interface states, its
    replicas of shared tied tensors, its random state); the driver adds the task, runtime step and meta."""
    entries = {f"model.{k}": v for k, v in worker.owned_state().items()}
    state = worker.runtime_state()
    for s, stage in state["stages"].items():
        flatten(f"stage/{s}", stage, entries)
    for name, iface in state["interfaces"].items():
        flatten(f"interface/{name}", iface, entries)
    if state.get("tied"):
        flatten(f"tied/{worker.rank}", state["tied"], entries)
    flatten(f"rng/{worker.rank}", _rng_state(), entries)
    if worker.is_driver:
        from .runtime.state import FORMAT as RUNTIME_FORMAT

        flatten("runtime", {"format": RUNTIME_FORMAT, "step": int(step)}, entries)
        flatten("task", task_state or {}, entries)
        _meta(entries, step, worker.placement)
    return entries


def _regroup_refused(ckpt: Checkpoint, program, world: int, shares_tied: bool) -> None:
    """[Note: resuming on other workers]: what cannot move to another placement is refused with the way out."""
    why = None
    if shares_tied or ckpt.part_names("tied/"):
        why = "tied tensors shared between ranks"
    cuts = getattr(program, "cuts", [])
    delayed = [c.name for c in cuts if program.runtime.interfaces[c.index].kind == "delayed"]
    if delayed:
        why = f"delayed cut `{delayed[0]}` (its pending batches wait for the next rank's gradients)"
    if why is None:
        return
    written = f"{ckpt.world} workers" if ckpt.world > 1 else "one process"
    here = f"{world} workers" if world > 1 else "one process"
    how = f"--workers {ckpt.world}" if ckpt.world > 1 else "in one process (without --workers)"
    raise DNIError(
        f"--resume: {ckpt.path.name} was written by {written} (this run is on {here}, or another placement); a "
        f"program with {why} resumes only on the workers and placement that wrote it: {how}."
    )


def _last_rank(ckpt: Checkpoint) -> int:
    """The rank that held the last stage when the checkpoint was written (its task and random state go on)."""
    return max(range(len(ckpt.placement)), key=lambda r: ckpt.placement[r][1])


def _unfit(ckpt: Checkpoint, e: BaseException) -> DNIError:
    text = str(e).strip()
    return DNIError(
        f"--resume {ckpt.path}: the checkpoint does not fit this model and spec ({type(e).__name__}: "
        f"{text.splitlines()[0] if text else ''}); resume with the model file and spec the run was made with."
    )


def _load_model(ckpt: Checkpoint, model, keys: list[str]) -> None:
    """Load the model tensors `keys` (state_dict names) from the checkpoint into `model`."""
    known = {k[len("model.") :] for k in model_keys(ckpt)}
    lost = [k for k in keys if k not in known]
    if lost:
        raise DNIError(
            f"--resume {ckpt.path}: the checkpoint holds no `{lost[0]}` of this model ({len(lost)} tensors "
            "missing); resume with the model file and spec the run was made with."
        )
    values = ckpt.load([f"model.{k}" for k in keys])
    model.load_state_dict({k: values[f"model.{k}"] for k in keys}, strict=False)


def restore_program(program, task, ckpt: Checkpoint, device: torch.device, share: Share | None = None) -> int:
    """Load a checkpoint, written by any number of workers, into a freshly built program, runtime and task in
    one process (or into `share.runtime`, one rank's); returns its step."""
    n = program.num_stages
    here = share.placement if share else [(0, n - 1)]
    if ckpt.placement != here:
        _regroup_refused(ckpt, program, len(here), False)
    own = list(program.model.state_dict())
    extra = sorted({k[len("model.") :] for k in model_keys(ckpt)} - set(own))
    if extra:
        raise DNIError(
            f"--resume {ckpt.path}: the checkpoint holds `{extra[0]}`, which this model does not have; resume with "
            "the model file and spec the run was made with."
        )
    stages = [f"stage/{i}" for i in range(n)]
    names = ckpt.part_names("interface/")
    parts = ckpt.parts([*stages, "runtime", "task", *(f"interface/{c}" for c in names)], missing_ok=True)
    lost = [s.replace("/", "") for s in stages if s not in parts]
    if lost:
        raise DNIError(f"--resume: {ckpt.path.name} holds no state for {', '.join(lost)}; was it written by this spec?")
    try:
        _load_model(ckpt, program.model, own)
        program.to(device)
        state = {
            **parts.get("runtime", {}),
            "stages": [parts[s] for s in stages],
            "interfaces": {c: parts[f"interface/{c}"] for c in names},
        }
        (share.runtime if share else program.runtime).load_state_dict(state)  # each part moves its tensors
        task.load_state_dict(parts.get("task") or {})
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise _unfit(ckpt, e) from None
    rank = (share.rank if share else 0) if ckpt.placement == here else _last_rank(ckpt)
    _set_rng_state(ckpt.parts([f"rng/{rank}"], missing_ok=True).get(f"rng/{rank}"), device)
    return ckpt.step


def restore_worker(worker, task, ckpt: Checkpoint, device: torch.device) -> int:
    """Load this rank's part of a checkpoint, written by any number of workers (or one process), into its stages,
    runtime and task: the keys of its stages ([Note: resuming on other workers]). Returns the step."""
    from .runtime.state import FORMAT as RUNTIME_FORMAT

    here = [tuple(p) for p in worker.placement]
    same = ckpt.placement == here
    if not same:
        _regroup_refused(ckpt, worker.program, worker.world, bool(worker.tied.replicas))
    mine = range(worker.first, worker.last + 1)
    stages = [f"stage/{s}" for s in mine]
    cuts = [worker.rt.interfaces[c].name for c in mine if c < len(worker.program.cuts)]
    names = [c for c in cuts if c in set(ckpt.part_names("interface/"))]
    rank = worker.rank if same else _last_rank(ckpt)
    tied = [f"tied/{worker.rank}"] if same else []
    parts = ckpt.parts([*stages, "task", f"rng/{rank}", *tied, *(f"interface/{c}" for c in names)], missing_ok=True)
    lost = [s.replace("/", "") for s in stages if s not in parts]
    if lost:
        raise DNIError(f"--resume: {ckpt.path.name} holds no state for {', '.join(lost)}; was it written by this spec?")
    keys = [k for s in mine for k in worker.program.stages[s].graph_module.state_dict()]
    try:
        _load_model(ckpt, worker.program.model, list(dict.fromkeys(keys)))
        worker.load_runtime_state(
            {
                "format": RUNTIME_FORMAT,
                "stages": {s: parts[f"stage/{s}"] for s in mine},
                "interfaces": {c: parts[f"interface/{c}"] for c in names},
                "tied": parts.get(f"tied/{worker.rank}", []),
            }
        )
        if "task" in parts and task is not None:
            task.load_state_dict(parts["task"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise _unfit(ckpt, e) from None
    _set_rng_state(parts.get(f"rng/{rank}"), device)
    return ckpt.step


# --------------------------------------------------------------------------- choosing one for --resume
def _old_format(path: Path) -> str | None:
    """What an old-format checkpoint is (dnicompile 0.1.0 before DCP), or None."""
    if path.is_file():
        return "a ckpt-<step>.pt file (one process)"
    if not (path / METADATA).exists() and any(path.glob("rank*.pt")):
        return "rank<k>.pt shards (several workers)"
    return None


def find_checkpoint(folder: Path, say=None) -> Checkpoint:
    """For --resume: the newest checkpoint in `folder` that reads whole (every entry is read once, so a damaged
    data file is found here), newest first; `say(text)` hears which one and which newer ones were skipped as
    damaged ([Note: checkpoint files]). A file that asks to run code is refused (UnsafeFileError), not skipped; a
    checkpoint in dnicompile 0.1.0's format is refused with what wrote it; none that reads is a DNIError."""
    from .files import checkpoints, newest_readable

    folder = Path(folder)
    if not folder.is_dir():
        raise DNIError(f"--resume {folder}: no such directory; pass the --out of an earlier run.")
    found = sorted(checkpoints(folder, "dir") + checkpoints(folder, "file"), key=lambda sp: sp[0], reverse=True)
    if not found:
        raise DNIError(
            f"--resume {folder}: no checkpoint there (no ckpt-<step>/ folder); pass the --out of a run made with "
            "train.checkpoint_every set (the default)."
        )

    def read(step: int, path: Path) -> Checkpoint:
        old = _old_format(path)
        if old is not None:
            raise DNIError(
                f"--resume {folder}: {path.name} is {old}, the checkpoint format of dnicompile 0.1.0 up to commit "
                "c5cf96b; this dnicompile reads the ckpt-<step>/ folders of torch.distributed.checkpoint. Finish "
                "that run with the dnicompile that wrote it, or start it again."
            )
        ckpt = Checkpoint(path)
        if ckpt.step != step:
            raise DamagedFileError(f"{path}: holds step {ckpt.step}, not {step}")
        ckpt.load_all()
        return ckpt

    return newest_readable(folder, found, read, say)[2]
