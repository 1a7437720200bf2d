"""OLMoE (allenai/OLMoE-1B-7B): HF config and tensor naming.

Differences from Mixtral that matter numerically, all expressed as `ModelConfig` fields:
q/k RMSNorm over the full projected width before the head split (`qk_norm`), optional `clip_qkv`,
and top-k routing weights renormalised only when `norm_topk_prob` (False for OLMoE-1B-7B).
Source: transformers/models/olmoe/modeling_olmoe.py.
"""
from __future__ import annotations

from typing import Any

from perft_jax.models.architecture import Architecture, require, rope_theta_of
from perft_jax.models.config import ModelConfig


def _config_from_hf(hf: Any, source: str = "config.json") -> ModelConfig:
    require(not getattr(hf, "attention_bias", False), source, "attention_bias=true is not supported")
    require(hf.hidden_act == "silu", source, f"hidden_act {hf.hidden_act!r} is not supported (only 'silu')")
    head_dim = hf.hidden_size // hf.num_attention_heads
    return ModelConfig(
        model_type="olmoe",
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=head_dim,
        num_experts=hf.num_experts,
        num_experts_per_tok=hf.num_experts_per_tok,
        norm_topk_prob=bool(hf.norm_topk_prob),
        qk_norm=True,
        rms_norm_eps=float(hf.rms_norm_eps),
        rope_theta=rope_theta_of(hf, source),
        clip_qkv=None if hf.clip_qkv is None else float(hf.clip_qkv),
        sliding_window=None,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        router_aux_loss_coef=float(hf.router_aux_loss_coef),
        max_position_embeddings=hf.max_position_embeddings,
        pad_token_id=hf.pad_token_id,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
    )


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        model_type="olmoe",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        norm_topk_prob=cfg.norm_topk_prob,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
        clip_qkv=cfg.clip_qkv,
        tie_word_embeddings=cfg.tie_word_embeddings,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        hidden_act="silu",
        attention_bias=False,
    )


OLMOE = Architecture(
    model_type="olmoe",
    hf_class_name="OlmoeForCausalLM",
    moe_prefix="mlp",
    expert_proj_names=("gate_proj", "up_proj", "down_proj"),
    config_from_hf=_config_from_hf,
    config_to_hf=_config_to_hf,
)
