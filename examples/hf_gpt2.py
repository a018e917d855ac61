"""GPT-2 from Hugging Face `transformers`, unmodified, compiled by dnicompile and trained decoupled on the
characters of tiny Shakespeare.

The model is `transformers.GPT2LMHeadModel` built from a small `GPT2Config` (random weights: nothing is
downloaded; `--config config.json` takes your own). What the compiler meets in it: forward() takes keyword
arguments (`input_ids`, `labels`, ...) and `**kwargs` and is wrapped by a decorator, so torch.fx cannot trace
it and `trace: {frontend: auto}` exports it with torch.export; `use_cache` is fixed to False (a training
program keeps no key/value cache); it builds its causal mask in Python from the input's shape (made from sizes and
constants only, the mask is recomputed in each stage that reads it rather than sent across the cuts); it returns a `CausalLMOutputWithCrossAttentions` with the loss it computes
itself (`loss: {from_output: loss, labels: labels}`), and the program returns the same type; and the token
embedding is tied to the output head (one tensor, used by the first and the last stage).

Labels follow the Hugging Face convention: `labels` is `input_ids` itself, and the model shifts it inside to
score every position on the next character. The decoupled spec, specs/hf_gpt2_local.yaml, cuts between blocks 1
and 2 with a local loss: the first stage is trained by a small head on the cut and never waits for the second.
(A synthetic gradient at the same cut does not learn here: conditioned on these unshifted labels it knows
nothing the stage does not, and with it the model stays at the unigram loss, about 3.35 nats.)

    python examples/hf_gpt2.py --data PATH/input.txt [--spec specs/hf_gpt2_local.yaml] [--steps 500] [--out DIR]
    dnicompile examples/hf_gpt2.py --spec specs/hf_gpt2_local.yaml          # the stage table only

`train_shakespeare()` is the same from Python. With `--out DIR` the run writes what `dnicompile --train` writes
(metrics.jsonl, curves.png, model.pt: the model's state_dict, checkpoint.pt, ckpt-<step>.pt, summary.json) and
`hf_model/`, the trained model in `save_pretrained` layout: `GPT2LMHeadModel.from_pretrained(DIR / "hf_model")`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from dnicompile.train.loop import FitOptions, Task, fit

ROOT = Path(__file__).resolve().parent.parent


def build_model(
    vocab_size: int = 65,
    n_positions: int = 64,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    dropout: float = 0.0,
    config: str | Path | None = None,
):
    """A GPT2LMHeadModel with random weights: from a small GPT2Config, or from `config` (a config.json, or a folder
    holding one; read from disk only), its vocabulary set to `vocab_size` either way."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if config is not None:
        cfg = GPT2Config.from_pretrained(str(config), local_files_only=True)
        cfg.vocab_size = vocab_size
        cfg.bos_token_id = cfg.eos_token_id = 0
    else:
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_positions=n_positions,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            bos_token_id=0,  # GPT-2's 50256 is outside a character vocabulary
            eos_token_id=0,
        )
    return GPT2LMHeadModel(cfg)


# ----------------------------------------------------------------------------- tiny Shakespeare


