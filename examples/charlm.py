"""A character-level language model: embedding, one LSTM layer, a linear readout over the characters."""

import torch.nn as nn


class CharLM(nn.Module):
    def __init__(self, vocab: int = 65, embed: int = 64, hidden: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.core = nn.LSTM(embed, hidden, batch_first=True)
        self.readout = nn.Linear(hidden, vocab)

    def forward(self, chars):  # chars: (B, L) int64 -> (B, L, vocab) logits of the next character
        h, _ = self.core(self.embed(chars))
        return self.readout(h)


def build_model(vocab: int = 65, embed: int = 64, hidden: int = 256) -> CharLM:
    return CharLM(vocab, embed, hidden)
