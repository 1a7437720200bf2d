"""Decoder-only MoE language models (OLMoE, Mixtral) in Flax NNX."""
from perft_jax.models.architecture import Architecture
from perft_jax.models.config import ModelConfig
from perft_jax.models.hf_config import ARCHITECTURES, read_hf_config_file

__all__ = ["ARCHITECTURES", "Architecture", "ModelConfig", "read_hf_config_file"]