class CharText:
    """The characters of a text file as token ids; the first 90% train, the rest validation."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no such file. Pass --data PATH to tiny Shakespeare's input.txt (1.1 MB, the char-rnn corpus: "
                "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt) or any "
                "plain-text file."
            )
        text = path.read_text()
        self.chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
        n = int(0.9 * len(data))
        self.train, self.val = data[:n], data[n:]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def windows(self, split: str, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """(batch_size, length) random windows of the split: input_ids, and labels too (the model shifts them)."""
        data = self.train if split == "train" else self.val
        ix = torch.randint(len(data) - length, (batch_size,), generator=generator)
        return torch.stack([data[i : i + length] for i in ix.tolist()])


class ShakespeareLM(Task):
    """Random windows of the training text as a task of dnicompile's training loop; each step is
    `program.train_step(input_ids, labels)` with labels = input_ids. Evaluation: the model's own loss on fixed
    validation windows (the program in eval mode), in nats and in bits per character."""

    name = "shakespeare"
    rate_key = "tokens_per_s"

    def __init__(self, data: CharText, batch_size: int, length: int, seed: int, eval_batches: int = 8):
        self.data, self.batch_size, self.length = data, batch_size, length
        self.generator = torch.Generator().manual_seed(seed)
        val_gen = torch.Generator().manual_seed(seed + 1)
        self.val = [data.windows("val", batch_size, length, val_gen) for _ in range(eval_batches)]
        self.train_losses: list[float] = []
        self.val_loss: float | None = None

    def next(self):
        x = self.data.windows("train", self.batch_size, self.length, self.generator).to(self.device)
        return x, x

    def step(self, program, batch):
        return program.train_step(*batch)

    def count(self, batch) -> int:
        return batch[0].numel()

    def measure(self, result, batch) -> dict:
        self.train_losses.append(result.loss)
        return {"bpc": result.loss / math.log(2)}

    def status(self, rate: float) -> str:
        return f"loss {self.train_losses[-1]:.3f}, {rate:,.0f} chars/s"

    @torch.no_grad()
    def validation_loss(self, program) -> float:
        program.eval()
        device = next(iter(program.parameters())).device
        total = sum(float(program(input_ids=x.to(device), labels=x.to(device)).loss) for x in self.val)
        program.train()
        return total / len(self.val)

    def evaluate(self, program, step: int):
        self.val_loss = self.validation_loss(program)
        bpc = self.val_loss / math.log(2)
        line = f"step {step:>6}: validation loss {self.val_loss:.4f} ({bpc:.3f} bits per character)"
        return {"val_loss": self.val_loss, "val_bpc": bpc}, line

    def summary(self) -> dict:
        bpc = None if self.val_loss is None else self.val_loss / math.log(2)
        return {"val_loss": self.val_loss, "val_bpc": bpc}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------- training


def train_shakespeare(
    data_path: str | Path,
    spec: str | Path | dict | None = None,
    steps: int = 500,
    batch_size: int | None = None,
    seed: int = 0,
    eval_every: int | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: str | Path | None = None,
    config: str | Path | None = None,
    log=print,
) -> dict:
    """Compile GPT-2 with `spec` (default specs/hf_gpt2_local.yaml) and train it on the text at `data_path` with
    dnicompile's training loop; returns the validation loss before and after, the training losses and the
    summary of the run. The sequence length is the spec's `inputs.input_ids` shape; the batch size its
    `train.batch_size` unless given."""
    from rich.console import Console

    from dnicompile import compile_decoupled, load_spec
    from dnicompile.files import write_atomic
    from dnicompile.train.loop import load_run_checkpoint
    from dnicompile.train.outputs import check_outputs, plot_recurrent

    spec = load_spec(spec or ROOT / "specs" / "hf_gpt2_local.yaml")
    if "input_ids" not in spec.inputs:
        raise ValueError(f"{spec.where('inputs')}: the spec must list `input_ids` (and `labels`) under inputs.")
    length = spec.inputs["input_ids"].shape[1]
    batch_size = batch_size or spec.train.batch_size
    console = Console(highlight=False, quiet=log is None)
    args = SimpleNamespace(out=out, metrics=None, overwrite=overwrite, resume=resume)
    out_dir, metrics_path = check_outputs(args)
    data = CharText(data_path)
    torch.manual_seed(seed)
    model = build_model(**{**spec.model_args, "vocab_size": data.vocab_size, "config": config})
    if length > model.config.n_positions:
        raise ValueError(f"inputs.input_ids: {length} tokens, but the model has {model.config.n_positions} positions")
    program = compile_decoupled(model, spec)
    if log:
        console.print(program.summary())
    task = ShakespeareLM(data, batch_size, length, seed)
    val_start = task.validation_loss(program)
    options = FitOptions(
        steps=steps,
        batch_size=batch_size,
        eval_every=eval_every or max(steps // 4, 1),
        seed=seed,
        metrics_path=metrics_path,
        out_dir=out_dir,
        checkpoint_every=spec.train.checkpoint_every if out_dir else None,
        keep_checkpoints=spec.train.keep_checkpoints,
    )
    if resume is not None:
        options.resume = load_run_checkpoint(Path(resume), say=console.print)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    console.print(
        f"training GPT2LMHeadModel ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(program.stages)} stages) on {data_path}: {steps} steps of {batch_size} x {length} characters"
    )
    summary = fit(program, task, options, console)
    history = {
        "val_start": val_start,
        "val_end": task.val_loss,
        "train": task.train_losses,
        "seconds": summary["elapsed_s"],
        "summary": {k: v for k, v in summary.items() if k != "rows"},
    }
    if out_dir is not None:
        state = {k: v.detach().cpu() for k, v in program.state_dict().items()}
        write_atomic(out_dir / "model.pt", lambda p: torch.save(state, p))
        ckpt = {"model": state, "runtime": program.runtime.state_dict(), "step": summary["steps_done"]}
        write_atomic(out_dir / "checkpoint.pt", lambda p: torch.save(ckpt, p))
        synthetic = any(c.synthetic_gradient is not None for c in spec.cuts)
        plot_recurrent(summary["rows"], out_dir / "curves.png", f"GPT-2 ({spec.where()})", synthetic)
        text = json.dumps(history["summary"], indent=2) + "\n"
        write_atomic(out_dir / "summary.json", lambda p: p.write_text(text))
        model.save_pretrained(out_dir / "hf_model")
        console.print(f"wrote model.pt, checkpoint.pt, curves.png, summary.json, metrics.jsonl, hf_model/ to {out_dir}")
    if task.val_loss is not None:
        console.print(
            f"validation loss {val_start:.3f} -> {task.val_loss:.3f} ({task.val_loss / math.log(2):.3f} bits per "
            f"character) in {summary['steps_done']} steps, {summary['elapsed_s']:.1f}s"
        )
    return history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train a small Hugging Face GPT-2 decoupled on tiny Shakespeare.")
    p.add_argument("--data", required=True, help="path of tiny Shakespeare's input.txt (or any text file)")
    p.add_argument("--spec", help="cut spec (default: specs/hf_gpt2_local.yaml)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, help="default: the spec's train.batch_size")
    p.add_argument("--eval-every", type=int, help="default: a quarter of the steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="a GPT2Config config.json (or its folder) instead of the spec's model_args")
    p.add_argument("--out", help="folder for metrics, curves, model.pt, checkpoints and hf_model/")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--resume", help="continue the run in this folder from its newest checkpoint")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: small ops run best on one)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dnicompile.errors import DNIError

    try:
        train_shakespeare(
            args.data,
            args.spec,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            eval_every=args.eval_every,
            out=args.out,
            overwrite=args.overwrite,
            resume=args.resume,
            config=args.config,
        )
    except (DNIError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
