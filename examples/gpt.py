"""A GPT-style character model, written the way GPT code usually is (nanoGPT's shape), not for tracing.

idx (B, T) int64 token ids [, targets (B, T) int64] -> (logits (B, T, vocab), loss or None)

What torch.fx cannot trace and torch.export can: the sequence-length assert, the branch on the optional
`targets`, and the `(logits, loss)` return with the loss computed inside the model. The token embedding
is tied to the output head (one tensor, used by the first and the last stage when cut between blocks).
Dropout is an nn.Dropout module everywhere, so the exported graph follows the stage's train/eval mode.

Run `python examples/gpt.py --data PATH/input.txt` to train it decoupled (cDNI) on tiny Shakespeare with
dnicompile's training loop and a task of its own (`ShakespeareWindows`); `train_shakespeare()` is the same
from Python.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dnicompile.train.loop import FitOptions, Task, fit


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 65  # the distinct characters of tiny Shakespeare
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        # causal mask: position i sees positions j <= i
        mask = torch.tril(torch.ones(config.block_size, config.block_size))
        self.register_buffer("bias", mask.view(1, 1, config.block_size, config.block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, embedding width
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one tensor, two uses
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of the residual projections (GPT-2)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        b, t = idx.size()
        assert t <= self.config.block_size, (
            f"Cannot forward sequence of length {t}, block size is {self.config.block_size}"
        )
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, vocab)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # (B, 1, vocab): only the last position is needed
            loss = None
        return logits, loss


def build_model(
    vocab_size: int = 65,
    block_size: int = 64,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 64,
    dropout: float = 0.0,
    bias: bool = True,
) -> GPT:
    config = GPTConfig(block_size, vocab_size, n_layer, n_head, n_embd, dropout, bias)
    return GPT(config)


# ----------------------------------------------------------------------------- tiny Shakespeare


class CharData:
    """Characters of a text file as token ids; the first 90% train, the rest validation."""

    def __init__(self, path: str | Path):
        text = Path(path).read_text()
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        n = int(0.9 * len(data))
        self.train, self.val = data[:n], data[n:]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator):
        data = self.train if split == "train" else self.val
        ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
        x = torch.stack([data[i : i + block_size] for i in ix.tolist()])  # (B, T)
        y = torch.stack([data[i + 1 : i + 1 + block_size] for i in ix.tolist()])  # (B, T), shifted by one
        return x, y


class ShakespeareWindows(Task):
    """nanoGPT's batches as a task of dnicompile's training loop: random windows of the training text, the loss
    on every step kept in `train_losses`, and the validation loss (the program in eval mode, on fixed batches)
    at each evaluation."""

    name = "shakespeare"
    rate_key = "tokens_per_s"

    def __init__(self, data: CharData, batch_size: int, block_size: int, seed: int, eval_batches: int = 4):
        self.data, self.batch_size, self.block_size = data, batch_size, block_size
        self.generator = torch.Generator().manual_seed(seed)
        self.val = [data.batch("val", batch_size, block_size, self.generator) for _ in range(eval_batches)]
        self.train_losses: list[float] = []
        self.val_loss: float | None = None

    def next(self):
        x, y = self.data.batch("train", self.batch_size, self.block_size, self.generator)
        return x.to(self.device), y.to(self.device)

    def step(self, program, batch):
        return program.train_step(*batch)

    def count(self, batch) -> int:
        return batch[0].numel()

    def measure(self, result, batch) -> dict:
        self.train_losses.append(result.loss)
        return {}

    def status(self, rate: float) -> str:
        return f"loss {self.train_losses[-1]:.3f}"

    @torch.no_grad()
    def validation_loss(self, program) -> float:
        program.eval()
        out = sum(float(program(x, y)[1]) for x, y in self.val) / len(self.val)
        program.train()
        return out

    def evaluate(self, program, step: int):
        self.val_loss = self.validation_loss(program)
        return {"val_loss": self.val_loss}, f"step {step:>6}: validation loss {self.val_loss:.4f}"

    def summary(self) -> dict:
        return {"val_loss": self.val_loss}


def train_shakespeare(
    data_path: str | Path,
    spec: str | Path | dict | None = None,
    steps: int = 200,
    batch_size: int = 16,
    seed: int = 0,
    eval_batches: int = 4,
    log=print,
) -> dict:
    """Train the GPT decoupled on tiny Shakespeare with dnicompile's training loop; returns the losses seen.

    `spec` defaults to specs/gpt_cdni.yaml next to this file. The validation loss is measured with the
    model itself (eval mode) before and after training.
    """
    from rich.console import Console

    from dnicompile import compile_decoupled, load_spec

    spec = load_spec(spec or Path(__file__).resolve().parent.parent / "specs" / "gpt_cdni.yaml")
    torch.manual_seed(seed)
    data = CharData(data_path)
    model = build_model(**{**spec.model_args, "vocab_size": data.vocab_size})
    program = compile_decoupled(model, spec)
    program.build_runtime()  # its synthesizer drawn right after the model, as this example always has
    task = ShakespeareWindows(data, batch_size, model.config.block_size, seed, eval_batches)
    val_start = task.validation_loss(program)
    options = FitOptions(steps=steps, batch_size=batch_size, eval_every=steps, seed=seed, log_every=50)
    summary = fit(program, task, options, Console(highlight=False) if log else None)
    history = {"val_start": val_start, "train": task.train_losses, "val_end": task.val_loss}
    history["seconds"] = summary["elapsed_s"]
    if log:
        log(f"validation loss {history['val_start']:.3f} -> {history['val_end']:.3f} in {history['seconds']:.1f}s")
    return history


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Train the GPT decoupled (cDNI) on tiny Shakespeare.")
    p.add_argument("--data", required=True, help="path of tiny Shakespeare's input.txt")
    p.add_argument("--spec", help="cut spec (default: specs/gpt_cdni.yaml)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (small ops run best on one)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train_shakespeare(args.data, args.spec, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
