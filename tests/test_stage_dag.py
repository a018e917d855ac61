"""Parallel branches ([Note: stage DAG] in compile/partition.py): two towers cut after each one give stages that
form a DAG (tower A -> head, tower B -> head), not a chain. Against references: the program is the model; exact
cuts train like plain PyTorch; synthetic cuts like a loop written by hand; on 2 workers the towers run at the
same time, each tensor goes straight from its producer to its reader, and the parameters end as the local
runtime's."""

from __future__ import annotations

import copy
import importlib.util
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from dnicompile import compile_decoupled
from dnicompile.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _example():
    spec = importlib.util.spec_from_file_location("two_tower_example", ROOT / "examples" / "two_tower.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _spec(batch: int, top: dict | None = None, bottom: dict | None = None, lr: float = 1e-2) -> dict:
    return {
        "inputs": {"x": {"shape": [batch, 784]}},
        "cuts": [{"after": "top", **(top or {})}, {"after": "bottom", **(bottom or {})}],
        "stages": {"default": {"optimizer": {"name": "Adam", "lr": lr}}},
    }


def _batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_two_towers_form_a_dag_and_the_drawings_show_its_edges():
    from dnicompile.describe import summary_text
    from dnicompile.inspect import stages_dot

    torch.manual_seed(0)
    model = _example().TwoTower(hidden=16, depth=2)
    program = compile_decoupled(model, _spec(8))
    assert not program.chain
    assert sorted(program.stage_graph.edges) == [(0, 2), (1, 2)]  # no edge between the towers
    top, bottom = program.cuts
    # the cut after a tower owns what that tower sends; its point still has every value live across it
    assert [b.name for b in top.sent] == ["top_layers_3"] and [b.name for b in top.boundary] == ["x", "top_layers_3"]
    assert [b.name for b in bottom.sent] == ["bottom_layers_3"]
    # tower B reads the program input itself, and not tower A's output (no relay through it)
    assert [t.name for t in program.stages[1].inputs] == ["x"]
    assert [(b.name, src) for b, src in program.partition.stage_inputs[1]] == [("x", -1)]
    assert [(b.name, src) for b, src in program.partition.stage_inputs[2]] == [
        ("top_layers_3", 0),
        ("bottom_layers_3", 1),
    ]
    x, _ = _batch(8, 0)
    torch.testing.assert_close(program(x), model(x))
    dot = stages_dot(program)
    assert '"stage0" -> "stage2"' in dot and '"stage1" -> "stage2"' in dot and '"input" -> "stage1"' in dot
    assert '"stage0" -> "stage1"' not in dot
    table = summary_text(program, width=300)
    assert "from stage0" in table and "from input" in table and "-> stage2" in table


class Chain(nn.Module):
    """A residual skip over the cut: each stage reads the one before, so the skip is relayed, as before."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = self.a(x)
        return self.c(self.b(h) + h) + x


class Stem(nn.Module):
    """A stem read by two branches and by the head: the branches do not read each other, so the stem's output
    goes straight to each of the three."""

    def __init__(self):
        super().__init__()
        self.stem, self.left, self.right, self.head = (nn.Linear(6, 6) for _ in range(4))

    def forward(self, x):
        s = self.stem(x)
        return self.head(self.left(s) * self.right(s) + s)


def test_a_value_is_relayed_along_a_chain_and_sent_straight_across_branches():
    chain = compile_decoupled(Chain(), {"inputs": {"x": {"shape": [4, 6]}}, "cuts": [{"after": "a"}, {"after": "b"}]})
    assert chain.chain and sorted(chain.stage_graph.edges) == [(0, 1), (1, 2)]
    assert all(cut.sent == cut.boundary for cut in chain.cuts)  # a chain: the cuts as they always were
    assert [(b.name, src) for b, src in chain.partition.stage_inputs[2]] == [("x", 1), ("a", 1), ("b", 1)]
    cuts = [{"after": "stem"}, {"after": "left"}, {"after": "right"}]
    stem = compile_decoupled(Stem(), {"inputs": {"x": {"shape": [4, 6]}}, "cuts": cuts})
    assert not stem.chain and sorted(stem.stage_graph.edges) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert [(b.name, src) for b, src in stem.partition.stage_inputs[3]] == [("stem", 0), ("left", 1), ("right", 2)]
    for program, model in ((chain, Chain()), (stem, Stem())):
        model.load_state_dict(program.state_dict())
        x = torch.randn(4, 6)
        torch.testing.assert_close(program(x), model(x))


def test_a_balanced_placement_lets_each_rank_send_only_from_its_last_stage():
    """[Note: a stage DAG across ranks]: on Stem's graph only [[0], [1, 2, 3]] has every rank send from its last
    stage; equal costs would split a chain in the middle, which a DAG refuses (naming the stage and the fix)."""
    import torch.distributed  # noqa: F401  (RankWorker's module imports it)

    from dnicompile.runtime.distributed import RankWorker
    from dnicompile.runtime.placement import _balanced

    cuts = [{"after": "stem"}, {"after": "left"}, {"after": "right"}]
    stem = compile_decoupled(Stem(), {"inputs": {"x": {"shape": [4, 6]}}, "cuts": cuts})
    assert _balanced([1, 1, 1, 1], 2) == [(0, 1), (2, 3)]  # a chain's split
    assert _balanced([1, 1, 1, 1], 2, stem) == [(0, 0), (1, 3)]
    with pytest.raises(SpecError, match=r"stage2 on rank 1 reads `stem` from stage0, which is not the last stage"):
        RankWorker(stem, 0, 2, [(0, 1), (2, 3)], torch.device("cpu"), 5.0)


def test_exact_cuts_on_two_towers_train_like_plain_pytorch(checks):
    torch.manual_seed(0)
    model = _example().TwoTower(hidden=24, depth=2)
    reference = copy.deepcopy(model)
    program = compile_decoupled(model, _spec(16))
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    checks.trains_like_plain(program, model, reference, opt, [_batch(16, step) for step in range(4)])
    assert not torch.equal(model.top.layers[0].weight, _example().TwoTower(hidden=24, depth=2).top.layers[0].weight)


def test_synthetic_cuts_on_two_towers_equal_a_loop_written_by_hand():
    """cDNI after each tower: each tower steps with its synthesizer's prediction, the head with the loss, and each
    synthesizer learns from the gradient the head sends back to its tower."""
    torch.manual_seed(0)
    model = _example().TwoTower(hidden=24, depth=2)
    reference = copy.deepcopy(model)
    cdni = {
        "synthetic_gradient": {
            "model": "linear",
            "condition_on_labels": True,
            "optimizer": {"name": "Adam", "lr": 1e-2},
        }
    }
    program = compile_decoupled(model, _spec(16, top=cdni, bottom=cdni))
    rt = program.runtime
    synths = [copy.deepcopy(iface.models.grad[cut.sent[0].name]) for iface, cut in zip(rt.interfaces, program.cuts)]
    towers, head = [reference.top, reference.bottom], reference.head
    tower_opts = [torch.optim.Adam(t.parameters(), lr=1e-2) for t in towers]
    head_opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    synth_opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in synths]
    for step in range(4):
        x, y = _batch(16, step)
        result = program.train_step(x, y)
        context = F.one_hot(y, 10).float()
        sent, preds = [], []
        for tower, opt, synth in zip(towers, tower_opts, synths):
            opt.zero_grad()
            h = tower(x)
            pred = synth(h.detach(), context)
            h.backward(pred.detach() / len(x))  # the synthetic gradient, scale 1, per sample
            opt.step()
            sent.append(h.detach().requires_grad_(True))
            preds.append(pred)
        head_opt.zero_grad()
        loss = F.cross_entropy(head(torch.cat(sent, dim=1)), y)
        loss.backward()
        head_opt.step()
        for opt, pred, leaf in zip(synth_opts, preds, sent):
            opt.zero_grad()
            F.mse_loss(pred, leaf.grad * len(x)).backward()
            opt.step()
        assert result.loss == pytest.approx(loss.item(), rel=1e-6)
    for (key, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, msg=key)
    for iface, cut, synth in zip(rt.interfaces, program.cuts, synths):
        for ours, theirs in zip(iface.models.grad[cut.sent[0].name].parameters(), synth.parameters()):
            torch.testing.assert_close(ours, theirs)


def test_a_delayed_cut_on_branches_is_refused_where_the_spec_says_it():
    model = _example().TwoTower(hidden=8, depth=1)
    spec = """
inputs:
  x: {shape: [4, 784]}
cuts:
  - after: top
    delayed_gradient: {delay: 1}
  - after: bottom
"""
    with pytest.raises(
        SpecError, match=r"<yaml>:6:\d+: delayed cut `top` .*do not form a chain \(stage0 -> stage2, stage1 -> stage2\)"
    ):
        compile_decoupled(model, spec)


# --------------------------------------------------------------------------- two workers
STEPS, BATCH, HIDDEN = 6, 256, 1024  # towers heavy enough that each forward takes tens of milliseconds


CDNI = {
    "synthetic_gradient": {"model": "linear", "condition_on_labels": True, "optimizer": {"name": "Adam", "lr": 1e-3}}
}


def _program(synthetic: bool = False):
    """Exact cuts with heavy towers; or, small, cDNI after the top tower with `queue_depth: 0` (rank 0 waits for
    each batch's true gradient before the next batch: the local runtime's updates)."""
    torch.manual_seed(0)
    if not synthetic:
        return compile_decoupled(_example().TwoTower(hidden=HIDDEN, depth=2), _spec(BATCH, lr=1e-3))
    spec = {**_spec(BATCH, top=CDNI, lr=1e-3), "distributed": {"queue_depth": 0}}
    return compile_decoupled(_example().TwoTower(hidden=64, depth=2), spec)


def _rank(rank: int, world: int, store: str, out: str) -> None:
    """The two towers on two ranks ([[0], [1, 2]]): each stage's forward intervals, and each stage's backward as
    the times its parameters' gradients were computed (time.perf_counter: one clock for every process)."""
    import torch.distributed as dist

    from dnicompile.runtime.distributed import distributed_runtime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        program = _program()
        torch.manual_seed(0)
        program.build_runtime()
        worker = distributed_runtime(program, placement=[[0], [1, 2]])
        forward: dict[int, list] = {}
        backward: dict[int, list] = {}
        for s in range(worker.first, worker.last + 1):
            stage, run = program.stages[s], program.stages[s].run

            def timed(values, tensors=None, run=run, s=s):
                start = time.perf_counter()
                out = run(values, tensors)
                forward.setdefault(s, []).append((start, time.perf_counter()))
                return out

            stage.run = timed
            for p in stage.parameters():
                p.register_hook(lambda g, s=s: (backward.setdefault(s, []).append(time.perf_counter()), g)[1])
        for step in range(STEPS):
            worker.train_step(step, *_batch(BATCH, step))
        worker.drain()
        record = {"state": worker.owned_state(), "forward": forward, "backward": backward}
        record.update(messages=dict(worker.p2p.messages), bytes=dict(worker.p2p.bytes))
        torch.save(record, Path(out) / f"rank{rank}.pt")
        dist.barrier()
        program = _program(synthetic=True)
        torch.manual_seed(0)
        program.build_runtime()
        worker = distributed_runtime(program, placement=[[0], [1, 2]])
        for step in range(STEPS):
            worker.train_step(step, *_batch(BATCH, step))
        worker.drain()
        torch.save(worker.owned_state(), Path(out) / f"synthetic{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_towers")
    mp.start_processes(_rank, args=(2, str(folder / "store"), str(folder)), nprocs=2, start_method="spawn")
    records = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in range(2):
        records[r]["synthetic"] = torch.load(folder / f"synthetic{r}.pt", weights_only=True)
    return records


@pytest.mark.parametrize("synthetic", [False, True], ids=["exact", "cdni-queue0"])
def test_two_workers_end_with_the_local_runtimes_parameters(two_workers, synthetic):
    program = _program(synthetic)
    torch.manual_seed(0)
    program.build_runtime()
    for step in range(STEPS):
        program.train_step(*_batch(BATCH, step))
    key = "synthetic" if synthetic else "state"
    got = {**two_workers[0][key], **two_workers[1][key]}
    want = program.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
    untrained = _program(synthetic).state_dict()["top.layers.0.weight"]
    assert not torch.equal(want["top.layers.0.weight"], untrained)  # it trained


def test_the_towers_run_at_the_same_time_on_two_workers(two_workers):
    """Rank 0 holds tower A, rank 1 tower B and the head. Across the exact cut rank 0 waits for the head's
    gradient; the moment rank 1 has sent it, rank 1 runs tower B's forward on the next batch while rank 0 runs
    tower A's backward and then its forward: B's forward of step t falls inside rank 0's work on tower A from
    its backward of step t - 1 to its forward of step t. Were B to wait for A's output (a relay through B, or a
    chain), B's forward of step t could only start after A's forward of step t ended."""
    a_forward, b_forward = two_workers[0]["forward"][0], two_workers[1]["forward"][1]
    a_backward = two_workers[0]["backward"][0]
    per_step = len(a_backward) // STEPS  # one time per parameter of tower A per backward
    assert len(a_forward) == len(b_forward) == STEPS and per_step * STEPS == len(a_backward)
    overlapping = 0
    for t in range(1, STEPS):
        a_busy = (min(a_backward[(t - 1) * per_step : t * per_step]), a_forward[t][1])
        b_start, b_end = b_forward[t]
        overlapping += max(a_busy[0], b_start) < min(a_busy[1], b_end)
    assert overlapping >= STEPS - 2, (overlapping, a_forward, b_forward)


def test_on_two_ranks_the_input_is_not_relayed_through_tower_a(two_workers):
    """Rank 0 sends rank 1 tower A's output and nothing else (the program input, which tower B reads, comes from
    the data on rank 1: in a chain it would be relayed through tower A's rank), and rank 1 sends back its
    gradient: one message each way per step."""
    a_bytes = BATCH * HIDDEN * 4
    assert two_workers[0]["messages"] == {1: STEPS} and two_workers[0]["bytes"] == {1: STEPS * a_bytes}
    assert two_workers[1]["messages"] == {0: STEPS} and two_workers[1]["bytes"] == {0: STEPS * a_bytes}


def _three_ranks(rank: int, world: int, store: str, out: str) -> None:
    """Small towers on three ranks, one stage each: what each rank sent to each other rank."""
    import torch.distributed as dist

    from dnicompile.runtime.distributed import distributed_runtime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        program = _program(synthetic=True)
        torch.manual_seed(0)
        program.build_runtime()
        worker = distributed_runtime(program, placement=[[0], [1], [2]])
        for step in range(2):
            worker.train_step(step, *_batch(BATCH, step))
        worker.drain()
        record = {"state": worker.owned_state(), "messages": dict(worker.p2p.messages)}
        torch.save(record, Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_on_three_ranks_a_tower_sends_to_the_head_past_the_other_tower(tmp_path):
    """Rank 0 (tower A) and rank 1 (tower B) each send only to rank 2 (the head), which sends each its gradient:
    nothing travels between the towers' ranks (a relay would send A's output through rank 1)."""
    mp.start_processes(_three_ranks, args=(3, str(tmp_path / "store"), str(tmp_path)), nprocs=3, start_method="spawn")
    records = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(3)]
    assert [r["messages"] for r in records] == [{2: 2}, {2: 2}, {0: 2, 1: 2}]
    program = _program(synthetic=True)
    torch.manual_seed(0)
    program.build_runtime()
    for step in range(2):
        program.train_step(*_batch(BATCH, step))
    got = {k: v for r in records for k, v in r["state"].items()}
    for name, want in program.state_dict().items():
        torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-7, msg=name)
