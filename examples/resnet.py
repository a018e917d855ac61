"""A small ResNet for Fashion-MNIST: a conv stem, 3 residual blocks, global average pool, linear head.

(B, 1, 28, 28) -> stem (B, 16, 28, 28) -> blocks (B, 16, 28, 28) -> (B, 32, 14, 14) -> (B, 64, 7, 7)
-> pool (B, 64) -> head (B, 10)

Each block adds its input (the skip tensor, projected by a 1x1 conv when the shape changes) to the
output of two 3x3 convs. A cut in the middle of a block, e.g. after `blocks.0.bn1`, leaves the skip
tensor live across it: it becomes a boundary tensor of that cut next to the branch's activation.
"""

import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """Basic residual block: relu(x + bn2(conv2(relu(bn1(conv1(x)))))), with a projection when shapes differ."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))  # (B, C_out, H/stride, W/stride)
        h = self.bn2(self.conv2(h))  # (B, C_out, H/stride, W/stride)
        return F.relu(self.shortcut(x) + h)  # the skip tensor x is used only here, after the branch


class ResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks = []
        c_in = widths[0]
        for i, c_out in enumerate(widths):
            blocks.append(Block(c_in, c_out, stride=1 if i == 0 else 2))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x):
        x = self.stem(x)  # (B, 1, 28, 28) -> (B, 16, 28, 28)
        x = self.blocks(x)  # -> (B, 64, 7, 7)
        x = x.mean(dim=(2, 3))  # global average pool -> (B, 64)
        return self.head(x)  # (B, 10)


def build_model(widths: tuple[int, ...] = (16, 32, 64), classes: int = 10) -> ResNet:
    return ResNet(widths=tuple(widths), classes=classes)
