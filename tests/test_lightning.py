"""examples/lightning_mlp.py: a program trained by PyTorch Lightning's loop (manual optimization) against the
same program's train_step called by hand on the same batches; and Lightning's checkpoint resuming it. Skipped
where the `lightning` extra is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning", reason="needs the `lightning` extra: pip install -e '.[lightning]'")

from dnicompile import compile_decoupled  # noqa: E402
from dnicompile.compile.model_file import load_module  # noqa: E402

EXAMPLE = load_module(Path(__file__).resolve().parent.parent / "examples" / "lightning_mlp.py")
# Lightning (2.6) warns about its own use of deprecated torch pytree names and about small data loaders
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::RuntimeWarning")

# a delayed cut and a cDNI cut: the runtime keeps state (pending batches, synthesizers) that a resume needs
SPEC = """
inputs: {input: {shape: [16, 12]}}
cuts:
  - {after: '1', delayed_gradient: {delay: 1}}
  - {after: '3', synthetic_gradient: {model: linear, condition_on_labels: true}}
stages:
  default: {optimizer: {name: Adam, lr: 1.0e-2}}
loss: cross_entropy
"""


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _data() -> TensorDataset:  # 4 batches of 16: one epoch is 4 steps
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(64, 12, generator=g), torch.randint(0, 4, (64,), generator=g))


def _trainer(steps: int, root: Path):
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    )


def _by_hand(batches: list) -> nn.Module:
    model = _model()
    program = compile_decoupled(model, SPEC)
    for x, y in batches:
        program.train_step(x, y)
    return model


class _Recorded(EXAMPLE.DecoupledClassifier):
    """The example's module, noting the batches Lightning feeds it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.fed = []

    def training_step(self, batch, batch_idx):
        self.fed.append(batch)
        return super().training_step(batch, batch_idx)


def test_lightning_trains_the_program_like_train_step_and_resumes_from_its_checkpoint(tmp_path):
    """4 steps under Lightning equal train_step by hand on the 4 batches; a Lightning checkpoint then resumes the
    program (its weights, and the runtime's state: the delayed cut's pending batch, the synthesizer and every
    optimizer) and 4 more steps equal train_step by hand on the batches Lightning fed (on a resume at an epoch's
    end Lightning 2.6 feeds the first batch twice: its data order, not ours)."""
    module = _Recorded(_model(), SPEC)
    trainer = _trainer(4, tmp_path)
    trainer.fit(module, DataLoader(_data(), batch_size=16))
    assert trainer.global_step == 4  # Lightning counted the program's steps
    first = list(DataLoader(_data(), batch_size=16))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(module.fed, first, strict=True))
    reference = _by_hand(first)
    for (name, p), q in zip(module.program.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)

    trainer.save_checkpoint(tmp_path / "four.ckpt")
    resumed = _Recorded(_model(), SPEC)
    trainer = _trainer(8, tmp_path)
    trainer.fit(resumed, DataLoader(_data(), batch_size=16), ckpt_path=tmp_path / "four.ckpt", weights_only=True)
    assert trainer.global_step == 8 and len(resumed.fed) == 4
    reference = _by_hand(first + resumed.fed)
    for (name, p), q in zip(resumed.program.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    # and without the runtime's state the same steps end elsewhere (the test can fail)
    bare = _model()
    program = compile_decoupled(bare, SPEC)
    bare.load_state_dict(module.program.model.state_dict())
    for x, y in resumed.fed:
        program.train_step(x, y)
    assert not all(torch.equal(p, q) for p, q in zip(bare.parameters(), reference.parameters()))
