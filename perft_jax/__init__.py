"""perft-jax: Parameter-Efficient Routed Fine-Tuning (PERFT) of Mixture-of-Experts LLMs in JAX/Flax NNX."""
from perft_jax.api import load_model
from perft_jax.convert.jax_to_hf import export_hf
from perft_jax.errors import UserError
from perft_jax.generation import generate
from perft_jax.models import ModelConfig
from perft_jax.models.decoder import abstract_model, init_model
from perft_jax.perft.adapter_files import load_adapters, save_adapters
from perft_jax.perft.config import PerftConfig

__all__ = ["ModelConfig", "PerftConfig", "UserError", "abstract_model", "export_hf", "generate", "init_model",
           "load_adapters", "load_model", "save_adapters"]
