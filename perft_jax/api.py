"""The stable entry points: `load_model` and `export_hf`.

    model = load_model("ckpts/olmoe")                 # restore a converted base checkpoint
    out = model(input_ids, attention_mask=mask)       # out.logits: [B, T, V]
    export_hf(model, "hf_out")                        # back to a Hugging Face directory
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from perft_jax.checkpoint import base as base_ckpt
from perft_jax.convert.jax_to_hf import export_hf
from perft_jax.models.config import ModelConfig
from perft_jax.models.decoder import MoeForCausalLM
from perft_jax.moe.ep import configure_expert_dispatch
from perft_jax.perft.attach import attach_perft
from perft_jax.perft.config import PerftConfig
from perft_jax.sharding import LogicalSharding, remember_sharding, shard_model


def init_model(cfg: ModelConfig, seed: int = 0) -> MoeForCausalLM:
    """A randomly initialised model (tests, benchmarks, the demo's tiny base), committed to the first local
    device like a restored one: a jitted step writes its state back committed, and uncommitted inputs on the
    first call would compile the step a second time."""
    model = MoeForCausalLM(cfg, nnx.Rngs(seed))
    nnx.update(model, jax.device_put(nnx.state(model), jax.local_devices()[0]))
    return model


def abstract_model(cfg: ModelConfig) -> MoeForCausalLM:
    """The model's structure with `ShapeDtypeStruct` leaves: no memory, no compute."""
    return nnx.eval_shape(lambda: MoeForCausalLM(cfg, nnx.Rngs(0)))


def load_model(ckpt_dir: str | os.PathLike, dtype: str | None = None, *, param_dtype: str | None = None,
               moe_backend: str | None = None, capacity_factor: float | None = None,
               sharding: jax.sharding.Sharding | None = None, mesh: jax.sharding.Mesh | None = None,
               rules: Mapping[str, Any] | None = None, expert_dispatch: str = "ring", shard_adapters: bool = False,
               perft: PerftConfig | None = None, seed: int = 0) -> MoeForCausalLM:
    """Restore a converted base checkpoint as an NNX model.

    Args:
      ckpt_dir: directory written by `convert_weights.py`.
      dtype: compute dtype ("float32" | "bfloat16"); also the parameter dtype unless `param_dtype`
        is given. Default: as stored.
      param_dtype: parameter storage dtype, when it should differ from `dtype`.
      moe_backend / capacity_factor: override the MoE dispatch backend of the stored config.
      sharding: where parameters land; default: the first local device. Ignored when `mesh` is given.
      mesh: a device mesh (perft_jax.sharding.build_mesh): every parameter is restored straight onto its own
        `NamedSharding` given by `rules` (each process reads only the shards its devices hold).
      rules: logical axis rules (default: perft_jax.sharding.DEFAULT_RULES).
      expert_dispatch: with `mesh`: "ring" runs the experts under shard_map (perft_jax/moe/ep.py),
        "gspmd" leaves the configured backend to XLA's partitioner; "ragged_a2a" (GPU/TPU) sends each token to
        its experts' devices with `jax.lax.ragged_all_to_all`.
      shard_adapters: with `mesh`: place adapters (attached now or later) and their optimizer state by `rules`
        instead of replicating them.
      perft: attach freshly initialised PERFT adapters described by this config (seeded by `seed`).
    """
    cfg, _ = base_ckpt.read_manifest(pathlib.Path(ckpt_dir))
    changes = {"dtype": dtype, "param_dtype": param_dtype or dtype, "moe_backend": moe_backend,
               "capacity_factor": capacity_factor}
    cfg = cfg.replace(**{k: v for k, v in changes.items() if v is not None})
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    if mesh is not None:
        logical = LogicalSharding.create(mesh, rules, shard_adapters)
        shardings = nnx.to_pure_dict(logical.state_shardings(abstract_state))
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              nnx.to_pure_dict(abstract_state), shardings)
    else:
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                              nnx.to_pure_dict(abstract_state))
    restored = base_ckpt.restore_groups(pathlib.Path(ckpt_dir), base_ckpt.group_names(cfg), target)
    nnx.replace_by_pure_dict(abstract_state, restored)
    model = nnx.merge(graphdef, abstract_state)
    if mesh is not None:
        remember_sharding(model, logical)  # adapters attached later and the train step follow this placement
        configure_expert_dispatch(model, logical, expert_dispatch)
    if perft is not None and perft.variant != "none":
        attach_perft(model, perft, seed=seed)
        if mesh is not None:  # the adapters' dropout RNG state too, so the train step compiles once
            shard_model(model, logical)
    return model


__all__ = ["abstract_model", "export_hf", "init_model", "load_model"]
