"""Synthesizers: models that predict, at a cut, the gradient of a boundary tensor or the tensor itself.

Shapes are per sample (batch dimension excluded):
- (F,)      features: linear / mlp act on F (concatenated with the one-hot label for cDNI);
- (T, F)    tokens: linear / mlp act on each token's F (labels per token when they are (B, T) of the same T);
- (C, H, W) feature maps: conv uses kxk 'same' convolutions, labels broadcast as extra channels;
  linear is one such convolution.

The last layer of every synthetic-gradient model starts at zero (weights and bias), so step 0 sends
no gradient, as in the paper. A synthesizer predicts the *per-sample* gradient d l_b / d h_b; the
runtime divides by the batch size to get dL/dh of the batch-mean loss.

[Note: label context] cDNI conditions a synthesizer on the labels' one-hot, (B, K) for labels (B,) or
(B, T_l, K) for labels (B, T_l) (a position labelled -100, ignored by the loss, is all zeros). How it joins a
boundary tensor h depends on whether h's axes are the labels', which a tensor does not say; the rule, `auto`:
- per token: h is a token tensor, (B, T, F), and T == T_l. Its token t reads the one-hot of label t (a
  decoder's hidden states, a causal LM's: token t predicts label t);
- per sample: any other tensor of the batch, among them a token tensor with T != T_l (an encoder's
  hidden states have the source's tokens, the labels the target's: source token t has nothing to do with
  target token t), a (C, H, W) map and a flat tensor: the mean of its sample's one-hots over the positions the
  loss counts, (B, K), repeated over h's tokens or as extra channels of a map. Labels (B,) are this already;
- per batch: a tensor without a batch dimension, whose leading size is not the step's batch (T5's relative
  position bias, (1, heads, T, T), made from a parameter and read by every sample): it cannot be per
  sample. Its gradient is the sum over the batch of every sample's (the synthesizer's target, as for any
  tensor: batch x the true dL/dh), so it is conditioned on the whole batch's labels: the mean of the one-hots
  over every position the loss counts, (1, K), expanded over its leading size. Its synthetic gradient goes back
  into the parameter it was made from like any other, and the true one, behind the cut, is what it learns.
The shapes decide it: a compiled program fixes every size but the batch, so a tensor gets the same context at
every step. Shapes cannot tell an encoder's tensor from a decoder's when the source and target lengths are
equal, nor a batch-less tensor whose leading size happens to be the batch (a batch of 1: then both contexts
are the same): the spec's `synthetic_gradient: {label_context: {<tensor>: token | sample | batch | none}}`
settles one tensor (`none`: a synthesizer without labels), by the name the stage table shows. A
synthesizer of your own ('package.module:ClassName') is given the one-hot as it is and shapes it itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import SpecError, did_you_mean
from .spec import LABEL_CONTEXTS, SyntheticGradientConfig, SyntheticInputConfig, import_named

BUILTIN = ("linear", "mlp", "conv")


def _zero_(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _mlp(d_in: int, d_out: int, hidden: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    width = d_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    mods.append(nn.Linear(width, d_out))
    return nn.Sequential(*mods)


def _convnet(c_in: int, c_out: int, hidden: int, layers: int, k: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    width = c_in
    for _ in range(layers):
        mods += [nn.Conv2d(width, hidden, k, padding=k // 2), nn.BatchNorm2d(hidden), nn.ReLU()]
        width = hidden
    mods.append(nn.Conv2d(width, c_out, k, padding=k // 2))
    return nn.Sequential(*mods)


class Synthesizer(nn.Module):
    """f(h, c) -> tensor shaped like the target, for one boundary tensor of per-sample shape `shape`.

    `num_classes` > 0 concatenates the one-hot context (labels) to the input, joined as `label_context` says
    ([Note: label context]).
    """

    def __init__(
        self, kind: str, shape, out_shape, num_classes: int, cfg, flat: bool = False, label_context: str = "auto"
    ):
        super().__init__()
        if label_context not in LABEL_CONTEXTS:
            raise ValueError(f"unknown label context {label_context!r}{did_you_mean(label_context, LABEL_CONTEXTS)}")
        if label_context == "none":
            num_classes = 0
        self.kind, self.shape, self.out_shape, self.num_classes = kind, tuple(shape), tuple(out_shape), num_classes
        self.label_context = label_context
        hidden = cfg.hidden
        if len(shape) == 3 and kind in ("conv", "linear") and not flat:
            c = shape[0]
            k = getattr(cfg, "kernel_size", 5)
            layers = cfg.layers if kind == "conv" else 0
            self.net = _convnet(c + num_classes, out_shape[0], hidden or c, layers, k)
            self.mode = "map"
        else:
            if kind == "conv":
                raise ValueError(f"a conv synthesizer needs a (C, H, W) feature map, but the tensor is {list(shape)}")
            per_token = len(shape) == 2 and len(out_shape) == 2 and not flat
            d_in = shape[-1] if per_token else math.prod(shape)
            d_out = out_shape[-1] if per_token else math.prod(out_shape)
            layers = cfg.layers if kind == "mlp" else 0
            self.net = _mlp(d_in + num_classes, d_out, hidden or 1024, layers)
            self.mode = "token" if per_token else "flat"

    def zero_last_layer(self) -> None:
        _zero_(self.net[-1])

    def context_kind(self, h_shape, context_shape) -> str:
        """How the labels join a tensor of shape `h_shape` (batch first) given the one-hot's shape: token,
        sample or batch ([Note: label context]); none without labels."""
        if not self.num_classes or context_shape is None:
            return "none"
        if self.label_context != "auto":
            how = self.label_context
        elif h_shape[0] != context_shape[0]:
            how = "batch"
        else:
            aligned = self.mode == "token" and len(context_shape) == 3 and h_shape[1] == context_shape[1]
            how = "token" if aligned else "sample"
        if how in ("token", "sample") and h_shape[0] != context_shape[0]:
            raise ValueError(
                f"label_context `{how}` needs the tensor's leading size to be the batch: the tensor is "
                f"{list(h_shape)}, the labels' one-hot {list(context_shape)} (`batch` joins one for the whole batch)"
            )
        if how == "token" and (self.mode != "token" or len(context_shape) != 3 or h_shape[1] != context_shape[1]):
            raise ValueError(
                f"label_context `token` joins the labels to a (B, T, F) tensor token by token, and needs as many "
                f"tokens as the labels: the tensor is {list(h_shape)}, the labels' one-hot {list(context_shape)}"
            )
        return how

    def label_features(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The labels' one-hot as this tensor reads it: (B', T, K) per token, else (B', K), B' = h's leading size."""
        how = self.context_kind(tuple(h.shape), tuple(context.shape))
        ctx = context.to(h.dtype)
        if how == "token":
            return ctx
        if how == "batch":
            return mean_context(ctx.reshape(1, -1, ctx.shape[-1])).expand(h.shape[0], -1)
        return mean_context(ctx.flatten(1, -2)) if ctx.dim() > 2 else ctx

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b = h.shape[0]
        ctx = self.label_features(h, context) if self.num_classes else None
        if self.mode == "map":
            if ctx is not None:  # (B, K) labels -> (B, K, H, W) extra channels
                h = torch.cat([h, ctx[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])], dim=1)
            return self.net(h)
        if self.mode == "token":
            t = h.shape[1]
            x = h.reshape(b * t, -1)  # (B*T, F)
            if ctx is not None:
                ctx = ctx.reshape(b * t, -1) if ctx.dim() == 3 else ctx.repeat_interleave(t, dim=0)
                x = torch.cat([x, ctx], dim=1)
            return self.net(x).reshape(b, t, -1)
        x = h.reshape(b, -1)
        if ctx is not None:
            x = torch.cat([x, ctx], dim=1)
        return self.net(x).reshape(b, *self.out_shape)


