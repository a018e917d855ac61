"""An LSTM for the Copy and Repeat-Copy tasks: it reads bit vectors and writes them back.

Copy: 8 bits + a delimiter in, 8 bits out. Repeat-Copy: 8 bits + delimiter + repeat count in, 8 bits +
an end marker out (specs/copy_*.yaml set `model_args` for each).
"""

import torch.nn as nn


class CopyRNN(nn.Module):
    def __init__(self, inputs: int = 9, outputs: int = 8, hidden: int = 128):
        super().__init__()
        self.core = nn.LSTM(inputs, hidden, batch_first=True)
        self.readout = nn.Linear(hidden, outputs)
        # forget-gate bias 1 (gates are ordered input, forget, cell, output)
        for name, p in self.core.named_parameters():
            if name.startswith("bias_ih"):
                p.data[hidden : 2 * hidden] = 1.0

    def forward(self, x):  # x: (B, L, inputs) -> (B, L, outputs) logits
        h, _ = self.core(x)
        return self.readout(h)


def build_model(inputs: int = 9, outputs: int = 8, hidden: int = 128) -> CopyRNN:
    return CopyRNN(inputs, outputs, hidden)
