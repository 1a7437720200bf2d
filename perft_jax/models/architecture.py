"""What distinguishes one supported HF architecture from another, as data.

An :class:`Architecture` says how a Hugging Face `config.json` maps onto :class:`ModelConfig` and how
the architecture names its tensors. The model code never looks at it: it reads only `ModelConfig`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from perft_jax.errors import UserError
from perft_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Architecture:
    model_type: str  # HF `model_type`
    hf_class_name: str  # e.g. "OlmoeForCausalLM", written to `architectures` on export
    moe_prefix: str  # per-layer module holding router + experts ("mlp" | "block_sparse_moe")
    expert_proj_names: tuple[str, str, str]  # (gate, up, down) in the per-expert HF layout
    config_from_hf: Callable[[Any], ModelConfig]  # transformers PretrainedConfig -> ModelConfig
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]  # ModelConfig -> config.json fields


def rope_theta_of(hf_config: Any, source: str) -> float:
    """RoPE base from `rope_parameters` (transformers >= 5) or the legacy top-level `rope_theta`."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise UserError(f"{source}: rope_parameters.rope_type {rope_type!r} is not supported (only 'default')")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise UserError(f"{source}: missing rope_parameters.rope_theta")
    return float(theta)


def require(condition: bool, source: str, message: str) -> None:
    if not condition:
        raise UserError(f"{source}: {message}")


def shared_fields_from_hf(hf_config: Any, source: str) -> dict[str, Any]:
    """The ModelConfig fields OLMoE and Mixtral read from the same HF config keys."""
    require(hf_config.hidden_act == "silu", source,
            f"hidden_act {hf_config.hidden_act!r} is not supported (only 'silu')")
    return dict(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        num_experts_per_tok=hf_config.num_experts_per_tok,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        rope_theta=rope_theta_of(hf_config, source),
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        router_aux_loss_coef=float(hf_config.router_aux_loss_coef),
        max_position_embeddings=hf_config.max_position_embeddings,
        pad_token_id=hf_config.pad_token_id,
        bos_token_id=hf_config.bos_token_id,
        eos_token_id=hf_config.eos_token_id,
    )


def shared_fields_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json keys OLMoE and Mixtral spell the same way."""
    return dict(
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        num_experts_per_tok=cfg.num_experts_per_tok,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
        tie_word_embeddings=cfg.tie_word_embeddings,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        hidden_act="silu",
    )
