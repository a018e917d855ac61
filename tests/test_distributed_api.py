"""The distributed runtime started from Python, without the command line: two processes join a gloo group (a
file store: nothing listens on the network), each builds the same program and takes its stages with
`distributed_runtime`, and ends with the parameters of the local runtime trained on the same batches: with exact
cuts (pipeline parallelism), with a local-loss cut between the ranks (nothing is sent back across it, so
the first rank never waits for the second), and with delayed cuts between the ranks (each `weights` setting,
delays 1 and 2, and two chained delayed cuts on three ranks, whose delays add)."""

from __future__ import annotations

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
  default: {optimizer: {name: SGD, lr: 0.05, momentum: 0.9}}
loss: cross_entropy
"""
STEPS, BATCH = 6, 16


TWO = [[0, 1, 2], [3]]
KINDS = {  # name -> (the last cut's kind, the middle cut's kind, placement)
    "exact": ("", "", TWO),
    "local": ("local_loss: {head: mlp, hidden: 32, optimizer: {name: SGD, lr: 0.1}}", "", TWO),
    "delayed1-stash": ("delayed_gradient: {delay: 1}", "", TWO),
    "delayed2-current": ("delayed_gradient: {delay: 2, weights: current, shrink: 0.5}", "", TWO),
    "delayed1-recompute": ("delayed_gradient: {delay: 1, weights: recompute}", "", TWO),
    "delayed-chain": ("delayed_gradient: {delay: 1}", "delayed_gradient: {delay: 1}", [[0, 1], [2], [3]]),
}


def _program(kind: str = "exact"):
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("mlp_example", ROOT / "examples" / "mlp.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    torch.manual_seed(0)
    last, middle, _ = KINDS[kind]
    spec = SPEC.replace("__KIND__", last).replace("__KIND1__", middle)
    return compile_decoupled(module.build_model(depth=3, hidden=64), spec)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 784, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(STEPS)]


def _rank(rank: int, world: int, store: str, out: str, kind: str) -> None:
    import torch.distributed as dist

    from dnicompile.runtime.distributed import distributed_runtime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        program = _program(kind)
        torch.manual_seed(0)
        program.build_runtime()
        worker = distributed_runtime(program, placement=KINDS[kind][2])
        for step, (x, y) in enumerate(_batches()):
            worker.train_step(step, x, y)
        worker.drain()
        torch.save(worker.owned_state(), Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_distributed_runtime_from_python_equals_the_local_runtime(tmp_path, kind):
    world = len(KINDS[kind][2])
    mp.start_processes(
        _rank, args=(world, str(tmp_path / "store"), str(tmp_path), kind), nprocs=world, start_method="spawn"
    )
    got = {}
    for r in range(world):
        got.update(torch.load(tmp_path / f"rank{r}.pt", weights_only=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        program = _program(kind)
        torch.manual_seed(0)
        program.build_runtime()
        for x, y in _batches():
            program.train_step(x, y)
    finally:
        torch.set_num_threads(threads)
    want = program.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
    assert not torch.equal(want["layers.0.0.weight"], _program().state_dict()["layers.0.0.weight"])  # it trained
