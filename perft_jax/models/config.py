"""Architecture-neutral configuration of a decoder-only MoE language model.

One frozen dataclass describes OLMoE and Mixtral alike; the differences between them are fields
(`qk_norm`, `norm_topk_prob`, `sliding_window`, `clip_qkv`), never `if model == ...` branches in the
shared layers. The per-architecture modules (`olmoe.py`, `mixtral.py`) translate Hugging Face
`config.json` dictionaries into this class and back.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

from perft_jax.errors import UserError
from perft_jax.models.attention import ATTENTION_IMPLS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MOE_BACKENDS = ("auto", "dense", "capacity", "grouped", "ragged", "kernel")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of an OLMoE- or Mixtral-style MoE decoder.

    Attributes mirror Hugging Face names where one exists (in our snake_case), so that a reader can
    check a converted config against its `config.json` by eye.
    """

    model_type: str  # "olmoe" | "mixtral": selects HF names on import/export, not behaviour
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per expert
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool  # renormalise the top-k routing weights (Mixtral: always True)
    qk_norm: bool  # OLMoE: RMSNorm over the whole projected q / k width, before the head split
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    clip_qkv: float | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.01
    max_position_embeddings: int = 4096
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Dtype policy: parameters are stored in `param_dtype`, matmuls run in `dtype`. Norm statistics,
    # softmaxes and the router always run in float32, as in the HF reference.
    param_dtype: str = "float32"
    dtype: str = "float32"
    # MoE dispatch backend, one of MOE_BACKENDS (models/moe/experts.py describes each).
    moe_backend: str = "auto"
    capacity_factor: float = 2.0
    # Attention implementation, one of ATTENTION_IMPLS (models/attention.py describes each; auto: per platform).
    attention_impl: str = "auto"
    # Recompute each decoder layer's activations in the backward pass (memory for compute).
    remat: bool = False

    def __post_init__(self):
        self.validate()

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    def validate(self) -> None:
        def bad(key: str, expected: str) -> UserError:
            return UserError(f"model.{key}: expected {expected}, got {getattr(self, key)!r}")

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "num_experts", "num_experts_per_tok"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(key, "a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise bad("num_kv_heads", f"a divisor of num_heads={self.num_heads}")
        if self.num_experts_per_tok > self.num_experts:
            raise bad("num_experts_per_tok", f"at most num_experts={self.num_experts}")
        if self.head_dim % 2:
            raise bad("head_dim", "an even number (rotary embedding)")
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in DTYPES:
                raise bad(key, f"one of {sorted(DTYPES)}")
        if self.moe_backend not in MOE_BACKENDS:
            raise bad("moe_backend", f"one of {list(MOE_BACKENDS)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise bad("attention_impl", f"one of {list(ATTENTION_IMPLS)}")
        if not self.capacity_factor > 0:
            raise bad("capacity_factor", "a positive number")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise bad("sliding_window", "a positive integer or null")
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            raise bad("clip_qkv", "a positive number or null")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{source}: unknown key {unknown[0]!r}")
        try:
            return cls(**data)
        except TypeError as e:  # a missing required key
            raise UserError(f"{source}: {e}") from None
