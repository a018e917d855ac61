"""The distributed runtime started from Python, without the command line: two processes join a gloo group (a
file store: nothing listens on the network), each builds the same program and takes its stages with
`distributed_runtime`, and ends with the parameters of the local runtime trained on the same batches: with exact
cuts (pipeline parallelism), with a local-loss cut between the ranks (nothing is sent back across it, so
the first rank never waits for the second), and with delayed cuts between the ranks (each `weights` setting,
delays 1 and 2, and two chained delayed cuts on three ranks, whose delays add)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dnicompile import compile_decoupled

ROOT = Path(__file__).resolve().parents[1]
SPEC = """
model: build_model
inputs:
  x: {shape: [16, 784], dtype: float32}
cuts:
  - after: layers.0
  - after: layers.1
    __KIND1__
  - after: layers.2
    __KIND__
stages:
  default: {optimizer: {name: __OPT__}__STAGE__}
loss: cross_entropy
__DISTRIBUTED__
"""
SGD = "SGD, lr: 0.05, momentum: 0.9"
ADAM = "Adam, lr: 1.0e-3"
STEPS, BATCH = 7, 16


TWO = [[0, 1, 2], [3]]
THREE = [[0, 1], [2], [3]]
LINK = "link: {latency_ms: 30, bandwidth_mb_s: 50}"
KINDS = {  # name -> (the last cut's kind, the middle cut's kind, placement, `distributed` keys, optimizer)
    "exact": ("", "", TWO, "", SGD),
    "local": ("local_loss: {head: mlp, hidden: 32, optimizer: {name: SGD, lr: 0.1}}", "", TWO, "", SGD),
    "delayed1-stash": ("delayed_gradient: {delay: 1}", "", TWO, "", SGD),
    "delayed2-current": ("delayed_gradient: {delay: 2, weights: current, shrink: 0.5}", "", TWO, "", SGD),
    "delayed1-recompute": ("delayed_gradient: {delay: 1, weights: recompute}", "", TWO, "", SGD),
    "delayed2-warmup3": ("delayed_gradient: {delay: 2, warmup: 3}", "", TWO, "", SGD),
    "delayed1-predict": ("delayed_gradient: {delay: 1, predict: linear}", "", TWO, "", ADAM),  # [Note: weight prediction]
    "delayed-chain": ("delayed_gradient: {delay: 1}", "delayed_gradient: {delay: 1}", THREE, "", SGD),
    # [Note: microbatch schedules]: the parameters of the whole batch's steps, to rounding
    "1f1b-m4-adam": ("", "", TWO, "microbatches: 4, schedule: 1f1b", ADAM),
    "gpipe-m4-adam": ("", "", TWO, "microbatches: 4, schedule: gpipe", ADAM),
    "1f1b-m3-3ranks": ("", "", THREE, "microbatches: 3", SGD),  # 16 = 6 + 5 + 5: unequal microbatches
    # [Note: link emulation]: a slower link changes when messages arrive, not what a step computes
    "exact-slow-link": ("", "", TWO, LINK, SGD),
    "delayed1-slow-link": ("delayed_gradient: {delay: 1}", "", TWO, LINK, SGD),
    # stage options across ranks ([Note: accumulation], [Note: stage precision]); after "|": the stages' own keys
    "exact-accumulate3": ("", "", TWO, "", SGD + "|accumulate: 3"),
    "delayed1-fp16": ("delayed_gradient: {delay: 1}", "", TWO, "", SGD + "|precision: fp16"),
}


def _program(kind: str = "exact"):
    import importlib.util

    # microbatches: a model without batch norm, which normalizes each microbatch ([Note: microbatch schedules])
    example, args = ("wide_mlp", dict(width=64)) if "microbatches" in KINDS[kind][3] else ("mlp", dict(hidden=64))
    module_spec = importlib.util.spec_from_file_location(f"{example}_example", ROOT / "examples" / f"{example}.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    torch.manual_seed(0)
    last, middle, _, distributed, optimizer = KINDS[kind]
    optimizer, _, stage = optimizer.partition("|")
    spec = SPEC.replace("__KIND__", last).replace("__KIND1__", middle).replace("__OPT__", optimizer)
    spec = spec.replace("__STAGE__", f", {stage}" if stage else "")
    spec = spec.replace("__DISTRIBUTED__", f"distributed: {{{distributed}}}" if distributed else "")
    return compile_decoupled(module.build_model(depth=3, **args), spec)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 784, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(STEPS)]


def _rank(rank: int, world: int, store: str, out: str) -> None:
    """Train every kind placed on `world` ranks, one after the other in one process group (one spawn per world
    size: starting processes costs more than the training)."""
    import torch.distributed as dist

    from dnicompile.runtime.distributed import distributed_runtime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        if world == 3:  # first: a chain of delayed cuts ends with gradients in flight that no rank takes
            _regroup(rank, world, Path(out).parent)
        for kind in sorted(k for k in KINDS if len(KINDS[k][2]) == world):
            program = _program(kind)
            torch.manual_seed(0)
            program.build_runtime()
            worker = distributed_runtime(program, placement=KINDS[kind][2])
            for step, (x, y) in enumerate(_batches()):
                worker.train_step(step, x, y)
            worker.drain()
            (Path(out) / kind).mkdir(exist_ok=True)
            torch.save(worker.owned_state(), Path(out) / kind / f"rank{rank}.pt")
            dist.barrier()
        if world == 2:
            _link_delay(rank, Path(out))
            _regroup(rank, world, Path(out).parent)
    finally:
        dist.destroy_process_group()


REGROUP_KIND, REGROUP_AT = "local", 4  # checkpointed at step 4 on TWO (or in one process), resumed elsewhere


def _regroup(rank: int, world: int, top: Path) -> None:
    """[Note: resuming on other workers]: on 2 ranks, train REGROUP_KIND for REGROUP_AT steps and checkpoint (no
    pickled object travels between the ranks), resume that checkpoint on the same 2 ranks, and resume the one
    process's checkpoint (written by `trained`) on 2 ranks; on 3 ranks (spawned after), resume the 2 ranks'
    checkpoint. Each resumed run trains the rest of the batches and keeps its parameters."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from dnicompile.runtime.distributed import distributed_runtime, load_checkpoint, save_checkpoint

    def resume(folder: Path, name: str) -> None:
        program = _program(REGROUP_KIND)
        torch.manual_seed(0)
        program.build_runtime()
        worker = distributed_runtime(program, placement=TWO if world == 2 else THREE)
        assert load_checkpoint(worker, next(folder.glob("ckpt-*")))["step"] == REGROUP_AT
        for step in range(REGROUP_AT, STEPS):
            worker.train_step(step, *batches[step])
        worker.drain()
        torch.save(worker.owned_state(), folder / f"{name}{rank}.pt")
        dist.barrier()

    batches = _batches()
    if world == 2:
        program = _program(REGROUP_KIND)
        torch.manual_seed(0)
        program.build_runtime()
        worker = distributed_runtime(program, placement=TWO)
        for step in range(REGROUP_AT):
            worker.train_step(step, *batches[step])
        worker.drain()
        pickled = c10d._object_to_tensor

        def refuse(*args, **kwargs):
            raise AssertionError("a checkpoint sent a pickled object between ranks")

        c10d._object_to_tensor = refuse  # every object collective (gather_object, broadcast_object_list) uses it
        try:
            save_checkpoint(worker, top / "regroup", REGROUP_AT)
        finally:
            c10d._object_to_tensor = pickled
        resume(top / "regroup", "same")  # 2 -> 2
        resume(top / "local1", "resumed")  # 1 -> 2
        return
    resume(top / "regroup", "resumed")  # 2 -> 3


