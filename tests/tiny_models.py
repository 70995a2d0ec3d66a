"""Tiny random causal LMs saved as real transformers checkpoints, for fast CPU tests."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_llama(path: Path, *, vocab_size: int = 384, hidden: int = 64, layers: int = 2, tie: bool = True,
                    seed: int = 0, dtype: torch.dtype = torch.float32, bias: bool = False) -> Path:
    """Save a 2-layer Llama (hidden 64, 4 heads / 2 KV heads) with random weights to ``path``.

    The vocabulary (384, pad 0, bos 1, eos 3) matches ``tiny_tokenizer.make_tiny_tokenizer``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=256,
        attention_bias=bias, mlp_bias=bias, bos_token_id=1, eos_token_id=3, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # larger-than-default weights, so quantization and adapters matter visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    return Path(path)


def make_tiny_gpt2(path: Path, *, vocab_size: int = 320, seed: int = 0) -> Path:
    """Save a 2-layer GPT-2 (Conv1D weights stored (in, out): the fan_in_fan_out case)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    return Path(path)


def loss_and_grads(model, x):
    model.train()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads
