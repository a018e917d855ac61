"""A Llama-shaped causal language model (transformers' LlamaForCausalLM, random weights, nothing downloaded),
built on the `meta` device by default: its tensors have shapes and dtypes but no memory, so a 7B-parameter model
compiles and plans its memory on a laptop (README, "Planning memory"). The defaults are Llama-2-7B's shape: 32
layers of width 4096, MLP 11008, 32 heads, vocabulary 32000 (6.74e9 parameters).

    dnicompile examples/llama_meta.py --spec examples/llama_7b_meta.yaml --memory 80GB

`device: cpu` (and a small config) builds a real one that trains.
"""

from __future__ import annotations

import torch


def build_model(
    vocab_size: int = 32000,
    hidden_size: int = 4096,
    intermediate_size: int = 11008,
    num_hidden_layers: int = 32,
    num_attention_heads: int = 32,
    num_key_value_heads: int | None = None,
    dtype: str = "float32",
    device: str = "meta",
):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        use_cache=False,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        return LlamaForCausalLM(config).to(getattr(torch, dtype))
