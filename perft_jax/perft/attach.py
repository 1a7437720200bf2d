"""Attach freshly initialised PERFT adapters to a base model, or find the ones it carries."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from perft_jax.errors import UserError
from perft_jax.models.decoder import MoeForCausalLM
from perft_jax.models.moe.experts import routed_pipeline
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.variants import VARIANTS
from perft_jax.sharding import model_sharding


def attach_perft(model: MoeForCausalLM, cfg: PerftConfig, seed: int = 0,
                 param_dtype=jnp.float32) -> MoeForCausalLM:
    """Add the adapters `cfg` describes to every layer of `model` (in place; also returned).

    Adapter weights are kept in `param_dtype` (float32 by default, also under a bfloat16 base: the
    paper's setup) and computed in the model's compute dtype. `cfg` is recorded on the model
    (`model.perft_config`): the one record of what the adapters are, which saving and loading read.
    Routed banks run sorted by adapter on one device, through the routed pipeline of the model's MoE backend
    (`experts.routed_pipeline(model.config.moe_backend)`), and densely gated on a mesh (`AdapterBank.routed`).
    """
    mcfg = model.config
    cfg.validate_config()
    if cfg.variant == "none":
        return model
    cfg.check_model(mcfg.num_experts, mcfg.num_experts_per_tok)
    if has_adapters(model):
        raise UserError("model already carries adapters; load into them or start from a base model")
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    # Decided here, from what the model was built with, never from an ambient mesh at call time.
    routed_dispatch = routed_pipeline(mcfg.moe_backend) if model_sharding(model) is None else "dense"
    for layer in model.layers:
        VARIANTS[cfg.variant].attach(layer, mcfg, cfg, rngs, param_dtype, routed_dispatch)
    model.perft_config = cfg
    # The adapters' dropout RNG state too: the step writes it back committed, like the adapters.
    place_like_base(model, nnx.state(model, nnx.Any(AdapterParam, nnx.RngState)))
    return model


def carried_config(model: MoeForCausalLM, where: str) -> PerftConfig:
    """The PerftConfig `model`'s adapters were attached with; a UserError naming `where` if it carries none."""
    cfg = getattr(model, "perft_config", None)
    if cfg is None or not has_adapters(model):
        raise UserError(f"{where}: the model carries no adapters (attach_perft or load_adapters first)")
    return cfg


def check_matches(model: MoeForCausalLM, cfg: PerftConfig, where: str) -> None:
    """`cfg` must describe the adapters `model` carries (the same variant, form, sizes and routing)."""
    variant = VARIANTS[cfg.variant]
    got, want = VARIANTS[carried_config(model, where).variant].computation(model.perft_config), variant.computation(cfg)
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise UserError(f"{where}: the model carries adapters that differ from this config at perft.{key}: "
                            f"model {got.get(key)!r}, config {want.get(key)!r}")


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
