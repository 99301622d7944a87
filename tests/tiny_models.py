"""Tiny checkpoints of every architecture the foundation promises, written with transformers' save_pretrained
(so the keys are the real on-disk names, e.g. Mixtral's block_sparse_moe.experts.N.w1)."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)

CONFIGS = {
    "llama": dict(model_type="llama", intermediate_size=256, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", intermediate_size=256, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", intermediate_size=256, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=256, num_key_value_heads=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
                      tie_word_embeddings=False),
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=256, num_key_value_heads=2, head_dim=32,
                      moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
                      tie_word_embeddings=False),
    "mixtral": dict(model_type="mixtral", intermediate_size=128, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, tie_word_embeddings=False),
    "opt": dict(model_type="opt", vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                ffn_dim=256, word_embed_proj_dim=128, max_position_embeddings=256, tie_word_embeddings=True),
}


def make_config(arch: str, **overrides):
    from transformers import AutoConfig

    kw = dict(CONFIGS[arch])
    model_type = kw.pop("model_type")
    if model_type != "opt":
        kw = {**COMMON, **kw}
    return AutoConfig.for_model(model_type, **{**kw, **overrides})


def make_checkpoint(arch: str, out: Path, dtype=torch.bfloat16, seed: int = 0, max_shard_size=None, **overrides):
    """Random-weight model saved with save_pretrained; returns (path, the transformers model in `dtype`).
    `overrides`: config values to change (e.g. num_hidden_layers)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # a spread of magnitudes per row, so scales matter
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.mul_(1 + 4 * torch.rand(*p.shape[:-1], 1))
    model = model.to(dtype).eval()
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    return out, model


def quantize_weight(w, scheme):
    """One weight quantized the way the loader stores it for `scheme` (per-tensor: one scale broadcast per row)."""
    from fp8stream.quantize import quantize_blocks, quantize_rows

    if scheme == "fp8_per_block":
        return quantize_blocks(w.clone())
    if scheme == "fp8_per_tensor":
        s = (w.abs().amax() / 448).expand(w.shape[0]).contiguous()
        return quantize_rows(w.clone(), s)
    return quantize_rows(w.clone())

