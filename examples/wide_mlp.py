"""The throughput benchmark's model: 8 fully connected layers of width 1024 on Fashion-MNIST.

Every hidden layer is Linear + ReLU, the first 784 -> 1024 and the other seven 1024 -> 1024, then a
1024 -> 10 head. A cut after `layers.3` (specs/wide_mlp_*.yaml) splits it into two stages of four layers
each: nearly equal cost (the first stage's input layer is 784 wide, the second stage carries the head).
No batch norm, so a stage's cost is its matrix products and nothing else. He (Kaiming normal) initial
weights and zero biases: with PyTorch's default init the signal shrinks through the eight ReLU layers
and early training is slow."""

import torch.nn as nn


class WideMLP(nn.Module):
    def __init__(self, in_features: int = 784, width: int = 1024, depth: int = 8, classes: int = 10):
        super().__init__()
        layers = []
        d = in_features
        for _ in range(depth):
            layers.append(nn.Sequential(nn.Linear(d, width), nn.ReLU()))
            d = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = x.flatten(1)  # (B, 1, 28, 28) or (B, 784) -> (B, 784)
        return self.head(self.layers(x))


def build_model(depth: int = 8, width: int = 1024) -> WideMLP:
    return WideMLP(width=width, depth=depth)
