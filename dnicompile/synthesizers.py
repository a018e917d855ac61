"""Synthesizers: models that predict, at a cut, the gradient of a boundary tensor or the tensor itself.

Shapes are per sample (batch dimension excluded):
- (F,)      features: linear / mlp act on F (concatenated with the one-hot label for cDNI);
- (T, F)    tokens: linear / mlp act on each token's F (labels per token when they are (B, T));
- (C, H, W) feature maps: conv uses kxk 'same' convolutions, labels broadcast as extra channels;
  linear is one such convolution.

The last layer of every synthetic-gradient model starts at zero (weights and bias), so step 0 sends
no gradient, as in the paper. A synthesizer predicts the *per-sample* gradient d l_b / d h_b; the
runtime divides by the batch size to get dL/dh of the batch-mean loss.
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import SpecError, did_you_mean
from .spec import SyntheticGradientConfig, SyntheticInputConfig

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

    `num_classes` > 0 concatenates the one-hot context (labels) to the input.
    """

    def __init__(self, kind: str, shape, out_shape, num_classes: int, cfg, flat: bool = False):
        super().__init__()
        self.kind, self.shape, self.out_shape, self.num_classes = kind, tuple(shape), tuple(out_shape), num_classes
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

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b = h.shape[0]
        if self.mode == "map":
            if self.num_classes:
                # (B, K) labels -> (B, K, H, W) extra channels
                ctx = context.to(h.dtype)[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
                h = torch.cat([h, ctx], dim=1)
            return self.net(h)
        if self.mode == "token":
            t = h.shape[1]
            x = h.reshape(b * t, -1)  # (B*T, F)
            if self.num_classes:
                ctx = context.to(h.dtype)
                ctx = ctx.reshape(b * t, -1) if ctx.dim() == 3 else ctx.repeat_interleave(t, dim=0)
                x = torch.cat([x, ctx], dim=1)
            return self.net(x).reshape(b, t, -1)
        x = h.reshape(b, -1)
        if self.num_classes:
            ctx = context.to(h.dtype).reshape(b, -1)
            x = torch.cat([x, ctx], dim=1)
        return self.net(x).reshape(b, *self.out_shape)


def _import_class(path: str, where: str):
    """The user's class named 'package.module:ClassName' (load_spec has refused it unless imports are allowed)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise SpecError(f"{where}: synthesizer {path!r} is not of the form 'package.module:ClassName'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(f"{where}: cannot import synthesizer module {module_name!r}: {e}") from None
    except Exception as e:  # the module's own code raised while importing
        raise SpecError(
            f"{where}: importing synthesizer module {module_name!r} raised {type(e).__name__}: {e}"
        ) from None
    if not hasattr(module, attr):
        raise SpecError(
            f"{where}: module {module_name!r} has no class {attr!r}"
            f"{did_you_mean(attr, [n for n in vars(module) if not n.startswith('_')])}."
        )
    cls = getattr(module, attr)
    if not callable(cls):
        raise SpecError(f"{where}: synthesizer {path!r} is a {type(cls).__name__}, not a class.")
    return cls


def _built(module, path: str, shape, where: str) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise SpecError(
            f"{where}: synthesizer {path}{tuple(shape)} returned a {type(module).__name__}, not a torch.nn.Module."
        )
    return module


def build_synthetic_gradient(
    cfg: SyntheticGradientConfig, shape: tuple[int, ...], num_classes: int, where: str
) -> nn.Module:
    """A synthetic-gradient model for one boundary tensor of per-sample shape `shape`."""
    ctx = num_classes if cfg.condition_on_labels else 0
    if ":" in cfg.model:
        cls = _import_class(cfg.model, where)
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
    try:
        synth = Synthesizer(cfg.model, shape, shape, ctx, cfg)
    except ValueError as e:
        raise SpecError(f"{where}: {e}; use `model: mlp` or `model: linear` for this cut.") from None
    synth.zero_last_layer()
    return synth


def build_synthetic_input(cfg: SyntheticInputConfig, in_shape: tuple[int, ...], out_shape: tuple[int, ...], where):
    """A synthetic-input model I(x) from the program input's per-sample shape to the boundary tensor's."""
    if ":" in cfg.model:
        cls = _import_class(cfg.model, where)
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
        cls = _import_class(cfg.head, where)
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
