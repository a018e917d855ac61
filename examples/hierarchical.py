"""Two recurrent networks on two timescales (Jaderberg et al. 2017, section 3.3).

The lower LSTM reads a character every step and predicts the next one. Every `every` steps (from step
`offset` on) the upper LSTM cell reads the lower's output and predicts the next `horizon` characters at
once. In specs/hierarchical.yaml the upper ticks on its own clock and the lower gets a synthetic gradient
for the state it sends up, instead of waiting for the upper's backward pass.
"""

import torch
import torch.nn as nn


class TwoTimescaleLM(nn.Module):
    def __init__(
        self,
        vocab: int = 65,
        embed: int = 64,
        hidden: int = 256,
        upper_hidden: int = 256,
        every: int = 4,
        offset: int = 0,
        horizon: int | None = None,
    ):
        super().__init__()
        self.every, self.offset, self.horizon, self.vocab = every, offset, horizon or every, vocab
        self.embed = nn.Embedding(vocab, embed)
        self.lower = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)
        self.upper = nn.LSTMCell(hidden, upper_hidden)
        self.upper_head = nn.Linear(upper_hidden, self.horizon * vocab)

    def forward(self, chars):
        """(B, L) characters -> (next-character logits (B, L, vocab), upper predictions (B, ticks, horizon, vocab))."""
        h, _ = self.lower(self.embed(chars))
        state, preds = None, []
        for t in range(chars.shape[1]):
            if t >= self.offset and (t - self.offset) % self.every == 0:
                state = self.upper(h[:, t], state)
                preds.append(self.upper_head(state[0]).reshape(chars.shape[0], self.horizon, self.vocab))
        upper = torch.stack(preds, 1) if preds else h.new_zeros(chars.shape[0], 0, self.horizon, self.vocab)
        return self.head(h), upper


def build_model(
    vocab: int = 65,
    embed: int = 64,
    hidden: int = 256,
    upper_hidden: int = 256,
    every: int = 4,
    offset: int = 0,
    horizon: int | None = None,
) -> TwoTimescaleLM:
    return TwoTimescaleLM(vocab, embed, hidden, upper_hidden, every, offset, horizon)