def _resumed(folder: Path, name: str, world: int) -> dict:
    got = {}
    for r in range(world):
        got.update(torch.load(folder / f"{name}{r}.pt", weights_only=True))
    return got


def _assert_local(got: dict) -> None:
    """`got` equals the local runtime trained on every batch without stopping."""
    want = _local_state(REGROUP_KIND)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize(
    "written, resumed",
    [("regroup", "same"), ("regroup", "resumed"), ("local1", "resumed")],
    ids=["2-to-2", "2-to-3", "1-to-2"],
)
def test_a_run_resumes_on_another_number_of_workers(trained, written, resumed):
    top = trained[2].parent
    assert trained[3].parent == top
    world = 3 if (written, resumed) == ("regroup", "resumed") else 2
    _assert_local(_resumed(top / written, resumed, world))


def test_a_two_worker_checkpoint_resumes_in_one_process(trained):
    """2 -> 1: the 2 ranks' checkpoint in the local runtime, through the loop's restore ([Note: dcp checkpoints])."""
    from types import SimpleNamespace

    from dnicompile.checkpoint import Checkpoint, restore_program

    folder = next((trained[2].parent / "regroup").glob("ckpt-*"))
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    with _one_thread():
        program = _program(REGROUP_KIND)
        torch.manual_seed(0)
        program.build_runtime()
        task = SimpleNamespace(load_state_dict=lambda state: None)
        assert restore_program(program, task, Checkpoint(folder), torch.device("cpu")) == REGROUP_AT
        _train_locally(program, _batches()[REGROUP_AT:])
    _assert_local(program.state_dict())


