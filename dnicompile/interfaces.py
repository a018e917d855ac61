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

from .errors import SpecError, did_you_mean
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
        contexts = getattr(config, "label_context", None) or {}  # [Note: label context] in synthesizers.py
        unknown = [t for t in contexts if t not in dict(tensors)]
        if unknown:
            raise SpecError(
                f"{where}: label_context names {unknown[0]!r}, which is not a float tensor crossing cut `{name}`"
                f"{did_you_mean(unknown[0], [t for t, _ in tensors])}; those are: {', '.join(t for t, _ in tensors)}."
            )
        for tensor, shape in tensors:
            self.models.grad[tensor] = build_synthetic_gradient(
                config, tuple(shape), num_classes, where, contexts.get(tensor, "auto")
            )
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
            scored = target >= 0  # not cross-entropy's ignore index
            hits = (scores.detach().argmax(-1) == target)[scored]
            self.accuracy = float(hits.float().mean()) if hits.numel() else float("nan")
        names = [n for n in self.names if n in h]
        return {n: self.weight * leaf.grad for n, leaf in zip(names, leaves) if leaf.grad is not None}

    _optimizers = ("optimizer", "scheduler")

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), **super().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        super().load_state_dict(state)


# [Note: delayed gradients] A delayed cut (DDG, Huo et al. 2018; Features Replay; FDG; PipeDream's weight stashing)
# lets the stages before it (its group: the stages joined to it by exact cuts) go on without waiting for the true
# gradient. At step t:
#   - the group runs forward on batch t (`forward`), giving h_t; the stage after the cut runs on
#     h_t.detach().requires_grad_() and its backward yields the true gradient delta_t = dL/dh_t, as across a
#     synthetic cut; it reaches the interface by `arrive(t, delta_t, now)`;
#   - the group does not backward from h_t now. At step t it runs the backward of the batch whose delta arrived
#     `delay` steps ago (`backward_due`), with delta * shrink, and steps (where its clocks tick). Until a first
#     gradient is due it does not step at all: a step on zero gradients would still move Adam or momentum.
#   - `weights: stash`: the backward uses the weights its forward used: the forward runs (torch.func.functional_call)
#     on detached clones of the parameters, and their gradients are added to the real parameters' .grad.
#     `current`: the kept activations with today's weights (DDG): the forward runs on aliases of the parameters
#     (`p.data`: the same storage, a version counter of their own), so the optimizer's in-place updates do not
#     trip autograd's saved-tensor check and the backward reads today's values. `recompute`: only the inputs (and
#     the random state, for dropout) are kept, and the forward runs again with today's weights before the
#     backward (Features Replay); the least memory. With delay 0 all three are an exact cut.
#   - `warmup: N`: steps 0..N-1 run with delay 0 (the exact cut's updates); at step N the delay begins, so the
#     group skips its update for `delay` steps (its batches up to N-1 have had their backward) and then steps with
#     gradients `delay` steps old. Early training is where a late gradient points elsewhere most (a delay-1 cut's
#     stale-fresh cosine was -0.2 at step 10 of the wide MLP, 0.95-0.99 after step 50: BENCHMARKS.md).
#   - buffers (batch norm's running statistics) are updated once, by the forward of step t: they go in as aliases
#     (their own version counter, so a later forward's in-place update does not break a kept graph), and every
#     forward run again (recompute, the fresh gradient, a graph rebuilt after a checkpoint) gets clones.
#   - the gradient the group computes for its own inputs belongs to the batch whose backward it ran. If the group
#     starts behind another delayed cut, it arrives there (now), so chained delays add (stage k of K sees a gradient
#     K - k steps old at delay 1, as in DDG / PipeDream). A group behind a synthetic cut is refused by the runtime:
#     its synthesizer would learn from gradients of older batches than its predictions.
#   - statistics: `staleness`, the age of the gradient applied (t - s); and where asked (`measure`), `cosine`:
#     between the stale gradient applied to the group's parameters and the fresh one, the gradient of the newest
#     batch whose delta is known, with today's weights (one more forward and backward).
#   - `predict: linear` (stash only; [Note: weight prediction]): the forward runs on predicted weights, not on
#     today's.
#   - checkpoints: `state_dict` holds the queue of pending batches as tensors (inputs, random state, delta; the
#     stashed weights and buffers, or the tensors the graph saved for `current`, found with saved-tensor hooks),
#     and a graph is rebuilt from them when its backward comes, so a resumed run ends exactly as one that never
#     stopped.