def mean_context(ctx: torch.Tensor) -> torch.Tensor:
    """(B, T, K) one-hots -> (B, K): each sample's mean over its positions that are not all zero (a label of
    -100, which the loss ignores, has an all-zero one-hot); a sample with none gets zeros."""
    counted = (ctx != 0).any(dim=-1).sum(dim=1, keepdim=True)  # (B, 1)
    return ctx.sum(dim=1) / counted.clamp(min=1).to(ctx.dtype)


def _built(module, path: str, shape, where: str) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise SpecError(
            f"{where}: synthesizer {path}{tuple(shape)} returned a {type(module).__name__}, not a torch.nn.Module."
        )
    return module


def build_synthetic_gradient(
    cfg: SyntheticGradientConfig, shape: tuple[int, ...], num_classes: int, where: str, label_context: str = "auto"
) -> nn.Module:
    """A synthetic-gradient model for one boundary tensor of per-sample shape `shape`; `label_context` says how
    the labels join it ([Note: label context]; `none`: not at all)."""
    ctx = num_classes if cfg.condition_on_labels and label_context != "none" else 0
    if ":" in cfg.model:
        cls = import_named(cfg.model, "synthesizer class", where, SpecError)
        try:
            built = cls(tuple(shape), ctx, cfg)
        except Exception as e:
            raise SpecError(
                f"{where}: building synthesizer {cfg.model}{tuple(shape)} raised {type(e).__name__}: {e}"
            ) from None
        return _built(built, cfg.model, shape, where)
    if cfg.model not in BUILTIN:
        raise SpecError(
            f"{where}: unknown synthesizer model {cfg.model!r}{did_you_mean(cfg.model, BUILTIN)}; use linear, mlp, "
            "conv, or your own class as 'package.module:ClassName'."
        )
    if label_context == "token" and (len(shape) != 2 or cfg.model == "conv"):
        raise SpecError(
            f"{where}: label_context `token` joins the labels token by token to a (B, T, F) tensor with a linear or "
            f"mlp synthesizer; this tensor is (B, {', '.join(map(str, shape))}) with `model: {cfg.model}`: use "
            "`sample` or `batch`."
        )
    try:
        synth = Synthesizer(cfg.model, shape, shape, ctx, cfg, label_context=label_context)
    except ValueError as e:
        raise SpecError(f"{where}: {e}; use `model: mlp` or `model: linear` for this cut.") from None
    synth.zero_last_layer()
    return synth


