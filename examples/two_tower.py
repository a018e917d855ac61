"""Two towers on Fashion-MNIST: one reads the top half of the image, the other the bottom half, and a head
joins them. Cut after each tower, the stages form a DAG (top -> head, bottom -> head) rather than a chain:
neither tower reads the other, so on two workers they run at the same time (README, "Parallel branches")."""

import torch
import torch.nn as nn


class Tower(nn.Module):
    """An MLP on rows [first, first + rows) of a 28 x 28 image given as (B, 784) or (B, 1, 28, 28)."""

    def __init__(self, first: int, rows: int = 14, hidden: int = 256, depth: int = 3):
        super().__init__()
        self.start, self.stop = first * 28, (first + rows) * 28
        layers, width = [], rows * 28
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x.flatten(1)[:, self.start : self.stop])  # (B, rows * 28) -> (B, hidden)


class TwoTower(nn.Module):
    def __init__(self, hidden: int = 256, depth: int = 3, classes: int = 10):
        super().__init__()
        self.top = Tower(0, hidden=hidden, depth=depth)
        self.bottom = Tower(14, hidden=hidden, depth=depth)
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        # each tower slices the input itself, so that neither reads a value the other computed
        top = self.top(x)  # (B, hidden)
        bottom = self.bottom(x)  # (B, hidden)
        return self.head(torch.cat([top, bottom], dim=1))  # (B, classes)


def build_model(hidden: int = 256, depth: int = 3) -> TwoTower:
    return TwoTower(hidden=hidden, depth=depth)
