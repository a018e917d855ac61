"""Faults (issue 19): checkpoints that nothing loses and nothing runs code from, workers that listen on loopback
only, and a dead worker named the same way every time.

Single-process runs use SGD stages and one thread, so that an interrupted and resumed run and one that never
stopped do exactly the same float sums (compared with rtol=0, atol=0).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dnicompile.checkpoint import Checkpoint, flatten, write_checkpoint
from dnicompile.cli import main
from dnicompile.errors import DNIError
from dnicompile.files import (
    UnsafeFileError,
    checkpoints,
    load_tensors,
    prune_checkpoints,
    remove_stale_tmp,
    write_atomic,
)
from dnicompile.runtime.distributed import find_checkpoint
from dnicompile.train.launch import WorkerExit, report_failure, write_report, write_started

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DNICOMPILE_FASHION_MNIST", ROOT.parent / "shared" / "data" / "fashion-mnist"))
needs_data = pytest.mark.skipif(
    not (DATA / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not found at {DATA}; set DNICOMPILE_FASHION_MNIST to its folder",
)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _spec(tmp_path: Path, train: str = "", extra: str = "") -> Path:
    """specs/mlp_cdni.yaml at batch 64 with SGD stages (synthesizers keep Adam: its state must resume too)."""
    text = (ROOT / "specs/mlp_cdni.yaml").read_text()
    text = text.replace("shape: [128, 784]", "shape: [64, 784]")
    text = text.replace(
        "default: {optimizer: {name: Adam, lr: 1.0e-3}}", "default: {optimizer: {name: SGD, lr: 0.05, momentum: 0.9}}"
    )
    text = text.replace("train: {steps: 1000, batch_size: 128, eval_every: 250}", f"train: {{batch_size: 64{train}}}")
    assert "SGD" in text and "batch_size: 64" in text
    path = tmp_path / "spec.yaml"
    path.write_text(text + extra)
    return path


def _cli(*argv: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dnicompile", "examples/mlp.py", *argv, "--train", "--data", str(DATA)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _rows(path: Path) -> list[dict]:
    timing = ("elapsed_s", "samples_per_s", "train_s", "cpu_ms_per_step")
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- files
def test_atomic_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((str(a), synced.copy())), real_replace(a, b)))
    write_atomic(tmp_path / "x.pt", lambda p: torch.save({"a": torch.ones(3)}, p))
    ((tmp, before),) = renamed
    assert before == [tmp]  # the temporary file reached the disk before it took the name
    assert synced[-1] == str(tmp_path)  # then the folder's new entry
    assert load_tensors(tmp_path / "x.pt")["a"].sum() == 3
    with pytest.raises(ZeroDivisionError):
        write_atomic(tmp_path / "y.pt", lambda p: 1 / 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


def _entries(step: int, **parts) -> dict:
    """The entries of a small checkpoint as one process writes it ([Note: dcp checkpoints])."""
    entries = {"model.w": torch.full((2,), float(step))}
    for name, value in {"stage/0": {"clock": {"n": step}}, "task": {}, **parts}.items():
        flatten(name, value, entries)
    entries.update({"meta/format": 3, "meta/step": step, "meta/world": 1, "meta/placement": [[0, 0]]})
    return entries


def test_stale_temporary_files_and_old_checkpoints_are_removed(tmp_path):
    for name in (".model.pt.abcd1234.tmp", ".ckpt-00000005.pt.Zx_9aaaa.tmp", "notes.tmp", ".hidden", "keep.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "ckpt-00000003").mkdir()
    (tmp_path / "ckpt-00000003" / ".rank0.pt.q1w2e3r4.tmp").write_text("x")
    (tmp_path / ".ckpt-00000007.tmp").mkdir()  # a checkpoint folder a crash left unfinished
    (tmp_path / ".ckpt-00000007.tmp" / "__0_0.distcp").write_text("x")
    (tmp_path / ".ckpt-00000009.tmp.d").mkdir()  # not a name dnicompile writes: left alone
    removed = sorted(p.name for p in remove_stale_tmp(tmp_path))
    assert removed == [
        ".ckpt-00000005.pt.Zx_9aaaa.tmp",
        ".ckpt-00000007.tmp",
        ".model.pt.abcd1234.tmp",
        ".rank0.pt.q1w2e3r4.tmp",
    ]
    left = [".ckpt-00000009.tmp.d", ".hidden", "ckpt-00000003", "keep.txt", "notes.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == left
    (tmp_path / "ckpt-00000003").rmdir()
    for step in (5, 10, 15, 100):
        write_checkpoint(tmp_path, step, _entries(step), keep=10)
    assert sorted(p.name for p in (tmp_path / "ckpt-00000015").iterdir()) == [".metadata", "__0_0.distcp"]
    prune_checkpoints(tmp_path, 2, "dir")
    assert [s for s, _ in checkpoints(tmp_path, "dir")] == [100, 15]
    assert (tmp_path / "LATEST").read_text() == "ckpt-00000100\n"
    # the same step again (a resumed run that stops at once) replaces the folder whole
    write_checkpoint(tmp_path, 15, _entries(15, task={"again": True}), keep=2)
    assert Checkpoint(tmp_path / "ckpt-00000015").parts(["task"]) == {"task": {"again": True}}
    assert sorted(p.name for p in tmp_path.glob(".ckpt-*")) == [".ckpt-00000009.tmp.d"]  # no .tmp or .old left


@pytest.mark.parametrize(
    "model, spec",
    [
        ("examples/mlp.py", "specs/mlp_cdni.yaml"),
        ("examples/copy_rnn.py", "specs/copy_dni.yaml"),
        ("examples/charlm.py", "specs/charlm_dni.yaml"),
        ("examples/hierarchical.py", "specs/hierarchical.yaml"),
    ],
)
def test_every_runtime_state_loads_weights_only(tmp_path, model, spec):
    """Runtime states hold tensors and plain values only: optimizers (with their step counts), schedulers,
    clocks (a `random.Random` state is a tuple of ints), synthesizers, so weights_only=True reads them back."""
    from dnicompile.compile.model_file import build_model
    from dnicompile.program import compile_decoupled
    from dnicompile.recurrent import compile_recurrent
    from dnicompile.spec import load_spec

    text = (ROOT / spec).read_text()
    if "mlp" in spec:  # a random clock and a scheduler too
        text = text.replace(
            "default: {optimizer: {name: Adam, lr: 1.0e-3}}",
            "default: {optimizer: {name: Adam, lr: 1.0e-3, scheduler: {name: StepLR, step_size: 1}}}\n"
            "  2: {clock: {probability: 0.5, seed: 7}}",
        )
        assert "probability" in text
    (tmp_path / "spec.yaml").write_text(text)
    loaded = load_spec(tmp_path / "spec.yaml")
    net = build_model(str(ROOT / model), loaded.model, loaded.model_args)
    if "mlp" in spec:
        program = compile_decoupled(net, loaded)
        for _ in range(3):
            program.train_step(torch.randn(128, 784), torch.randint(0, 10, (128,)))
    else:
        program = compile_recurrent(net, loaded)
    # through a checkpoint ([Note: dcp checkpoints]): plain values are read back with weights_only=True
    from dnicompile.checkpoint import program_entries, restore_program

    state = program.runtime.state_dict()
    write_checkpoint(tmp_path, 3, program_entries(program, {}, 3), keep=2)
    ckpt = Checkpoint(tmp_path / "ckpt-00000003")
    names = ckpt.part_names("interface/")
    parts = ckpt.parts(
        ["runtime", *(f"stage/{i}" for i in range(program.num_stages))] + [f"interface/{n}" for n in names]
    )
    back = {**parts["runtime"], "stages": [parts[f"stage/{i}"] for i in range(program.num_stages)]}
    back["interfaces"] = {n: parts[f"interface/{n}"] for n in names}
    assert back.keys() == state.keys()
    for key in state:
        assert repr(back[key]) == repr(state[key]), key
    assert restore_program(program, SimpleNamespace(load_state_dict=lambda s: None), ckpt, torch.device("cpu")) == 3
    if "mlp" in spec:
        assert state["stages"][0]["scheduler"] is not None and state["stages"][0]["optimizer"]["state"]


def test_load_state_dict_of_state_dict_round_trips_a_program(tmp_path):
    """A program's state_dict (with its interfaces) loads into a program built from another seed, and the runtime's
    state through a checkpoint: the two programs then take the same next step, to the bit."""
    from dnicompile.checkpoint import program_entries, restore_program
    from dnicompile.compile.model_file import build_model
    from dnicompile.program import compile_decoupled
    from dnicompile.spec import load_spec

    spec = load_spec(ROOT / "specs/mlp_cdni.yaml")
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)) for _ in range(4)]

    def program(seed: int):
        torch.manual_seed(seed)
        return compile_decoupled(build_model(str(ROOT / "examples/mlp.py"), spec.model, spec.model_args), spec)

    first = program(0)
    for x, y in batches[:3]:
        first.train_step(x, y)
    state = first.state_dict(interfaces=True)
    assert any(k.startswith("interfaces.") for k in state)
    second = program(1)
    assert not torch.equal(second.state_dict()["layers.0.0.weight"], state["layers.0.0.weight"])
    second.load_state_dict(state)
    for key, value in second.state_dict(interfaces=True).items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    write_checkpoint(tmp_path, 3, program_entries(first, {}, 3), keep=2)
    third = program(2)
    restore_program(
        third,
        SimpleNamespace(load_state_dict=lambda s: None),
        Checkpoint(tmp_path / "ckpt-00000003"),
        torch.device("cpu"),
    )
    first.train_step(*batches[3])
    third.train_step(*batches[3])
    for key, value in third.state_dict(interfaces=True).items():
        torch.testing.assert_close(value, first.state_dict(interfaces=True)[key], rtol=0, atol=0, msg=key)


def _evil(marker: Path):
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return Evil()


@needs_data
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path, capsys):
    """[Note: dcp checkpoints]: a `.metadata` that asks for a callable, and a data file whose plain value is a
    pickled callable, are refused (exit 2, naming the file and what it asked for) and nothing of them runs; a
    checkpoint of dnicompile 0.1.0's format is refused without being opened."""
    import pickle

    run, marker = tmp_path / "run", tmp_path / "pwned"
    spec = _spec(tmp_path)
    argv = [str(ROOT / "examples/mlp.py"), "--spec", str(spec), "--train", "--data", str(DATA), "--steps", "8"]
    # a data file: DCP's own planner would torch.load it with weights_only=False
    write_checkpoint(run, 5, _entries(5, task=_evil(marker)), keep=5)
    assert main([*argv, "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "ckpt-00000005: refused" in err and "io.open" in err and "Nothing from it was run" in err, err
    assert "Traceback" not in err
    assert not marker.exists()
    # the metadata: DCP reads it with pickle.load
    folder = run / "ckpt-00000007"
    write_checkpoint(run, 7, _entries(7), keep=5)
    (folder / ".metadata").write_bytes(pickle.dumps(_evil(marker)))
    with pytest.raises(UnsafeFileError, match="refused"):
        find_checkpoint(run, 1)
    assert main([*argv, "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "ckpt-00000007/.metadata: refused" in err and "io.open" in err and "Traceback" not in err, err
    assert main([*argv, "--workers", "2", "--resume", str(run)]) == 2  # refused before any worker starts
    assert ".metadata: refused" in capsys.readouterr().err
    assert not marker.exists()
    # an old checkpoint file: refused with what wrote it, never loaded
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"format": 1, "step": 5, "model": _evil(marker), "runtime": {}, "task": {}}, old / "ckpt-00000005.pt")
    assert main([*argv, "--resume", str(old)]) == 2
    err = capsys.readouterr().err
    assert "ckpt-00000005.pt is a ckpt-<step>.pt file" in err and "dnicompile 0.1.0" in err, err
    (old / "ckpt-00000007").mkdir()  # and the shards of an old run on several workers
    torch.save({"step": 7, "world": 1, "placement": (0, 4), "model": _evil(marker)}, old / "ckpt-00000007/rank0.pt")
    with pytest.raises(DNIError, match=r"ckpt-00000007 is rank<k>.pt shards \(several workers\), .* dnicompile 0.1.0"):
        find_checkpoint(old, 2)
    assert not marker.exists()


def test_resume_falls_back_past_a_damaged_or_incomplete_checkpoint(tmp_path):
    for step in (5, 10, 15):
        write_checkpoint(tmp_path, step, _entries(step), keep=5)
    data = tmp_path / "ckpt-00000015" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # torn
    (tmp_path / "ckpt-00000010" / ".metadata").unlink()  # never finished
    said = []
    assert find_checkpoint(tmp_path, 2, say=said.append).name == "ckpt-00000005"
    assert said[0].startswith("skipping ") and "ckpt-00000015: not a readable checkpoint" in said[0], said
    assert "ckpt-00000010: not a readable checkpoint (no .metadata)" in said[1], said
    assert said[2] == "resuming from ckpt-00000005 (step 5) instead"


def test_distributed_checkpoints_keep_the_newest_k(tmp_path):
    """save_checkpoint on a one-rank gloo group: LATEST names the newest, and only `keep` folders stay."""
    import torch.distributed as dist

    from dnicompile.runtime.distributed import save_checkpoint

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        worker = SimpleNamespace(
            world=1,
            rank=0,
            first=0,
            last=0,
            placement=[(0, 0)],
            is_driver=True,
            owned_state=lambda: {"w": torch.ones(2)},
            runtime_state=lambda: {"format": 2, "stages": {0: {"clock": {}}}, "interfaces": {}, "tied": []},
        )
        out = tmp_path / "run"
        out.mkdir()
        for step in (5, 10, 15):
            save_checkpoint(worker, out, step, keep=2)
    finally:
        dist.destroy_process_group()
    assert (out / "LATEST").read_text() == "ckpt-00000015\n"
    assert sorted(p.name for p in out.iterdir()) == ["LATEST", "ckpt-00000010", "ckpt-00000015"]
    assert find_checkpoint(out, 1).name == "ckpt-00000015"


# ----------------------------------------------------------------------------- one process: nothing lost
@needs_data
def test_sigterm_checkpoints_and_the_resumed_run_ends_like_one_that_never_stopped(tmp_path, capsys):
    spec = _spec(tmp_path, ", eval_every: 1000000, checkpoint_every: 10")
    flags = ["--spec", str(spec), "--threads", "1", "--seed", "4"]
    cmd = [sys.executable, "-m", "dnicompile", "examples/mlp.py", *flags, "--train", "--data", str(DATA)]
    cmd += ["--steps", "1000000", "--out", str(tmp_path / "a")]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **ONE_THREAD)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not checkpoints(tmp_path / "a", "dir"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    stopped = max(s for s, _ in checkpoints(tmp_path / "a", "dir"))
    assert f"stopped by SIGTERM at step {stopped}; wrote ckpt-{stopped:08d}" in out, out
    assert "Traceback" not in err and not list((tmp_path / "a").glob(".*.tmp"))
    assert len(checkpoints(tmp_path / "a", "dir")) <= 2  # keep_checkpoints: 2
    assert (tmp_path / "a/LATEST").read_text() == f"ckpt-{stopped:08d}\n"
    steps = str(stopped + 13)
    # the rest here, on one thread too (--threads 1), sparing two interpreter starts
    argv = [str(ROOT / "examples/mlp.py"), *flags, "--train", "--data", str(DATA), "--steps", steps]
    capsys.readouterr()
    assert main([*argv, "--resume", str(tmp_path / "a")]) == 0
    assert f"resuming from ckpt-{stopped:08d} (step {stopped})" in capsys.readouterr().out
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    _assert_same_weights(_weights(tmp_path / "a/model.pt"), _weights(tmp_path / "b/model.pt"))
    # the metrics were cut back to the checkpoint: the resumed run's lines are the straight run's
    a, b = _rows(tmp_path / "a/metrics.jsonl"), _rows(tmp_path / "b/metrics.jsonl")
    on_grid = [r for r in a if r["step"] % 10 == 0 or r["step"] == int(steps)]  # the stop's own line is extra
    assert on_grid == b
    trained = [r["step"] for r in a if "cosine" in r]
    assert trained == sorted(set(trained)) and trained[-1] == int(steps)


@needs_data
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    spec = _spec(tmp_path, ", eval_every: 6, checkpoint_every: 5")
    argv = [str(ROOT / "examples/mlp.py"), "--spec", str(spec), "--train", "--data", str(DATA), "--threads", "1"]
    run = tmp_path / "run"
    assert main([*argv, "--steps", "12", "--out", str(run)]) == 0
    assert [s for s, _ in checkpoints(run, "dir")] == [12, 10]  # every 5 steps and at the end; the newest 2
    newest = run / "ckpt-00000012" / "__0_0.distcp"
    newest.write_bytes(newest.read_bytes()[:1000])
    (run / ".ckpt-00000013.tmp").mkdir()  # a checkpoint the crash cut short
    (run / ".ckpt-00000013.tmp" / "__0_0.distcp").write_bytes(b"half")
    capsys.readouterr()
    assert main([*argv, "--steps", "15", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "skipping " in out and "ckpt-00000012: not a readable checkpoint" in out, out
    assert "resuming from ckpt-00000010 (step 10) instead" in out
    assert not list(run.glob(".*.tmp"))
    assert main([*argv, "--steps", "15", "--out", str(tmp_path / "straight")]) == 0
    _assert_same_weights(_weights(run / "model.pt"), _weights(tmp_path / "straight/model.pt"))
    assert _rows(run / "metrics.jsonl") == _rows(tmp_path / "straight/metrics.jsonl")


# ----------------------------------------------------------------------------- several workers
def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _listening(pids: list[int]) -> list[tuple[int, str]]:
    """(pid, address) of every TCP socket in LISTEN state that one of `pids` holds."""
    owner = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    link = os.readlink(fd)
                except OSError:
                    continue
                if link.startswith("socket:["):
                    owner[link[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in owner:
                found.append((owner[parts[9]], _address(parts[1])))
    return found


def _address(hex_addr: str) -> str:
    ip, port = hex_addr.split(":")
    raw = bytes.fromhex(ip)
    words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]  # each 32-bit word in host (little) order
    packed = b"".join(words)
    if len(packed) == 4:
        return f"{'.'.join(str(b) for b in packed)}:{int(port, 16)}"
    import ipaddress

    return f"[{ipaddress.IPv6Address(packed)}]:{int(port, 16)}"


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in ("::1",) or host.startswith("::ffff:127.")


@needs_data
def test_a_two_worker_run_listens_on_loopback_only(tmp_path):
    spec = _spec(tmp_path, extra="distributed: {placement: time}\n")  # rank 0's timings reach rank 1 as a tensor
    metrics = tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "dnicompile", "examples/mlp.py", "--spec", str(spec), "--train", "--workers", "2"]
    cmd += ["--steps", "1000000", "--eval-every", "1000000", "--data", str(DATA), "--metrics", str(metrics)]
    # an inherited MASTER_ADDR is not for --workers runs: it must not widen what they listen on
    env = dict(os.environ, PYTHONUNBUFFERED="1", MASTER_ADDR="0.0.0.0", MASTER_PORT="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    seen: set[tuple[int, str]] = set()
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no training rows within 120 s"
            seen.update(_listening([proc.pid, *_children(proc.pid)]))
            time.sleep(0.1)
        for _ in range(5):
            workers = _children(proc.pid)
            seen.update(_listening([proc.pid, *workers]))
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    assert any(pid == proc.pid for pid, _ in seen), seen  # the rendezvous store
    assert any(pid in workers for pid, _ in seen), seen  # the workers' own (gloo) sockets
    assert [s for s in seen if not _loopback(s[1])] == [], seen


TINY_MODEL = """
import torch.nn as nn


def build_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
"""


@needs_data
def test_a_killed_worker_is_named_with_its_stages_and_signal_every_time(tmp_path, capsys, monkeypatch):
    """SIGKILL rank 0 ten times, at different moments (from right after it joined to well into training): each
    run ends within timeout_s of the kill with the same message, naming the rank, its stages and the signal.
    The launcher runs here (main()), to spare starting an interpreter ten times; the workers are processes."""
    import tempfile
    import threading

    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "inputs: {input: {shape: [32, 1, 28, 28]}}\n"
        "cuts:\n  - after: '2'\n    synthetic_gradient: {model: linear}\n  - after: '4'\n"
        "data: fashion-mnist\n"
        "distributed: {timeout_s: 8, placement: [[0, 1], [2]]}\n"
    )
    argv = [str(tmp_path / "tiny.py"), "--spec", str(spec), "--train", "--workers", "2", "--steps", "1000000"]
    argv += ["--batch-size", "32", "--data", str(DATA)]

    def kill_rank0(box: Path, delay: float, killed: list) -> None:
        deadline = time.monotonic() + 120
        while len(started := list(box.glob("dnicompile-errors-*/started*.json"))) < 2:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        time.sleep(delay)
        pid = next(json.loads(p.read_text())["pid"] for p in started if p.name == "started0.json")
        os.kill(pid, signal.SIGKILL)
        killed.append(time.monotonic())

    messages, waits = set(), []
    for i in range(10):
        box = tmp_path / f"tmp{i}"
        box.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(box))  # where the launcher's report folder goes
        killed: list[float] = []
        killer = threading.Thread(target=kill_rank0, args=(box, 0.1 * i, killed), daemon=True)
        killer.start()
        code = main(argv)
        ended = time.monotonic()
        killer.join(5)
        assert killed, "the workers did not start within 120 s"
        waits.append(ended - killed[0])
        err = capsys.readouterr().err
        assert code == 1, err
        messages.add(err.strip().splitlines()[-1])
        assert not list(box.glob("dnicompile-errors-*")), "the launcher left its report folder behind"
    assert messages == {
        "dnicompile: error: rank 0 (stage0, stage1) was killed by signal 9 (SIGKILL); the other workers were stopped."
    }
    assert max(waits) < 8, waits  # within timeout_s of the kill


def test_the_root_cause_is_the_dead_rank_not_its_peers(tmp_path, capsys):
    write_started(tmp_path, 0, "stage0")
    write_started(tmp_path, 1, "stage1, stage2")
    try:
        raise RuntimeError("Connection closed by peer")  # gloo's, outside a transport wait: not a PeerError
    except RuntimeError as e:
        write_report(tmp_path, 2, "stage3", e)
    exits = [WorkerExit(0, 0), WorkerExit(1, -9), WorkerExit(2, 1), WorkerExit(3, -15, sent=signal.SIGTERM)]
    assert report_failure(tmp_path, exits) == 1
    assert capsys.readouterr().err == (
        "dnicompile: error: rank 1 (stage1, stage2) was killed by signal 9 (SIGKILL); the other workers were stopped.\n"
    )
    exits[1] = WorkerExit(1, 3)
    report_failure(tmp_path, exits)
    assert "rank 1 (stage1, stage2) exited with code 3 without a report" in capsys.readouterr().err
    # a rank's own bad input comes first; without any death of its own, the first rank to fail
    try:
        raise DNIError("data: no such file")
    except DNIError as e:
        write_report(tmp_path, 3, "stage3", e)
    assert report_failure(tmp_path, exits) == 2
    assert "rank 3 (stage3) failed: data: no such file" in capsys.readouterr().err


def test_a_hung_peer_is_named_by_the_rank_that_waited_for_it(tmp_path, capsys):
    """Rank 1 is stopped (SIGSTOP, a deadlock): rank 0 times out waiting for it and reports a PeerError; rank 1
    reports nothing and the launcher has to stop it. The cause is rank 1, named with its stages, not rank 0."""
    from dnicompile.runtime.transport import PeerError

    write_started(tmp_path, 0, "stage0")
    write_started(tmp_path, 1, "stage1")
    write_started(tmp_path, 2, "stage2")
    try:
        raise PeerError(
            "rank 0 (stage0) timed out or failed waiting for the true gradient of batch 7 from rank 1 after 8s"
        )
    except PeerError as e:
        write_report(tmp_path, 0, "stage0", e)
    exits = [WorkerExit(0, 1), WorkerExit(1, -9, sent=signal.SIGKILL), WorkerExit(2, -15, sent=signal.SIGTERM)]
    assert report_failure(tmp_path, exits) == 1
    err = capsys.readouterr().err
    assert err.startswith("dnicompile: error: rank 1 (stage1) stopped answering: it was still running"), err
    assert "when rank 0 (stage0) gave up waiting for it (PeerError: rank 0 (stage0) timed out" in err
    # a rank that died is still the cause before a silent one
    exits[2] = WorkerExit(2, -9)
    report_failure(tmp_path, exits)
    assert "rank 2 (stage2) was killed by signal 9" in capsys.readouterr().err