# [Note: weight prediction] A gradient `delay` steps late is applied to weights `delay` updates newer than those
# it was computed with. Under Adam (or any momentum) that costs stability, not only accuracy: for a quadratic of
# preconditioned curvature a, Adam's momentum (b1 = 0.9, fixed preconditioner) is stable up to lr * a = 38 with
# the true gradient, and only up to 1.00 with gradients one step late (2 steps: 0.51), for any b1
# (benchmarks/delay_sharpness.py; BENCHMARKS.md "Sharpness across the switch"), while a depth-16 MLP trains with
# lr * sharpness of 4-52. Linear weight prediction (Kosson et al. 2021, "Pipelined backpropagation at scale")
# runs the forward of batch t on w_t + delay * (w_t - w_prev), w_prev the weights at the group's previous forward:
# an estimate of the weights its gradient will update, made from their last change (the optimizer's own
# direction, whatever the optimizer). The same recursion gives its limit: lr * a = 2.70 at delay 1 (1.21 at 2).
# The cost is one more copy of the group's weights (`previous`, in the checkpoint). During a warm-up, and before
# the weights have changed, the prediction is today's weights.


class ForwardGroup:
    """The stages before a delayed cut as its interface runs them: `run(values, tensors)` is their forward on
    `values`, with the named tensors in `tensors` (parameters, buffers) in place of their own; `params` and
    `buffers` are the real ones, by name."""

    def __init__(self, run, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]) -> None:
        self.run = run
        self.params = {n: p for n, p in params.items() if p.requires_grad}
        self.buffers = dict(buffers)

    def buffer_aliases(self) -> dict[str, torch.Tensor]:
        return {n: b.data for n, b in self.buffers.items()}

    def buffer_clones(self) -> dict[str, torch.Tensor]:
        return {n: b.detach().clone() for n, b in self.buffers.items()}


class _Pending:
    """One batch whose backward is still to come."""

    def __init__(self, step: int, inputs: tuple, rng: dict) -> None:
        self.step = step
        self.inputs = inputs  # detached; `requires_grad` where the group owes a gradient for them
        self.rng = rng  # {"cpu": state, "cuda": state} before the forward
        self.arrived: int | None = None  # the step the delta came in
        self.delta: dict[str, torch.Tensor] = {}
        self.outputs: tuple | None = None  # with graph (stash, current); None: to be (re)built
        self.leaves: dict[str, torch.Tensor] = {}  # what the graph's parameters are (clones, aliases)
        self.weights: dict[str, torch.Tensor] | None = None  # stash: the parameters of the forward
        self.buffers: dict[str, torch.Tensor] | None = None  # stash: the buffers before the forward
        self.saved: list[torch.Tensor | None] | None = None  # current: what the graph saved
        self.live: list[bool] | None = None  # current: which of them are today's parameters or buffers


def _rng_state(values: tuple) -> dict:
    state = {"cpu": torch.get_rng_state()}
    cuda = next((v.device for v in values if isinstance(v, torch.Tensor) and v.device.type == "cuda"), None)
    if cuda is not None:
        state["cuda"] = torch.cuda.get_rng_state(cuda)
        state["device"] = cuda.index if cuda.index is not None else torch.cuda.current_device()
    return state


