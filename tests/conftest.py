"""Shared checks that a compiled program is the model, only cut up.

The checks are fixtures (session scope, so hypothesis tests can use them too); each compares the program
with plain PyTorch on the same model, never with stored numbers.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

COMPUTE_OPS = ("call_module", "call_function", "call_method")


def compute_nodes(graph: fx.Graph) -> Counter:
    """Multiset of (name, op, target) of the nodes that compute something."""
    return Counter((n.name, n.op, n.target) for n in graph.nodes if n.op in COMPUTE_OPS)


def assert_nodes_once(program, model: nn.Module) -> None:
    """Together the stage graphs hold every compute node of the model's traced graph, each exactly once."""
    reference = compute_nodes(fx.symbolic_trace(model).graph)
    stages = Counter()
    for stage in program.stages:
        stages += compute_nodes(stage.graph_module.graph)
    missing, extra = reference - stages, stages - reference
    assert not missing and not extra, f"missing from the stages: {sorted(missing)}; extra or repeated: {sorted(extra)}"
    names = Counter(name for name, _, _ in stages.elements())
    assert max(names.values()) == 1, f"nodes in more than one stage: {[n for n, c in names.items() if c > 1]}"


def assert_params_shared(program, model: nn.Module) -> None:
    """Every stage reads the model's own parameter and buffer tensors (no copies), each parameter in one stage."""
    model_keys = set(model.state_dict())
    owner: dict[str, int] = {}
    for stage in program.stages:
        gm = stage.graph_module
        for name, p in gm.named_parameters():
            assert p is model.get_parameter(name), f"stage {stage.index}: parameter {name} is a copy"
            assert name not in owner, f"parameter {name} in stages {owner[name]} and {stage.index}"
            owner[name] = stage.index
        for name, b in gm.named_buffers():
            assert b is model.get_buffer(name), f"stage {stage.index}: buffer {name} is a copy"
        extra = set(gm.state_dict()) - model_keys
        assert not extra, f"stage {stage.index} state_dict has keys the model's has not: {sorted(extra)}"
    unused = {n for n, _ in model.named_parameters()} - set(owner)
    assert not unused, f"parameters in no stage: {sorted(unused)}"


def assert_forward_matches(program, model: nn.Module, inputs: tuple) -> None:
    """program(*inputs) == model(*inputs), in train mode and in eval mode."""
    for train in (True, False):
        program.train(train)
        assert model.training is train
        with torch.no_grad():
            expected = model(*inputs)
            got = program(*inputs)
        torch.testing.assert_close(got, expected, msg=lambda m, t=train: f"train={t}: {m}")
    program.train(True)


def assert_grads_match(reference: nn.Module, program, model: nn.Module, inputs: tuple, loss_fn) -> None:
    """One backward through the program leaves on every parameter of `model` the gradient that plain backprop
    leaves on the same parameter of `reference` (a deep copy of `model` taken before either ran)."""
    for m in (reference, model):
        m.train()
        m.zero_grad(set_to_none=True)
    program.train()
    loss_fn(reference(*inputs)).backward()
    loss_fn(program(*inputs)).backward()
    params = dict(model.named_parameters())
    assert params.keys() == dict(reference.named_parameters()).keys()
    for name, ref in reference.named_parameters():
        got = params[name].grad
        if ref.grad is None:
            assert got is None, f"{name}: gradient through the program but none through the model"
            continue
        assert got is not None, f"{name}: no gradient through the program"
        torch.testing.assert_close(got, ref.grad, msg=lambda m, n=name: f"grad of {n}: {m}")


def assert_trains_like_plain(program, model: nn.Module, reference: nn.Module, opt, batches, loss_fn=None, rel=1e-6):
    """program.train_step on each (x, y) of `batches` gives plain PyTorch's loss, zero_grad / backward / `opt.step()`
    on `reference` (a deep copy of `model` taken before either ran; `loss_fn(reference, x, y)`, by default
    cross-entropy of its output), and `model` ends with `reference`'s state_dict (batch-norm statistics too)."""
    loss_fn = loss_fn or (lambda m, x, y: F.cross_entropy(m(x), y))
    for x, y in batches:
        result = program.train_step(x, y)
        opt.zero_grad()
        loss = loss_fn(reference, x, y)
        loss.backward()
        opt.step()
        assert result.loss == pytest.approx(loss.item(), rel=rel)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], msg=key)


@pytest.fixture(scope="session")
def checks() -> SimpleNamespace:
    return SimpleNamespace(
        nodes_once=assert_nodes_once,
        params_shared=assert_params_shared,
        forward_matches=assert_forward_matches,
        grads_match=assert_grads_match,
        trains_like_plain=assert_trains_like_plain,
    )


@pytest.fixture
def one_thread():
    """One torch thread for the test: two on a shared 2-core machine are many times slower for small ops, and a
    reference that must match a worker's float sums runs on one thread as each worker does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def signal_when(proc, ready, sig=signal.SIGTERM, what: str = "output", wait_s: float = 120) -> tuple[str, str]:
    """Send `sig` to the subprocess `proc` (started with stdout and stderr piped, as text) once `ready()` holds,
    failing the test if it ends before or `wait_s` pass; returns its (stdout, stderr). It is killed if it has not
    ended 60 s after the signal."""
    try:
        deadline = time.monotonic() + wait_s
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"no {what} within {wait_s:.0f} s"
            time.sleep(0.1)
        proc.send_signal(sig)
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="session", autouse=True)
def _no_downloads(tmp_path_factory):
    """No test touches the internet: data sets are never downloaded (DNICOMPILE_OFFLINE=1), the cache folder is an
    empty one of this session, and the mirror an address where nothing listens. Worker processes and `python -m
    dnicompile` subprocesses inherit these; tests/test_download.py sets its own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DNICOMPILE_OFFLINE", "1")
        mp.setenv("DNICOMPILE_DATA", str(tmp_path_factory.mktemp("data-cache")))
        mp.setenv("DNICOMPILE_DATA_MIRROR", "http://127.0.0.1:1/")
        yield