@contextmanager
def _one_thread():
    """The local references run on one thread, as each worker does, so that float sums match."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train_locally(program, batches) -> None:
    for x, y in batches:
        program.train_step(x, y)


def _local_state(kind: str) -> dict:
    """The reference: the program of `kind` trained on every batch by the local runtime, one thread."""
    with _one_thread():
        program = _program(kind)
        torch.manual_seed(0)
        program.build_runtime()
        _train_locally(program, _batches())
    return program.state_dict()


LATENCY_S = 0.3


def _link_delay(rank: int, out: Path) -> None:
    """Rank 0 sends its clock's time over an emulated link of LATENCY_S; rank 1 writes how long it took (one host:
    the monotonic clock is the same in both processes)."""
    import time
    from datetime import timedelta

    from dnicompile.runtime.transport import P2P, EmulatedLink

    p2p = P2P(rank, "test", timedelta(seconds=30), EmulatedLink(LATENCY_S, None))
    if rank == 0:
        start = time.monotonic()
        p2p.send([torch.tensor([start], dtype=torch.float64)], 1)
        handed = time.monotonic() - start
        p2p.flush()
        torch.save(torch.tensor([handed]), out / "link_send.pt")
    else:
        buf = p2p.recv(torch.empty(1, dtype=torch.float64), 0, "the timed message")
        torch.save(torch.tensor([time.monotonic() - float(buf[0])]), out / "link_delay.pt")


def test_an_emulated_link_delays_a_gloo_message(trained):
    delay = float(torch.load(trained[2] / "link_delay.pt", weights_only=True)[0])
    handed = float(torch.load(trained[2] / "link_send.pt", weights_only=True)[0])
    assert LATENCY_S <= delay < LATENCY_S + 0.5, delay
    assert handed < 0.05, handed  # the sender did not wait for the delivery


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """World size -> the folder holding each kind's trained shards."""
    folders = {}
    # one process's checkpoint at REGROUP_AT, for the 2 ranks to resume (1 -> 2)
    from dnicompile.checkpoint import program_entries, write_checkpoint

    with _one_thread():
        program = _program(REGROUP_KIND)
        torch.manual_seed(0)
        program.build_runtime()
        _train_locally(program, _batches()[:REGROUP_AT])
        write_checkpoint(
            tmp_path_factory.getbasetemp() / "local1", REGROUP_AT, program_entries(program, {}, REGROUP_AT), 2
        )
    for world in sorted({len(k[2]) for k in KINDS.values()}):
        folder = tmp_path_factory.mktemp(f"world{world}")
        mp.start_processes(_rank, args=(world, str(folder / "store"), str(folder)), nprocs=world, start_method="spawn")
        folders[world] = folder
    return folders


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_distributed_runtime_from_python_equals_the_local_runtime(trained, kind):
    world = len(KINDS[kind][2])
    folder = trained[world] / kind
    got = {}
    for r in range(world):
        got.update(torch.load(folder / f"rank{r}.pt", weights_only=True))
    want = _local_state(kind)
    assert got.keys() == want.keys()
    for key in want:
        # microbatches sum the gradient in another order: rounding, carried through Adam's normalization
        tol = dict(rtol=1e-5, atol=1e-6) if "microbatches" in KINDS[kind][3] else dict(rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[key], want[key], **tol, msg=key)
    assert not torch.equal(want["layers.0.0.weight"], _program(kind).state_dict()["layers.0.0.weight"])  # it trained
