"""A Fashion-MNIST classifier: 4 hidden layers of 256 units with batch norm and ReLU."""

import torch.nn as nn


class MLP(nn.Module):
    def __init__(self, in_features: int = 784, hidden: int = 256, depth: int = 4, classes: int = 10):
        super().__init__()
        layers = []
        width = in_features
        for _ in range(depth):
            layers.append(nn.Sequential(nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()))
            width = hidden
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = x.flatten(1)  # (B, 1, 28, 28) or (B, 784) -> (B, 784)
        return self.head(self.layers(x))


def build_model(depth: int = 4, hidden: int = 256) -> MLP:
    return MLP(hidden=hidden, depth=depth)
