"""Hugging Face `transformers` families compiled unmodified (issue 18; BENCHMARKS.md, "Transformers families").

For each family a tiny model is built from its config (a few blocks, width 16, fixed seed, random weights:
nothing is downloaded), compiled with `compile_decoupled` (`trace: {frontend: auto}`: torch.fx, and torch.export
where fx fails; the fx front end's own result is recorded too) with exact cuts between its blocks, and checked
against eager PyTorch on the same model:

1. forward: the program's output equals the model's (`assert_close` on every tensor of the output) and is of
   the model's own type (its `ModelOutput` class), in train and eval mode, at the traced batch size (4) and at
   another one (3), unless torch.export fixed the batch (the stage table then says so: "n/a");
2. gradients: after one backward of the model's own loss, every parameter's gradient through the exact cuts
   equals eager backprop's;
3. cDNI: the same cuts with synthetic gradients (`condition_on_labels` where the model takes labels, unconditioned
   DNI where it takes none) run as many `train_step`s as there are stages, batches of 4 and 3 taking turns: every
   loss finite, the last stage's parameters changed by the first step and every stage's by the last (a
   synthesizer starts at zero, and the one at cut k learns from what the one behind it sends back). Where it
   fails, the same cuts unconditioned are run too, to tell the conditioning from the rest. Each synthesizer's
   tensor and gradient shapes are recorded, and how the labels joined its tensor (per token, per sample, per
   batch: [Note: label context] in dnicompile/synthesizers.py); the table names the tensors that did not read
   them per token where others did (an encoder's, beside a decoder's), and those read per batch.

Dropout is off in every config, so train-mode outputs are deterministic. The inputs are the model's keyword
inputs (input_ids, attention_mask with padding, labels, pixel_values, input_features, decoder_input_ids...), the
loss is the model's own (`loss: {from_output: loss}`).

Run from the repository root:
    python benchmarks/hf_families.py [--only gpt2,bert] [--json benchmarks/results/hf_families.json]

tests/test_hf_families.py imports FAMILIES and the checks from here.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dnicompile import compile_decoupled  # noqa: E402

V = 64  # vocabulary of the text models
B, B2 = 4, 3  # the traced batch and another one
T, T_DEC = 8, 6  # encoder (or only) sequence length, decoder sequence length (encoder-decoder models)
IMAGE = 16  # image side of the vision models
CLASSES = 3


# ----------------------------------------------------------------------------- the families


@dataclass
class Family:
    """A transformers model class, a tiny config of it, where to cut and how to feed it.

    `inputs(batch, generator)` gives forward()'s keyword inputs (labels among them); `specs` describes them for
    the spec's `inputs:` (shape at batch B). `constants` are forward() arguments both the program (as
    `trace: {concrete_args}`) and the eager reference are given.
    """

    name: str
    kind: str
    cls: str
    build: Callable[[], torch.nn.Module]
    cuts: list[str]
    inputs: Callable[[int, torch.Generator], dict[str, torch.Tensor]]
    labels: str | None = "labels"  # the input cDNI is conditioned on (None: unconditioned DNI)
    shift_labels: int = 0  # causal LMs shift labels = input_ids inside their loss
    constants: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def input_specs(self) -> dict[str, dict]:
        specs = {}
        for name, t in self.inputs(B, torch.Generator().manual_seed(0)).items():
            entry: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            if not t.is_floating_point():
                entry["low"], entry["high"] = int(t.min()), int(t.max()) + 1
                if name.endswith("attention_mask"):
                    entry["low"] = 1  # tracing on an all-ones mask; the checks pad
                if name == "labels":
                    entry["low"] = max(entry["low"], 0)  # not -100: the ignored positions are the checks' business
            specs[name] = entry
        return specs


def _tf():
    import transformers

    return transformers


def _ids(batch: int, g: torch.Generator, length: int = T) -> torch.Tensor:
    return torch.randint(3, V, (batch, length), generator=g)


def _padded_mask(batch: int, length: int = T) -> torch.Tensor:
    """1 for tokens, 0 for padding: every other row ends with two padding positions."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1::2, -2:] = 0
    return mask


