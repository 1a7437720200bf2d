"""The stable entry point `load_model`: a converted base checkpoint restored as an NNX model.

    model = load_model("ckpts/olmoe")                 # restore a converted base checkpoint
    out = model(input_ids, attention_mask=mask)       # out.logits: [B, T, V]

(`export_hf`, back to a Hugging Face directory, is perft_jax.convert.jax_to_hf's; `init_model` / `abstract_model`
are the decoder's, perft_jax.models.decoder.)
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax

from perft_jax.build import build_model
from perft_jax.config import ModelSection
from perft_jax.models.decoder import MoeForCausalLM
from perft_jax.perft.config import PerftConfig
from perft_jax.sharding import LogicalSharding


def load_model(ckpt_dir: str | os.PathLike, dtype: str | None = None, *, param_dtype: str | None = None,
               moe_backend: str | None = None, capacity_factor: float | None = None, attention_impl: str | None = None,
               sharding: jax.sharding.Sharding | None = None, mesh: jax.sharding.Mesh | None = None,
               rules: Mapping[str, Any] | None = None, expert_dispatch: str | Callable = "ring",
               shard_adapters: bool = False, perft: PerftConfig | None = None, seed: int = 0) -> MoeForCausalLM:
    """Restore a converted base checkpoint as an NNX model (perft_jax/build.py `build_model`).

    Args:
      ckpt_dir: directory written by `convert_weights.py`.
      dtype: compute dtype ("float32" | "bfloat16"); also the parameter dtype unless `param_dtype`
        is given. Default: as stored.
      param_dtype: parameter storage dtype, when it should differ from `dtype`.
      moe_backend / capacity_factor / attention_impl: override the MoE dispatch backend or the attention
        implementation of the stored config.
      sharding: where parameters land; default: the first local device. Ignored when `mesh` is given.
      mesh: a device mesh (perft_jax.sharding.build_mesh): every parameter is restored straight onto its own
        `NamedSharding` given by `rules` (each process reads only the shards its devices hold).
      rules: logical axis rules (default: perft_jax.sharding.DEFAULT_RULES).
      expert_dispatch: with `mesh`: "ring" runs the experts under shard_map (perft_jax/models/moe/ep.py),
        "gspmd" leaves the configured backend to XLA's partitioner; "ragged_a2a" (GPU/TPU) sends each token to
        its experts' devices with `jax.lax.ragged_all_to_all`; or a factory of such a dispatch.
      shard_adapters: with `mesh`: place adapters (attached now or later) and their optimizer state by `rules`
        instead of replicating them.
      perft: attach freshly initialised PERFT adapters described by this config (seeded by `seed`).
    """
    section = ModelSection(checkpoint=str(ckpt_dir), dtype=dtype, param_dtype=param_dtype, moe_backend=moe_backend,
                           capacity_factor=capacity_factor, attention_impl=attention_impl)
    logical = None if mesh is None else LogicalSharding.create(mesh, rules, shard_adapters)
    return build_model(section, perft, logical, expert_dispatch=expert_dispatch, seed=seed, placement=sharding)


__all__ = ["load_model"]