class _Replay:
    """Run with the random state of a kept batch (dropout draws again what it drew), leaving the global one as
    it was."""

    def __init__(self, rng: dict) -> None:
        self.rng = rng
        self.fork = torch.random.fork_rng(devices=[rng["device"]] if "cuda" in rng else [])

    def __enter__(self):
        self.fork.__enter__()
        torch.set_rng_state(self.rng["cpu"])
        if "cuda" in self.rng:
            torch.cuda.set_rng_state(self.rng["cuda"], self.rng["device"])

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class DelayedGradientInterface(Interface):
    """A delayed-gradient cut ([Note: delayed gradients]): the stage group before it steps with the true gradient
    of the batch it ran `delay` steps ago. The runtime gives it the group (`bind`), runs the group's forward
    through `forward`, hands it each batch's true gradient (`arrive`), and asks for the backward that is due
    (`backward_due`), which returns the gradient of the group's inputs for the cut before it."""

    kind = "delayed"
    has_input = False

    def __init__(self, name: str, names: list[str], config, where: str) -> None:
        super().__init__(name)
        self.config = config
        self.names = list(names)  # the boundary tensors, in order
        self.delay = config.delay  # an int, or "auto": whatever has arrived
        self.weights = config.weights
        self.shrink = config.shrink
        self.predict = getattr(config, "predict", "none")  # "linear": the forward runs on extrapolated weights
        self.previous: dict[str, torch.Tensor] = {}  # predict: the parameters at the last forward
        self.warmup = getattr(config, "warmup", 0)  # steps 0..warmup-1 run with delay 0
        self.measure_every = getattr(config, "measure_every", 10)  # the stale-fresh cosine, every N-th step
        self.where = where
        self.group: ForwardGroup | None = None
        self.queue: list[_Pending] = []  # oldest first
        self.staleness: int | None = None  # of the gradient applied by the last backward_due
        self.cosine: float | None = None  # cos(stale, fresh) of the last measured backward_due

    def bind(self, group: ForwardGroup) -> None:
        self.group = group

    # ---------------------------------------------------------------- the forward
    def forward(self, step: int, values: tuple) -> tuple:
        """The group's forward on batch `step`, keeping what its backward will need; returns the boundary
        tensors (with graph for stash and current)."""
        group = self.group
        inputs = tuple(_leaf(v) for v in values)
        entry = _Pending(step, inputs, _rng_state(values))
        if self.weights == "recompute":
            with torch.no_grad():
                outputs = group.run(inputs, {})
        elif self.weights == "stash":
            entry.weights = self._stash_weights(step)
            entry.buffers = group.buffer_clones()
            entry.leaves = entry.weights
            outputs = group.run(inputs, {**entry.weights, **group.buffer_aliases()})
        else:  # current
            entry.leaves = {n: p.data.requires_grad_(True) for n, p in group.params.items()}
            entry.saved, entry.live = [], []
            live = {_storage(t) for t in [*group.params.values(), *group.buffers.values()]}

            def pack(t):
                entry.saved.append(t)
                entry.live.append(_storage(t) in live)
                return len(entry.saved) - 1

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda i: entry.saved[i]):
                outputs = group.run(inputs, {**entry.leaves, **group.buffer_aliases()})
        if self.weights != "recompute":
            entry.outputs = tuple(outputs)
        self.queue.append(entry)
        return tuple(outputs)

    def _stash_weights(self, step: int) -> dict[str, torch.Tensor]:
        """The weights a stashed forward runs on: clones of today's, or with `predict: linear` today's moved on
        along their last change by the steps until this batch's gradient is applied ([Note: weight prediction])."""
        params = self.group.params
        if self.predict == "none":
            return {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
        horizon = 0 if step < self.warmup else self.delay if self.delay != "auto" else (self.staleness or 1)
        out = {}
        for n, p in params.items():
            now, before = p.detach(), self.previous.get(n)
            # lerp past its end: before + (1 + h)(now - before) = now + h (now - before), with no temporary
            w = now.clone() if before is None or horizon == 0 else torch.lerp(before, now, 1.0 + horizon)
            if before is None:
                self.previous[n] = now.clone()
            else:
                before.copy_(now)
            out[n] = w.requires_grad_(True)
        return out

    def _build(self, entry: _Pending, tensors: dict) -> tuple:
        """The graph of a kept batch, run again with its random state (recompute; a graph lost to a checkpoint)."""
        group = self.group
        with _Replay(entry.rng):
            if self.weights != "current":
                return tuple(group.run(entry.inputs, {**tensors, **group.buffer_clones()}))
            entry.leaves = {n: p.data.requires_grad_(True) for n, p in group.params.items()}
            count = iter(range(len(entry.saved)))

            def pack(t):
                i = next(count)
                if entry.live[i]:
                    entry.saved[i] = t
                return i

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda i: entry.saved[i]):
                return tuple(group.run(entry.inputs, {**entry.leaves, **group.buffer_clones()}))

    # ---------------------------------------------------------------- the gradient
    def arrive(self, step: int, delta: Mapping[str, torch.Tensor | None], now: int) -> None:
        """The true gradient of batch `step`'s boundary tensors (by name; None where one did not reach the loss),
        known at step `now`."""
        for entry in self.queue:
            if entry.step == step:
                entry.delta = {n: g.detach() for n, g in delta.items() if g is not None}
                entry.arrived = now
                return
        raise RuntimeError(f"cut `{self.name}`: a gradient for batch {step}, which is not waiting for one")

    def due(self, now: int) -> _Pending | None:
        """The oldest batch whose gradient is due at step `now` (in the warm-up, the one that arrived: delay 0)."""
        delay = 0 if self.delay == "auto" or now < self.warmup else self.delay
        for entry in self.queue:
            if entry.arrived is not None and now - entry.arrived >= delay:
                return entry
        return None

    def backward_due(self, now: int, measure: bool = False) -> tuple[int, tuple] | None:
        """Run the backward that is due at step `now`, adding shrink * its gradient to the group's parameters'
        .grad; returns (its batch, the gradient of the group's inputs, None where there is none), or None when
        no gradient is due yet. `measure`: the cosine between it and the fresh gradient (`cosine`)."""
        entry = self.due(now)
        if entry is None:
            return None
        fresh = self.fresh_gradient() if measure else None
        params = self.group.params
        if self.weights == "recompute":
            entry.leaves = params
        if entry.outputs is None:
            tensors = entry.leaves if self.weights == "recompute" else None
            if self.weights == "stash":
                tensors = entry.weights
                with _Replay(entry.rng):
                    outs = self.group.run(entry.inputs, {**entry.weights, **_clones(entry.buffers)})
                entry.outputs = tuple(outs)
            else:
                entry.outputs = self._build(entry, tensors or {})
        grads_in = self._backward(entry, entry.leaves, scale=self.shrink)
        names = list(entry.leaves)
        for name, g in zip(names, grads_in[: len(names)]):
            if g is not None:
                p = params[name]
                p.grad = g if p.grad is None else p.grad + g
        self.queue.remove(entry)
        self.staleness = now - entry.step
        if fresh is not None:
            stale = [g for g in grads_in[: len(names)]]
            self.cosine = _cosine(stale, [fresh.get(n) for n in names])
        return entry.step, tuple(grads_in[len(names) :])

    def _backward(self, entry: _Pending, leaves: Mapping[str, torch.Tensor], scale: float) -> list:
        roots, grads = [], []
        for name, h in zip(self.names, entry.outputs):
            if name in entry.delta and isinstance(h, torch.Tensor) and h.requires_grad:
                roots.append(h)
                grads.append(entry.delta[name] * scale if scale != 1 else entry.delta[name])
        wrt = [*leaves.values(), *(x for x in entry.inputs if x.requires_grad)]
        if not roots or not wrt:
            return [None] * (len(leaves) + len(entry.inputs))
        got = list(torch.autograd.grad(roots, wrt, grads, allow_unused=True))
        entry.outputs = None  # the graph is spent
        out, rest = got[: len(leaves)], iter(got[len(leaves) :])
        return out + [next(rest) if x.requires_grad else None for x in entry.inputs]

    def fresh_gradient(self) -> dict[str, torch.Tensor]:
        """The gradient the group's parameters would get from the newest batch whose delta is known, with today's
        weights (no side effects: clones of the parameters and buffers, the batch's random state)."""
        newest = max((e for e in self.queue if e.arrived is not None), key=lambda e: e.step, default=None)
        if newest is None:
            return {}
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in self.group.params.items()}
        probe = _Pending(newest.step, newest.inputs, newest.rng)
        probe.delta = newest.delta
        with _Replay(newest.rng):
            probe.outputs = tuple(self.group.run(newest.inputs, {**leaves, **self.group.buffer_clones()}))
        got = self._backward(probe, leaves, scale=1.0)
        return {n: g for n, g in zip(leaves, got) if g is not None}

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The queue of pending batches, tensors and plain values only."""
        queue = []
        for e in self.queue:
            saved = None
            if e.saved is not None:
                saved = [None if live else t.detach() for t, live in zip(e.saved, e.live)]
            queue.append(
                {
                    "step": e.step,
                    "arrived": e.arrived,
                    "inputs": [x.detach() for x in e.inputs],
                    "needs_grad": [bool(x.requires_grad) for x in e.inputs],
                    "rng": dict(e.rng),
                    "delta": dict(e.delta),
                    "weights": None if e.weights is None else {n: w.detach() for n, w in e.weights.items()},
                    "buffers": e.buffers,
                    "saved": saved,
                    "live": e.live,
                }
            )
        state = {"queue": queue}
        if self.previous:
            state["previous"] = {n: t.detach().clone() for n, t in self.previous.items()}  # updated in place
        return state

    def load_state_dict(self, state: dict) -> None:
        self.queue = []
        self.previous = {n: t.detach().clone() for n, t in state.get("previous", {}).items()}
        for q in state.get("queue", []):
            inputs = tuple(x.detach().requires_grad_(g) for x, g in zip(q["inputs"], q["needs_grad"]))
            e = _Pending(q["step"], inputs, q["rng"])
            e.arrived, e.delta = q["arrived"], dict(q["delta"])
            if q["weights"] is not None:
                e.weights = {n: w.detach().clone().requires_grad_(True) for n, w in q["weights"].items()}
                e.leaves = e.weights
            e.buffers = q["buffers"]
            e.saved, e.live = (list(q["saved"]), list(q["live"])) if q["saved"] is not None else (None, None)
            self.queue.append(e)


def _leaf(v):
    if isinstance(v, torch.Tensor):
        return v.detach().requires_grad_(v.requires_grad)
    return v


def _clones(tensors: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in (tensors or {}).items()}


def _cosine(a: list, b: list) -> float:
    dot = na = nb = 0.0
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        x, y = x.detach().flatten().double(), y.detach().flatten().double()
        dot, na, nb = dot + float(x @ y), na + float(x @ x), nb + float(y @ y)
    return dot / (na * nb) ** 0.5 if na > 0 and nb > 0 else 0.0


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
    "synthetic", "delayed", "local") or of one cut (by its name) with a subclass. A local-loss head is trained with
    `local_loss_fn` and gives one score per class (per token when `local_per_token`)."""
    classes = classes or {}
    tensors = [(b.name, tuple(b.shape[1:])) for b in cut.boundary if is_float(b.dtype)]
    if cut.kind == "delayed":
        cls = classes.get(cut.name, classes.get("delayed", DelayedGradientInterface))
        return cls(cut.name, [b.name for b in cut.boundary], cut.delayed_gradient, where)
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
