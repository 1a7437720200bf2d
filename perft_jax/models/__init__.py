"""Decoder-only MoE language models (OLMoE, Mixtral) in Flax NNX."""
from perft_jax.models.architecture import Architecture
from perft_jax.models.config import ModelConfig
from perft_jax.models.mixtral import MIXTRAL
from perft_jax.models.olmoe import OLMOE

ARCHITECTURES: dict[str, Architecture] = {arch.model_type: arch for arch in (OLMOE, MIXTRAL)}

__all__ = ["ARCHITECTURES", "Architecture", "ModelConfig"]
