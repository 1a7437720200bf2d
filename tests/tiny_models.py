"""Tiny OLMoE / Mixtral models: JAX configs and random Hugging Face models, built locally (there is no model hub)."""
from __future__ import annotations

import pathlib

import numpy as np

from perft_jax.models.config import ModelConfig

# Shapes of `tiny_model_config` (perft_jax ModelConfig fields) and of the HF models (transformers fields).
TINY_MODEL = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, num_experts=4, num_experts_per_tok=2)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
            eos_token_id=2, pad_token_id=1, bos_token_id=0)


def tiny_model_config(arch: str = "olmoe", **overrides) -> ModelConfig:
    """A tiny JAX config: `TINY_MODEL` shapes, the architecture's routing and q/k norm, then `overrides`."""
    mixtral = arch == "mixtral"
    return ModelConfig(**{"model_type": arch, **TINY_MODEL, "norm_topk_prob": mixtral, "qk_norm": not mixtral,
                          **overrides})


def hf_config(arch: str, **overrides):
    import transformers

    fields = {**TINY, **overrides}
    if arch == "olmoe":
        fields.setdefault("num_experts", 8)
        return transformers.OlmoeConfig(**fields)
    fields.setdefault("num_local_experts", fields.pop("num_experts", 8))
    return transformers.MixtralConfig(**fields)


def build_hf_model(arch: str, seed: int = 0, **overrides):
    """A float32 HF model in eval mode with seeded random weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = transformers.OlmoeForCausalLM if arch == "olmoe" else transformers.MixtralForCausalLM
    model = cls(hf_config(arch, **overrides)).eval()
    # HF initialises RMSNorm weights to ones; randomise them so a mixed-up norm cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def save_hf_model(model, path: pathlib.Path, **save_kwargs) -> pathlib.Path:
    model.save_pretrained(str(path), **save_kwargs)
    return path


def token_batch(vocab_size: int, batch: int = 2, length: int = 13, left_pad: int = 4, seed: int = 0):
    """Random ids [B, T] and an attention mask whose last row is left-padded by `left_pad`."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, size=(batch, length))
    mask = np.ones((batch, length), np.int32)
    mask[-1, :left_pad] = 0
    ids[-1, :left_pad] = 1
    return ids, mask


def hf_logits(model, ids, mask) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask).long()).logits.numpy()


def rel_l2(got, want, mask=None) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if mask is not None:
        got, want = got[mask.astype(bool)], want[mask.astype(bool)]
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))
