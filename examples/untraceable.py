"""Models that torch.fx cannot trace and torch.export can, each for a reason met in real code.

- `SizeBranch`: branches on an input's size (`if x.shape[-1] == 784:` to accept flat or image inputs).
- `BatchNormDropout`: batch norm and dropout (train/eval behaviour, running statistics), behind a shape assert.
- `HelperNet`: calls a helper that builds position codes with numpy from a tensor's size.

Each builds with `build_<name>()`; compile with `trace: {frontend: auto}` (the default) and dnicompile falls
back to torch.export and says why in the stage table.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class SizeBranch(nn.Module):
    """A small conv net that takes (B, 784) flat images or (B, 1, 28, 28) ones, and says which by their size."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16 * 7 * 7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 784:  # flat input: back to an image
            x = x.view(x.shape[0], 1, 28, 28)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 8, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 16, 7, 7)
        return self.head(x.flatten(1))


class BatchNormDropout(nn.Module):
    """An MLP with batch norm and dropout after every hidden layer."""

    def __init__(self, d_in: int = 32, width: int = 64, depth: int = 3, classes: int = 10, p: float = 0.2):
        super().__init__()
        dims = [d_in] + [width] * depth
        self.layers = nn.Sequential(
            *[
                nn.Sequential(nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(), nn.Dropout(p))
                for a, b in zip(dims, dims[1:])
            ]
        )
        self.head = nn.Linear(width, classes)
        self.d_in = d_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 2 and x.shape[1] == self.d_in, f"expected (B, {self.d_in}), got {tuple(x.shape)}"
        return self.head(self.layers(x))


def sinusoidal_positions(t: int, d: int) -> torch.Tensor:
    """(T, D) sinusoidal position codes, computed with numpy: the helper fx cannot follow (numpy on a traced
    size), while torch.export runs it on the example's real sizes and keeps the result as a constant."""
    pos = np.arange(t)[:, None]  # (T, 1)
    i = np.arange(d)[None, :]  # (1, D)
    angle = pos / np.power(10000.0, (2 * (i // 2)) / d)
    codes = np.where(i % 2 == 0, np.sin(angle), np.cos(angle))
    return torch.from_numpy(codes).float()


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)), (B, T, T)."""
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


class HelperNet(nn.Module):
    """Token mixing by one attention head, then an MLP; (B, T, D) -> (B, classes) from the mean token."""

    def __init__(self, d: int = 16, classes: int = 5):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + sinusoidal_positions(x.shape[1], x.shape[2])  # (B, T, D)
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, T, D)
        x = x + attention_weights(q, k) @ v  # (B, T, D)
        x = x + self.mlp(x)
        return self.head(x.mean(dim=1))  # (B, classes)


def build_size_branch() -> SizeBranch:
    return SizeBranch()


def build_bn_dropout() -> BatchNormDropout:
    return BatchNormDropout()


def build_helper() -> HelperNet:
    return HelperNet()
