"""Attach freshly initialised PERFT adapters to a base model, or find the ones it carries."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from perft_jax.errors import UserError
from perft_jax.models.decoder import MoeForCausalLM
from perft_jax.perft.adapters import AdapterParam, LoRA
from perft_jax.perft.branches import EmbeddedAdapters, RoutedAdapters, SharedAdapters
from perft_jax.perft.config import PerftConfig
from perft_jax.sharding import model_sharding


def attach_perft(model: MoeForCausalLM, cfg: PerftConfig, seed: int = 0,
                 param_dtype=jnp.float32) -> MoeForCausalLM:
    """Add the adapters `cfg` describes to every layer of `model` (in place; also returned).

    Adapter weights are kept in `param_dtype` (float32 by default, also under a bfloat16 base: the
    paper's setup) and computed in the model's compute dtype.
    """
    mcfg = model.config
    cfg.validate_config()
    if cfg.variant == "none":
        return model
    cfg.check_model(mcfg.num_experts, mcfg.num_experts_per_tok)
    if has_adapters(model):
        raise UserError("model already carries adapters; load into them or start from a base model")
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    dtype = mcfg.jnp_dtype
    d = mcfg.hidden_size
    for layer in model.layers:
        if cfg.variant == "perft_s":
            layer.moe.adapters = SharedAdapters(1, d, cfg, rngs, param_dtype, dtype)
        elif cfg.variant == "perft_d":
            layer.moe.adapters = SharedAdapters(cfg.num_adapters, d, cfg, rngs, param_dtype, dtype)
        elif cfg.variant == "perft_r":
            layer.moe.adapters = RoutedAdapters(d, cfg, mcfg.norm_topk_prob, rngs, param_dtype, dtype)
        elif cfg.variant == "perft_e":
            layer.moe.adapters = EmbeddedAdapters(mcfg.num_experts, d, mcfg.num_experts_per_tok, cfg, rngs,
                                                  param_dtype, dtype)
        elif cfg.variant == "qv_lora":
            attn = layer.attn
            attn.q_lora = LoRA(d, mcfg.num_heads * mcfg.head_dim, cfg, rngs, ("embed", "q_heads"), param_dtype,
                               dtype)
            attn.v_lora = LoRA(d, mcfg.num_kv_heads * mcfg.head_dim, cfg, rngs, ("embed", "kv_heads"),
                               param_dtype, dtype)
    model.perft_config = cfg  # what save_adapters records (loss coefficients and init included)
    # The adapters' dropout RNG state too: the step writes it back committed, like the adapters.
    place_like_base(model, nnx.state(model, nnx.Any(AdapterParam, nnx.RngState)))
    return model


def place_like_base(model: MoeForCausalLM, state) -> None:
    """Put `state` (adapters, their RNG state) of `model` where `placed_like_base` says, in place."""
    nnx.update(model, placed_like_base(model, state))


def placed_like_base(model: MoeForCausalLM, state):
    """`state` (adapters, their RNG or optimizer state) placed where the base says, committed: by the model's
    `LogicalSharding` when it has one (replicated, or by the adapters' logical axes with `mesh.shard_adapters`),
    else replicated over the base's mesh, or on the base's device.

    Freshly created arrays are uncommitted while restored ones are committed; a jitted step sees the two
    as different inputs and would compile twice (once more when the first update commits them).
    """
    base = model.embed.embedding[...]
    if isinstance(base, jax.core.Tracer):  # under eval_shape / jit: placement is the caller's business
        return state
    logical = model_sharding(model)
    if logical is not None:
        return jax.device_put(state, logical.trainable_shardings(state))
    sharding = base.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.device_put(state, sharding)


def has_adapters(model: MoeForCausalLM) -> bool:
    return bool(jax.tree.leaves(nnx.state(model, AdapterParam)))
