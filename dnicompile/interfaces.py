"""Interfaces: what happens at a cut, one class per kind of cut.

[Note: interfaces] A runtime asks the interface of each cut three things, whatever the kind:
  - `gradient(h, context, preds, batch)`: what the stage before the cut steps with, right after its forward
    (None for an exact cut: the true gradient comes back instead, and the stages on both sides are one
    locked group);
  - `predict(h, context)`: the cut's own models' prediction for the boundary tensors `h` (a dict by tensor
    name), made with autograd so that it can learn;
  - `learn(h, context, delta, batch, preds)`: one step of the cut's own models once the true gradient `delta`
    of those tensors is known (later, in another process, or never).
An interface owns its extra models, their optimizers and schedulers, its statistics (`stats`: loss and the
cosine between what it predicted and what came back) and its checkpoint state (`state_dict`). A runtime (in
one process or over torch.distributed, feed-forward or truncated BPTT) only decides *when* each is called, so
a new kind of cut is a new class here, not a new runtime, and a user can subclass one to try a variant (see
`benchmarks/dni_synth_ema.py`: a synthetic interface that steps its stage with averaged synthesizers).

Predictions are per sample (dl_b/dh_b); the stage's gradient divides by the batch (the batch-mean loss) and
multiplies by the spec's `scale`; the target of a prediction is `batch * delta` (DESIGN.md, "The training step").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import SpecError
from .optim import build_optimizer
from .synthesizers import BUILTIN, Synthesizer, build_local_head, build_synthetic_gradient, build_synthetic_input

Tensors = Mapping[str, torch.Tensor]


class CutStats:
    """Running sums of one interface's learning since the last `reset`: mean loss, and the cosine between all
    predictions and all targets taken together (one vector over every tensor and step)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.count, self.dot, self.pred_sq, self.true_sq = 0.0, 0, 0.0, 0.0, 0.0

    def add(self, loss: float, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.loss_sum += loss
        self.count += 1
        for pred, target in pairs:
            p, t = pred.detach().flatten().double(), target.detach().flatten().double()
            self.dot += float(p @ t)
            self.pred_sq += float(p @ p)
            self.true_sq += float(t @ t)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")

    @property
    def cosine(self) -> float:
        denom = (self.pred_sq * self.true_sq) ** 0.5
        return self.dot / denom if denom > 0 else 0.0


class Interface:
    """The trivial interface: nothing of its own. Subclasses add models, optimizers and state."""

    kind = "base"

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats = CutStats()

    @property
    def exact(self) -> bool:
        """True when the stage before waits for the true gradient (the two sides form one locked group)."""
        return False

    sends_back = True  # whether the stage after the cut sends a gradient back across it (to learn from)
    wants_target = False  # whether `gradient` takes the labels themselves instead of their one-hot context

    def modules(self) -> list[nn.Module]:
        return []

    def train(self, mode: bool = True) -> None:
        for m in self.modules():
            m.train(mode)

    def to(self, device) -> None:
        for m in self.modules():
            m.to(device)

    # the attributes holding this interface's optimizers and schedulers (None where unused), saved by name
    _optimizers: tuple[str, ...] = ()

    def state_dict(self) -> dict:
        return {name: _state(getattr(self, name)) for name in self._optimizers}

    def load_state_dict(self, state: dict) -> None:
        for name in self._optimizers:
            _load(getattr(self, name), state.get(name))


class ExactInterface(Interface):
    """An exact cut: the true gradient crosses it, so it has nothing to predict or learn."""

    kind = "exact"

    @property
    def exact(self) -> bool:
        return True


def _step(loss: torch.Tensor, optimizer, scheduler) -> None:
    """One step of an interface's own models on `loss`: clear, backward, step, and the schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def _state(obj) -> dict | None:
    return obj.state_dict() if obj is not None else None


def _load(obj, state) -> None:
    if obj is not None and state is not None:
        obj.load_state_dict(state)


class SyntheticModels(nn.Module):
    """The models of a synthetic interface: a gradient synthesizer per tensor (`grad`), and optionally a
    synthetic-input model per tensor (`input`). Its state_dict keys are those of checkpoints before format 2."""

    def __init__(self) -> None:
        super().__init__()
        self.grad = nn.ModuleDict()
        self.input = nn.ModuleDict()


class SyntheticInterface(Interface):
    """Synthetic gradients (DNI; cDNI with `condition_on_labels`) and, optionally, synthetic inputs.

    `tensors` are (name, per-sample shape) of the float tensors that cross; the gradient synthesizers
    (and input models, when `input_config` is given) are built in that order, a gradient model then an input
    model per tensor, so a seed gives the same weights in every runtime."""

    kind = "synthetic"

    def __init__(
        self,
        name: str,
        tensors: list[tuple[str, tuple[int, ...]]],
        config,
        num_classes: int,
        where: str,
        input_config=None,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(name)
        self.config = config
        self.scale = config.scale
        self.models = SyntheticModels()
        for tensor, shape in tensors:
            self.models.grad[tensor] = build_synthetic_gradient(config, tuple(shape), num_classes, where)
            if input_config is not None:
                self.models.input[tensor] = build_synthetic_input(input_config, input_shape, tuple(shape), where)
        self.optimizer, self.scheduler = build_optimizer(self.models.grad.parameters(), config.optimizer, where)
        self.input_optimizer = self.input_scheduler = None
        if input_config is not None and len(self.models.input):
            self.input_optimizer, self.input_scheduler = build_optimizer(
                self.models.input.parameters(), input_config.optimizer, where
            )
        self.input_stats = CutStats()

    @property
    def names(self) -> list[str]:
        return list(self.models.grad)

    @property
    def has_input(self) -> bool:
        return len(self.models.input) > 0

    def modules(self) -> list[nn.Module]:
        return [self.models]

    # ---------------------------------------------------------------- the gradient
    def predict(self, h: Tensors, context: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """M(h, c) for every tensor this interface predicts, with autograd (per sample, (B, ...))."""
        return {name: self.models.grad[name](h[name].detach(), context) for name in self.names if name in h}

    def gradient(self, h: Tensors, context, preds: Tensors, batch: int) -> dict[str, torch.Tensor]:
        """What the stage before steps with: scale * M(h, c) / batch."""
        scale = self.scale / batch
        return {name: pred.detach() * scale for name, pred in preds.items()}

    def learn(
        self,
        h: Tensors,
        context: torch.Tensor | None,
        delta: Mapping[str, torch.Tensor | None],
        batch: int,
        preds: Tensors | None = None,
        stats: bool = True,
    ) -> float | None:
        """One step of sum over tensors of ||M(h, c) - batch * delta||^2 (mean over elements). `preds` made by
        `predict` with the models as they are now may be passed to save a forward; otherwise they are made
        here (the distributed runtime learns from an older h with the current models: making the prediction
        again learned far better than back-propagating the old one, measured on examples/wide_mlp.py).
        A missing delta (the tensor did not reach the loss) is a zero target."""
        if preds is None:
            preds = self.predict(h, context)
        if not preds:
            return None
        targets = {
            name: torch.zeros_like(pred) if delta.get(name) is None else delta[name].detach() * batch
            for name, pred in preds.items()
        }
        loss = torch.stack([F.mse_loss(pred, targets[name]) for name, pred in preds.items()]).sum()
        _step(loss, self.optimizer, self.scheduler)
        value = float(loss.detach())
        if stats:
            self.stats.add(value, ((preds[n], targets[n]) for n in preds))
        self.learned(h, context)
        return value

    def learned(self, h: Tensors, context) -> None:
        """Called after each step of the models (for subclasses: averages, schedules)."""

    # ---------------------------------------------------------------- the input
    def predict_input(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """I(x) for every tensor with a synthetic-input model, with autograd."""
        return {name: model(x) for name, model in self.models.input.items()}

    def learn_input(self, synthetic: Tensors, real: Tensors) -> float:
        """One step of ||I(x) - h||^2 once the real boundary tensors are known."""
        loss = torch.stack([F.mse_loss(synthetic[n], real[n].detach()) for n in synthetic if n in real]).sum()
        _step(loss, self.input_optimizer, self.input_scheduler)
        value = float(loss.detach())
        self.input_stats.add(value, ())
        return value

    # ---------------------------------------------------------------- checkpoints
    _optimizers = ("optimizer", "scheduler", "input_optimizer", "input_scheduler")

    def state_dict(self) -> dict:
        return {"models": self.models.state_dict(), **super().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.models.load_state_dict(state["models"])
        super().load_state_dict(state)


class BoundaryInterface(SyntheticInterface):
    """A truncation boundary of a recurrent core: the state crossing it (all state tensors flattened into one
    (B, D) vector, `state`) with a synthetic gradient of the future's loss, bootstrapped at `discount`; and the
    paper's auxiliary task when `aux` is set: a head from the core's output after a segment's first step
    predicts the synthetic gradient that the segment's end will receive."""

    kind = "boundary"

    def __init__(
        self,
        name: str,
        state_size: int,
        config,
        where: str,
        discount: float,
        aux_input: int | None = None,
        aux_where: str = "",
    ):
        super().__init__(name, [("state", (state_size,))], config, 0, where)
        self.discount = discount
        self.aux = self.aux_optimizer = None
        if aux_input is not None:
            if config.model not in BUILTIN[:2]:
                raise SpecError(
                    f"{aux_where}: `aux: true` builds its head like the synthesizer, which must then be `linear` or "
                    f"`mlp` (got {config.model!r})."
                )
            self.aux = Synthesizer(config.model, (aux_input,), (state_size,), 0, config, flat=True)
            self.aux.zero_last_layer()
            self.aux_optimizer = build_optimizer(self.aux.parameters(), config.optimizer, aux_where)[0]
        self.aux_stats = CutStats()

    def modules(self) -> list[nn.Module]:
        return [self.models] + ([self.aux] if self.aux is not None else [])

    def learn_aux(self, first_output: torch.Tensor, g: torch.Tensor, weight: float) -> float:
        """One step of the aux head towards the synthetic gradient g (its loss, weighted, also flows into the
        core through `first_output`, which is the point of the task)."""
        loss = F.mse_loss(self.aux(first_output), g.detach())
        (weight * loss).backward()
        self.aux_optimizer.step()
        self.aux_optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        self.aux_stats.add(value, ())
        return value

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.aux is not None:
            state.update(aux=self.aux.state_dict(), aux_optimizer=self.aux_optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.aux is not None:
            self.aux.load_state_dict(state["aux"])
            self.aux_optimizer.load_state_dict(state["aux_optimizer"])


class LocalLossInterface(Interface):
    """A local-loss cut (DGL, InfoPro): an auxiliary head on the boundary tensors is trained on the labels with
    the spec's loss, and the stage before the cut steps with `weight` times that loss's gradient. Nothing is sent
    back across the cut, so the stage after it does not compute a gradient for its input. The head's loss is
    `stats.loss`, its accuracy on the batch `accuracy` (class scores against class labels)."""

    kind = "local"
    sends_back = False
    wants_target = True

    def __init__(self, name: str, tensors, config, loss_fn, num_classes: int, per_token: bool, where: str) -> None:
        super().__init__(name)
        self.config = config
        self.names = [n for n, _ in tensors]
        self.head = build_local_head(config, [tuple(s) for _, s in tensors], num_classes, per_token, where)
        self.optimizer, self.scheduler = build_optimizer(self.head.parameters(), config.optimizer, where)
        self.loss_fn = loss_fn
        self.weight = config.weight
        self.accuracy: float | None = None

    def modules(self) -> list[nn.Module]:
        return [self.head]

    def predict(self, h: Tensors, target) -> dict[str, torch.Tensor]:
        return {}  # nothing comes back to learn from

    def gradient(self, h: Tensors, target, preds, batch: int) -> dict[str, torch.Tensor]:
        """One step of the head on loss(head(h), labels); returns weight * d loss / d h for the stage."""
        leaves = [h[n].detach().requires_grad_(True) for n in self.names if n in h]
        if not leaves:
            return {}
        scores = self.head(*leaves)
        loss = self.loss_fn(scores, target)
        _step(loss, self.optimizer, self.scheduler)
        value = float(loss.detach())
        self.stats.add(value, ())
        if not target.is_floating_point() and scores.shape[:-1] == target.shape:
            self.accuracy = float((scores.detach().argmax(-1) == target).float().mean())
        names = [n for n in self.names if n in h]
        return {n: self.weight * leaf.grad for n, leaf in zip(names, leaves) if leaf.grad is not None}

    _optimizers = ("optimizer", "scheduler")

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), **super().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        super().load_state_dict(state)


def is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def interface_for_cut(
    cut,
    num_classes: int,
    input_shape: tuple[int, ...] | None,
    where: str,
    classes: Mapping | None = None,
    local_loss_fn=None,
    local_per_token: bool = False,
) -> Interface:
    """The interface of a feed-forward cut, by its kind; `classes` may replace the class of a kind ("exact",
    "synthetic", "local") or of one cut (by its name) with a subclass. A local-loss head is trained with
    `local_loss_fn` and gives one score per class (per token when `local_per_token`)."""
    classes = classes or {}
    tensors = [(b.name, tuple(b.shape[1:])) for b in cut.boundary if is_float(b.dtype)]
    if cut.local_loss is not None:
        cls = classes.get(cut.name, classes.get("local", LocalLossInterface))
        return cls(cut.name, tensors, cut.local_loss, local_loss_fn, num_classes, local_per_token, where)
    if cut.synthetic_gradient is None:
        cls = classes.get(cut.name, classes.get("exact", ExactInterface))
        return cls(cut.name)
    cls = classes.get(cut.name, classes.get("synthetic", SyntheticInterface))
    return cls(
        cut.name,
        tensors,
        cut.synthetic_gradient,
        num_classes,
        where,
        input_config=cut.synthetic_input,
        input_shape=input_shape,
    )