def _causal_lm(batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = _ids(batch, g)
    return {"input_ids": ids, "attention_mask": _padded_mask(batch), "labels": ids.clone()}


def _classify_text(batch: int, g: torch.Generator, segments: bool = False) -> dict[str, torch.Tensor]:
    out = {"input_ids": _ids(batch, g), "attention_mask": _padded_mask(batch)}
    if segments:  # two segments: the first half 0, the second 1
        out["token_type_ids"] = (torch.arange(T) >= T // 2).long().expand(batch, T)
    out["labels"] = torch.randint(0, CLASSES, (batch,), generator=g)
    return out


def _masked_lm(batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = _ids(batch, g)
    labels = torch.full_like(ids, -100)  # score the masked positions only, as MLM training does
    labels[:, 1::3] = ids[:, 1::3]
    ids = ids.clone()
    ids[:, 1::3] = 2  # the <mask> token
    return {"input_ids": ids, "attention_mask": _padded_mask(batch), "labels": labels}


def _seq2seq(batch: int, g: torch.Generator, decoder_inputs: bool = False) -> dict[str, torch.Tensor]:
    """Source tokens with padding and target tokens (T_DEC of them); with `decoder_inputs` the decoder's inputs
    are given (the targets shifted right behind a start token, and a padding mask), else the model makes them
    from the labels."""
    out = {"input_ids": _ids(batch, g), "attention_mask": _padded_mask(batch)}
    labels = _ids(batch, g, T_DEC)
    if decoder_inputs:
        out["decoder_input_ids"] = torch.cat([torch.full((batch, 1), 2), labels[:, :-1]], dim=1)
        out["decoder_attention_mask"] = _padded_mask(batch, T_DEC)
    out["labels"] = labels
    return out


def _image(batch: int, g: torch.Generator, labels: bool = True) -> dict[str, torch.Tensor]:
    out = {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=g)}
    if labels:
        out["labels"] = torch.randint(0, CLASSES, (batch,), generator=g)
    return out


def _speech(batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_features": torch.randn(batch, 8, 16, generator=g), "labels": _ids(batch, g, T_DEC)}


def _image_text(batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(batch, g), "pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=g)}


def _decoder_cfg(cls: str, **extra) -> torch.nn.Module:
    tf = _tf()
    config = getattr(tf, cls.replace("ForCausalLM", "Config"))(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2 * T,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    return getattr(tf, cls)(config)


def _gpt2():
    tf = _tf()
    cfg = tf.GPT2Config(
        vocab_size=V, n_positions=2 * T, n_layer=3, n_head=2, n_embd=16, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return tf.GPT2LMHeadModel(cfg)


def _bert():
    tf = _tf()
    cfg = tf.BertConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=2 * T, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=CLASSES,
    )  # fmt: skip
    return tf.BertForSequenceClassification(cfg)


def _roberta():
    tf = _tf()
    cfg = tf.RobertaConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=2 * T + 2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return tf.RobertaForMaskedLM(cfg)


def _distilbert():
    tf = _tf()
    cfg = tf.DistilBertConfig(
        vocab_size=V, dim=16, n_layers=3, n_heads=2, hidden_dim=32, max_position_embeddings=2 * T,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=CLASSES,
    )  # fmt: skip
    return tf.DistilBertForSequenceClassification(cfg)


def _t5():
    tf = _tf()
    cfg = tf.T5Config(
        vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    )  # fmt: skip
    return tf.T5ForConditionalGeneration(cfg)


def _bart():
    tf = _tf()
    cfg = tf.BartConfig(
        vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=2 * T,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
    )  # fmt: skip
    return tf.BartForConditionalGeneration(cfg)


def _whisper():
    tf = _tf()
    cfg = tf.WhisperConfig(
        vocab_size=V, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=8,
        max_target_positions=2 * T, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    return tf.WhisperForConditionalGeneration(cfg)


def _vit():
    tf = _tf()
    cfg = tf.ViTConfig(
        image_size=IMAGE, patch_size=4, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=CLASSES,
    )  # fmt: skip
    return tf.ViTForImageClassification(cfg)


def _swin():
    tf = _tf()
    cfg = tf.SwinConfig(
        image_size=IMAGE, patch_size=2, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 2, 2], window_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0, num_labels=CLASSES,
    )  # fmt: skip
    return tf.SwinForImageClassification(cfg)


def _convnext():
    tf = _tf()
    cfg = tf.ConvNextConfig(
        num_stages=3, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], image_size=IMAGE, drop_path_rate=0.0,
        num_labels=CLASSES,
    )  # fmt: skip
    return tf.ConvNextForImageClassification(cfg)


def _clip():
    tf = _tf()
    text = dict(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=2 * T, projection_dim=8, attention_dropout=0.0, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    vision = dict(
        image_size=IMAGE, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, projection_dim=8, attention_dropout=0.0,
    )  # fmt: skip
    return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))


FAMILIES: list[Family] = [
    Family("gpt2", "decoder-only", "GPT2LMHeadModel", _gpt2, ["transformer.h.0", "transformer.h.1"], _causal_lm,
           shift_labels=1, note="tied embedding / head"),
    Family("llama", "decoder-only", "LlamaForCausalLM", lambda: _decoder_cfg("LlamaForCausalLM"),
           ["model.layers.0", "model.layers.1"], _causal_lm, shift_labels=1, note="RoPE, grouped-query attention"),
    Family("mistral", "decoder-only", "MistralForCausalLM",
           lambda: _decoder_cfg("MistralForCausalLM", sliding_window=4), ["model.layers.0", "model.layers.1"],
           _causal_lm, shift_labels=1, note="sliding-window attention (window 4 < 8 tokens)"),
    Family("qwen2", "decoder-only", "Qwen2ForCausalLM", lambda: _decoder_cfg("Qwen2ForCausalLM"),
           ["model.layers.0", "model.layers.1"], _causal_lm, shift_labels=1, note="QKV bias"),
    Family("bert", "encoder-only", "BertForSequenceClassification", _bert,
           ["bert.encoder.layer.0", "bert.encoder.layer.1"], lambda b, g: _classify_text(b, g, segments=True),
           note="padding mask, token_type_ids"),
    Family("roberta", "encoder-only", "RobertaForMaskedLM", _roberta,
           ["roberta.encoder.layer.0", "roberta.encoder.layer.1"], _masked_lm,
           note="masked LM, labels -100 outside the masked positions"),
    Family("distilbert", "encoder-only", "DistilBertForSequenceClassification", _distilbert,
           ["distilbert.transformer.layer.0", "distilbert.transformer.layer.1"], _classify_text),
    Family("t5", "encoder-decoder", "T5ForConditionalGeneration", _t5, ["encoder.block.0", "decoder.block.0"],
           _seq2seq, note="decoder_input_ids from labels inside; relative position bias"),
    Family("bart", "encoder-decoder", "BartForConditionalGeneration", _bart,
           ["model.encoder.layers.0", "model.decoder.layers.0"], lambda b, g: _seq2seq(b, g, decoder_inputs=True),
           note="decoder_input_ids and decoder_attention_mask given"),
    Family("whisper", "speech encoder-decoder", "WhisperForConditionalGeneration", _whisper,
           ["model.encoder.layers.0", "model.decoder.layers.0"], _speech, note="input_features (mel bins x frames)"),
    Family("vit", "vision", "ViTForImageClassification", _vit, ["vit.layers.0", "vit.layers.1"], _image),
    Family("swin", "vision (hierarchical)", "SwinForImageClassification", _swin,
           ["swin.encoder.layers.0", "swin.encoder.layers.1"], _image, note="windowed attention, patch merging"),
    Family("convnext", "vision (CNN)", "ConvNextForImageClassification", _convnext,
           ["convnext.encoder.stages.0", "convnext.encoder.stages.1"], _image),
    Family("clip", "image-text (contrastive)", "CLIPModel", _clip,
           ["text_model.encoder.layers.0", "vision_model.encoder.layers.0"], _image_text, labels=None,
           constants={"return_loss": True}, note="contrastive loss, no labels: DNI unconditioned"),
]  # fmt: skip
BY_NAME = {f.name: f for f in FAMILIES}


# ----------------------------------------------------------------------------- specs and reference calls


def spec_for(family: Family, frontend: str = "auto", synthetic: bool = False) -> dict:
    """The spec: the family's inputs, its cuts (exact, or cDNI with `synthetic`), the model's own loss."""
    loss: dict[str, Any] = {"from_output": "loss"}
    if family.labels:
        loss["labels"] = family.labels
    if family.shift_labels:
        loss["shift_labels"] = family.shift_labels
    cuts = []
    for after in family.cuts:
        cut: dict[str, Any] = {"after": after}
        if synthetic:
            cut["synthetic_gradient"] = {
                "model": "linear",
                "condition_on_labels": family.labels is not None,
                "optimizer": {"name": "Adam", "lr": 1e-3},
            }
        cuts.append(cut)
    trace: dict[str, Any] = {"frontend": frontend}
    if family.constants:
        trace["concrete_args"] = dict(family.constants)
    return {
        "inputs": family.input_specs(),
        "trace": trace,
        "cuts": cuts,
        "loss": loss,
        "stages": {"default": {"optimizer": {"name": "Adam", "lr": 1e-3}}},
    }


def build(family: Family, seed: int = 0) -> torch.nn.Module:
    """The family's tiny model with the weights of `seed`, in train mode."""
    torch.manual_seed(seed)
    with _quiet():
        model = family.build()
    return model.train()


def eager(model: torch.nn.Module, family: Family, inputs: dict) -> Any:
    """The model as its user calls it, with what the program fixes: the family's constants, and `use_cache=False`
    where forward() takes it (a training program keeps no key/value cache)."""
    kwargs = dict(inputs) | family.constants
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return model(**kwargs)


def leaves(value: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors of an output with their paths: in ModelOutputs, dataclasses, dicts, tuples and lists."""
    if isinstance(value, torch.Tensor):
        return [("", value)]
    if isinstance(value, Mapping):
        items = list(value.items())
    elif is_dataclass(value) and not isinstance(value, type):
        items = [(f.name, getattr(value, f.name)) for f in fields(value)]
    elif isinstance(value, (tuple, list)):
        items = list(enumerate(value))
    else:
        return []
    return [(f"{k}.{p}" if p else str(k), t) for k, v in items for p, t in leaves(v)]


@contextlib.contextmanager
def _quiet():
    """transformers prints config warnings (token ids, attention implementation): keep the table readable."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


# ----------------------------------------------------------------------------- the checks


def compile_exact(family: Family, frontend: str = "auto", seed: int = 0, cpu: dict | None = None):
    """(model, program, seconds to compile) with exact cuts; the CPU seconds of this process go in `cpu["s"]`."""
    model = build(family, seed)
    start, start_cpu = time.perf_counter(), time.process_time()
    with _quiet():
        program = compile_decoupled(model, spec_for(family, frontend))
    if cpu is not None:
        cpu["s"] = time.process_time() - start_cpu
    return model, program, time.perf_counter() - start


def check_forward(model, program, family: Family, batch: int, seed: int = 1) -> float:
    """Assert the program's output equals the model's, of its type, in train and eval mode; return the largest
    absolute difference seen."""
    inputs = family.inputs(batch, torch.Generator().manual_seed(seed))
    worst = 0.0
    try:
        for training in (True, False):
            model.train(training)
            program.train(training)
            with torch.no_grad():
                expected, got = eager(model, family, inputs), program(**inputs)
            if type(got) is not type(expected):
                raise AssertionError(f"the program returns {type(got).__name__}, the model {type(expected).__name__}")
            e, g = dict(leaves(expected)), dict(leaves(got))
            if e.keys() != g.keys():
                raise AssertionError(f"output fields {sorted(g)} against the model's {sorted(e)}")
            for key, want in e.items():
                mode = "train" if training else "eval"
                torch.testing.assert_close(g[key], want, msg=lambda m, k=key, mo=mode: f"{k} ({mo} mode): {m}")
                if want.is_floating_point():
                    worst = max(worst, float((g[key] - want).abs().max()))
    finally:
        model.train()
        program.train()
    return worst


def check_gradients(model, program, family: Family, batch: int = B, seed: int = 2) -> int:
    """Assert one backward of the model's loss through the exact cuts gives every parameter eager backprop's
    gradient; return the number of parameters compared."""
    inputs = family.inputs(batch, torch.Generator().manual_seed(seed))
    model.zero_grad(set_to_none=True)
    eager(model, family, inputs).loss.backward()
    expected = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    program(**inputs).loss.backward()
    try:
        for name, p in model.named_parameters():
            want = expected[name]
            if want is None or p.grad is None:
                assert want is None and p.grad is None, f"{name}: a gradient on one side only"
                continue
            torch.testing.assert_close(p.grad, want, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        model.zero_grad(set_to_none=True)
    return sum(1 for g in expected.values() if g is not None)


def check_cdni(
    family: Family, frontend: str = "auto", batches: tuple[int, ...] = (B, B2), seed: int = 0, conditioned: bool = True
) -> dict:
    """Compile with synthetic-gradient cuts (label-conditioned where the family has labels and `conditioned`) and
    run `train_step`s, the batch sizes taking turns: every loss finite, the last stage's parameters changed by the
    first step and every stage's by the last. A synthesizer's last layer starts at zero and the one at cut k
    learns from the gradient the synthesizer behind it sends back, so stage k first moves at step S - 1 - k: there
    are as many steps as stages."""
    model = build(family, seed)
    spec = spec_for(family, frontend, synthetic=True)
    if not conditioned:
        for cut in spec["cuts"]:
            cut["synthetic_gradient"]["condition_on_labels"] = False
    with _quiet():
        program = compile_decoupled(model, spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    synthesized = _record_predictions(program)

    def moved() -> list[str]:
        return [
            stage.name
            for stage in program.stages
            if any(not torch.equal(model.get_parameter(n), before[n]) for n, _ in stage.named_parameters())
        ]

    losses, cosines, changed = [], [], []
    for step in range(program.num_stages):
        batch = batches[step % len(batches)]
        inputs = family.inputs(batch, torch.Generator().manual_seed(10 + step))
        result = program.train_step(*(inputs[n] for n in program.input_names))
        assert math.isfinite(result.loss), f"step {step} (batch {batch}): loss {result.loss}"
        losses.append(round(result.loss, 4))
        cosines.append({k: round(float(v), 3) for k, v in (result.cosine or {}).items()})
        changed.append(moved())
    last = program.stages[-1].name
    assert last in changed[0], f"step 0 left the last stage ({last}) as it was"
    still = [s.name for s in program.stages if s.name not in changed[-1]]
    assert not still, f"parameters unchanged after {program.num_stages} steps in {still}"
    return {
        "losses": losses,
        "cosine": cosines,
        "changed": changed,
        "batches": [batches[i % len(batches)] for i in range(program.num_stages)],
        "synthesized": synthesized,
    }


def _record_predictions(program) -> dict[str, dict[str, list]]:
    """Wrap each synthetic cut's `predict` to record, per tensor, what the synthesizer read and gave at each call:
    {cut: {tensor: [{"tensor": shape, "gradient": shape, "labels": how they joined it}, ...]}} ("labels": token,
    sample, batch or none: [Note: label context] in dnicompile/synthesizers.py)."""
    seen: dict[str, dict[str, list]] = {}
    for cut, iface in zip(program.cuts, program.runtime.interfaces):
        if cut.exact or not hasattr(iface, "models"):
            continue
        record = seen.setdefault(cut.name, {})

        def predict(h, context, iface=iface, record=record, original=iface.predict):
            preds = original(h, context)
            for name, pred in preds.items():
                synth = iface.models.grad[name]
                how = synth.context_kind(tuple(h[name].shape), None if context is None else tuple(context.shape))
                entry = {"tensor": list(h[name].shape), "gradient": list(pred.shape), "labels": how}
                record.setdefault(name, []).append(entry)
            return preds

        iface.predict = predict
    return seen


def boundary(program) -> dict[str, list[str]]:
    """What crosses each cut: name, dtype, shape."""
    return {
        cut.name: [f"{b.name}: {str(b.dtype).removeprefix('torch.')}{list(b.shape)}" for b in cut.boundary]
        for cut in program.cuts
    }


def _short(e: BaseException, limit: int = 160) -> str:
    text = f"{type(e).__name__}: {str(e).strip()}"
    first = text.splitlines()[0] if text else ""
    return first if len(first) <= limit else first[: limit - 1] + "…"


def fixed_batch(program) -> bool:
    """Whether torch.export fixed the batch size (the compiler says so in the stage table's front-end note)."""
    return "the batch is fixed at" in program.frontend_reason


def run_family(family: Family) -> dict:
    """Every check of one family; a failing check records its error and the others still run."""
    row: dict[str, Any] = {"family": family.name, "kind": family.kind, "class": family.cls, "note": family.note}
    row["cuts"] = list(family.cuts)
    row["conditioned"] = family.labels is not None
    try:  # the fx front end on its own
        _, _, fx_s = compile_exact(family, "fx")
        row["fx"] = f"traced ({fx_s:.2f} s)"
    except Exception as e:
        row["fx"] = _short(e, 1000)
    cpu: dict[str, float] = {}
    try:
        model, program, seconds = compile_exact(family, cpu=cpu)
    except Exception as e:
        row.update(compile="fail", error=_short(e), traceback=traceback.format_exc(limit=-3))
        return row
    dynamic = not fixed_batch(program)
    row.update(
        compile="pass",
        compile_s=round(seconds, 2),
        compile_cpu_s=round(cpu["s"], 2),
        frontend=program.frontend,
        frontend_reason=program.frontend_reason,
        dynamic_batch=dynamic,
        inputs=list(program.input_names),
        stages=program.num_stages,
        params=sum(p.numel() for p in model.parameters()),
        output_type=type(program(**family.inputs(B, torch.Generator().manual_seed(0)))).__name__,
        model_output_type=type(eager(model, family, family.inputs(B, torch.Generator().manual_seed(0)))).__name__,
        boundary=boundary(program),
    )
    checks = [
        ("forward", lambda: check_forward(model, program, family, B)),
        ("forward_b2", lambda: check_forward(model, program, family, B2)),
        ("gradients", lambda: check_gradients(model, program, family)),
        ("cdni", lambda: check_cdni(family, batches=(B, B2) if dynamic else (B,))),
    ]
    if not dynamic:
        row["forward_b2"] = "n/a"
        checks.pop(1)
    for name, check in checks:
        try:
            value = check()
            row[name] = "pass"
            row[f"{name}_detail"] = value
        except Exception as e:
            row[name] = "fail"
            row[f"{name}_error"] = _short(e)
    if row["cdni"] == "fail" and family.labels:  # is it the conditioning? the same cuts, unconditioned (DNI)
        try:
            row["dni_detail"] = check_cdni(family, batches=(B, B2) if dynamic else (B,), conditioned=False)
            row["dni"] = "pass"
        except Exception as e:
            row["dni"] = "fail"
            row["dni_error"] = _short(e)
    return row


# ----------------------------------------------------------------------------- report


def _fx_short(text: str) -> str:
    """The fx front end's result in a few words."""
    if text.startswith("traced"):
        return text
    if "wrapped by a decorator" in text:
        return "fails: decorated forward() with **kwargs"
    if "Proxy object cannot be iterated" in text:
        return "fails: decorated forward(), *args iterated"
    return "fails: " + text.split(": ", 1)[-1][:80]


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    return "–" if value is None else str(value)


def table(rows: list[dict]) -> str:
    """The markdown table of the results."""
    head = [
        "family", "kind", "model class", "keyword inputs", "cuts (exact)", "front end (fx alone)", "compile s (CPU s)",
        "forward = eager, own type (B=4 / B=3)", "exact-cut gradients = eager", "cDNI steps", "failed / notes",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cuts = ", ".join(f"`{c}`" for c in r.get("cuts", []))
        fx = _fx_short(r.get("fx", ""))
        if r.get("compile") != "pass":
            cells = [
                r["family"],
                r["kind"],
                f"`{r['class']}`",
                "–",
                cuts,
                f"– ({fx})",
                "fail",
                "–",
                "–",
                "–",
                r["error"],
            ]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        notes = [f"{k.removesuffix('_error')}: {v}" for k, v in r.items() if k.endswith("_error")]
        if r.get("dni"):
            notes.append(f"unconditioned DNI on the same cuts: {r['dni']}")
        if not r["dynamic_batch"]:
            notes.append(r["frontend_reason"].split("; ", 1)[-1])
        if r.get("note"):
            notes.append(r["note"])
        same = r["output_type"] == r["model_output_type"]
        grads = r["gradients"] + (f" ({r['gradients_detail']} tensors)" if r["gradients"] == "pass" else "")
        cdni = r["cdni"] + ("" if r["conditioned"] else " (DNI: no labels)")
        if r["cdni"] == "pass":
            d = r["cdni_detail"]
            cdni += (
                f" (B = {'/'.join(map(str, d['batches']))}: loss " + " / ".join(f"{x:.3f}" for x in d["losses"]) + ")"
            )
        if r["cdni"] == "pass":  # how the labels joined the tensors, where not all alike
            how: dict[str, list[str]] = {}
            for tensors in r["cdni_detail"].get("synthesized", {}).values():
                for tensor, calls in tensors.items():
                    how.setdefault(calls[0]["labels"], []).append(tensor)
            if "batch" in how or ("token" in how and "sample" in how):
                notes.append(
                    "cDNI labels "
                    + "; ".join(f"per {k}: {', '.join(how[k])}" for k in ("token", "sample", "batch") if k in how)
                )
        for cut, tensors in r["boundary"].items():  # what crosses without the batch dimension
            odd = [t for t in tensors if t.split("[", 1)[1].rstrip("]").split(", ")[0] != str(B)]
            if odd:
                notes.append(f"crosses `{cut}` without a batch dimension: {', '.join(odd)}")
        cells = [
            r["family"],
            r["kind"],
            f"`{r['class']}`",
            ", ".join(i for i in r["inputs"]),
            cuts,
            f"{r['frontend']} ({fx})",
            f"{r['compile_s']:.2f} ({r['compile_cpu_s']:.2f})",
            f"{r['forward']} / {r['forward_b2']}, `{r['output_type']}`{'' if same else ' (model: ' + r['model_output_type'] + ')'}",
            grads,
            cdni,
            "; ".join(notes) or "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated family names (default: all)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "hf_families.json"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    families = [BY_NAME[n] for n in args.only.split(",")] if args.only else FAMILIES
    rows = []
    for family in families:
        start = time.perf_counter()
        row = run_family(family)
        row["total_s"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        status = {k: row.get(k) for k in ("compile", "forward", "forward_b2", "gradients", "cdni")}
        print(f"{family.name}: {status} ({row['total_s']} s)", flush=True)
    print()
    print(table(rows))
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
