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
