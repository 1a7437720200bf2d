"""perft-jax: Parameter-Efficient Routed Fine-Tuning (PERFT) of Mixture-of-Experts LLMs in JAX/Flax NNX."""
from perft_jax.api import abstract_model, export_hf, init_model, load_model
from perft_jax.errors import UserError
from perft_jax.models import ModelConfig

__all__ = ["ModelConfig", "UserError", "abstract_model", "export_hf", "init_model", "load_model"]