def build_synthetic_input(cfg: SyntheticInputConfig, in_shape: tuple[int, ...], out_shape: tuple[int, ...], where):
    """A synthetic-input model I(x) from the program input's per-sample shape to the boundary tensor's."""
    if ":" in cfg.model:
        cls = import_named(cfg.model, "synthesizer class", where, SpecError)
        try:
            built = cls(tuple(in_shape), tuple(out_shape), cfg)
        except Exception as e:
            raise SpecError(
                f"{where}: building synthetic-input model {cfg.model}{tuple(in_shape)} -> {tuple(out_shape)} raised "
                f"{type(e).__name__}: {e}"
            ) from None
        return _built(built, cfg.model, in_shape, where)
    if cfg.model not in ("linear", "mlp"):
        raise SpecError(f"{where}: unknown synthetic-input model {cfg.model!r}{did_you_mean(cfg.model, BUILTIN[:2])}.")
    return Synthesizer(cfg.model, in_shape, out_shape, 0, cfg, flat=True)


def one_hot_context(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels (B,) or (B, T) -> float one-hot (B, K) or (B, T, K); float targets pass through. A negative label
    (cross-entropy's ignore index, -100) gets an all-zero context."""
    if target.is_floating_point():
        return target
    ignore = target < 0
    hot = F.one_hot(target.long().clamp(min=0), num_classes).float()
    if ignore.any():
        hot[ignore] = 0.0
    return hot


class LocalHead(nn.Module):
    """An auxiliary classifier on one cut's boundary tensors (a local-loss cut): per-sample features
    (flattened and concatenated) -> linear or MLP -> class scores; per token for (T, F) tensors with (B, T) labels;
    for a (C, H, W) feature map `conv` is convolutions, average pooling, then a linear layer."""

    def __init__(self, kind: str, shapes: list[tuple[int, ...]], num_classes: int, cfg, per_token: bool):
        super().__init__()
        self.kind, self.per_token = kind, per_token
        if kind == "conv":
            (c, _, _), k = shapes[0], cfg.kernel_size
            mods: list[nn.Module] = []
            width = c
            for _ in range(cfg.layers):
                mods += [nn.Conv2d(width, cfg.hidden, k, padding=k // 2), nn.BatchNorm2d(cfg.hidden), nn.ReLU()]
                width = cfg.hidden
            self.net = nn.Sequential(*mods, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
        else:
            d_in = sum(s[-1] if per_token else math.prod(s) for s in shapes)
            self.net = _mlp(d_in, num_classes, cfg.hidden, cfg.layers if kind == "mlp" else 0)

    def forward(self, *hs: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return self.net(hs[0])
        if self.per_token:
            b, t = hs[0].shape[:2]
            x = torch.cat([h.reshape(b * t, -1) for h in hs], dim=1)
            return self.net(x).reshape(b, t, -1)
        b = hs[0].shape[0]
        return self.net(torch.cat([h.reshape(b, -1) for h in hs], dim=1))


def build_local_head(cfg, shapes: list[tuple[int, ...]], num_classes: int, per_token: bool, where: str) -> nn.Module:
    """The head of a local-loss cut over the tensors of per-sample `shapes`, giving `num_classes` scores."""
    if ":" in cfg.head:
        cls = import_named(cfg.head, "local-loss head class", where, SpecError)
        try:
            return cls([tuple(s) for s in shapes], num_classes, cfg)
        except Exception as e:
            raise SpecError(f"{where}: building local-loss head {cfg.head} raised {type(e).__name__}: {e}") from None
    if cfg.head not in BUILTIN:
        raise SpecError(
            f"{where}: unknown local-loss head {cfg.head!r}{did_you_mean(cfg.head, BUILTIN)}; use linear, mlp, conv, "
            "or your own class as 'package.module:ClassName'."
        )
    if cfg.head == "conv" and (len(shapes) != 1 or len(shapes[0]) != 3):
        raise SpecError(
            f"{where}: a conv head needs one (C, H, W) feature map at the cut, but the tensors crossing it are "
            f"{[list(s) for s in shapes]}; use `head: mlp` or `head: linear`."
        )
    return LocalHead(cfg.head, shapes, num_classes, cfg, per_token)
