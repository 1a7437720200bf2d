"""The one way to build a model: the model section, the PERFT config and one optional sharding in; a placed model out.

    model = build_model(ModelSection(checkpoint="ckpts/olmoe", dtype="bfloat16"), perft, sharding)

1. the `ModelConfig` is resolved once, from the converted checkpoint's manifest or an HF `config.json`, with the
   section's overrides (dtype, MoE backend, capacity factor, attention) applied (`resolve_model_config`);
2. the base is restored straight onto its placement (each parameter onto its `NamedSharding` on a mesh, else one
   device; group by group, so host memory holds about one layer), or randomly initialised and placed;
3. on a mesh, the model is built with its expert dispatch (models/moe/ep.py) and the sharding recorded on it;
4. the adapters are attached, placed once where the base says (perft/attach.py), their RNG state included.

`load_model` (api.py), the training loop, evaluation, the demo and the benchmarks all build here, and nothing is
placed again afterwards. This is also where config-time I/O lives: `load_run_config` reads a run config and
checks it against the base it names (PERFT top-k against the base's experts) before anything runs, and
`load_base_tokenizer` opens the run's tokenizer and checks its ids against the base's vocabulary.
"""
from __future__ import annotations

import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from perft_jax.checkpoint import base as base_ckpt
from perft_jax.config import Config, ModelSection, load_config
from perft_jax.data.tokenize import Tokenizer, check_fits_vocabulary, load_tokenizer
from perft_jax.errors import UserError
from perft_jax.hub import is_hub_name
from perft_jax.models.config import ModelConfig
from perft_jax.models.decoder import MoeForCausalLM, abstract_model, init_model
from perft_jax.models.hf_config import read_hf_config_file
from perft_jax.models.moe.ep import expert_dispatch as mesh_dispatch
from perft_jax.perft.attach import attach_perft
from perft_jax.perft.config import PerftConfig
from perft_jax.sharding import LogicalSharding, remember_sharding, shard_model


def _not_a_checkpoint(checkpoint: str, prefix: str) -> str:
    """Why `model.checkpoint` names no base; for a hub name, the conversion that makes one (the base is read
    as a converted checkpoint, never straight from the hub)."""
    if is_hub_name(checkpoint):
        out = f"ckpts/{checkpoint.split('/')[1].lower()}"
        return (f"{prefix}.checkpoint: {checkpoint!r} is a hub name, not a converted checkpoint: run perft-convert "
                f"--hf-dir {checkpoint} --out {out} first (then {prefix}.checkpoint={out})")
    return f"{prefix}.checkpoint: no such directory {checkpoint!r}"


def resolve_model_config(section: ModelSection, prefix: str = "model") -> ModelConfig:
    """The base's ModelConfig from `model.checkpoint` or `model.hf_config`, overrides applied; no weights read."""
    if section.checkpoint:
        path = pathlib.Path(section.checkpoint)
        if not path.is_dir():
            raise UserError(_not_a_checkpoint(section.checkpoint, prefix))
        cfg, _ = base_ckpt.read_manifest(path)
    else:
        path = pathlib.Path(section.hf_config)
        if not path.is_file():
            raise UserError(f"{prefix}.hf_config: no such file {section.hf_config!r}")
        cfg, _, _ = read_hf_config_file(path)
    changes = {"dtype": section.dtype, "param_dtype": section.param_dtype or section.dtype,
               "moe_backend": section.moe_backend, "capacity_factor": section.capacity_factor,
               "attention_impl": section.attention_impl, "remat": section.remat or None}
    return cfg.replace(**{k: v for k, v in changes.items() if v is not None})


def load_run_config(path: str | pathlib.Path | None, overrides: list[str] = ()) -> Config:
    """`config.load_config`, then the checks that need the base's config: a one-line error before anything runs."""
    cfg = load_config(path, overrides)
    base = resolve_model_config(cfg.model)
    cfg.perft.check_model(base.num_experts, base.num_experts_per_tok)
    return cfg


def load_base_tokenizer(section: ModelSection, pad_id: int | None = None, prefix: str = "model") -> Tokenizer:
    """The tokenizer of `section` (`tokenizer`, else the converted checkpoint's own files), checked against the
    base's vocabulary (and `pad_id`, the padding id of the data) before any weights are read."""
    source = section.tokenizer or section.checkpoint
    if not source:
        raise UserError(f"{prefix}.tokenizer: needed when the base comes from {prefix}.hf_config")
    tokenizer = load_tokenizer(source)
    base = resolve_model_config(section, prefix)
    check_fits_vocabulary(tokenizer, base.vocab_size, section.checkpoint or section.hf_config, pad_id)
    return tokenizer


def build_model(section: ModelSection, perft: PerftConfig | None = None, sharding: LogicalSharding | None = None,
                *, expert_dispatch: str | Callable = "ring", seed: int = 0,
                placement: jax.sharding.Sharding | None = None) -> MoeForCausalLM:
    """The base of `section` (+ the adapters of `perft`, seeded by `seed`), placed by `sharding`.

    Args:
      section: which base (a converted checkpoint, or an HF config for a random one) and its dtype / backend.
      perft: attach freshly initialised adapters of this config (kept in `section.adapter_dtype`); None or
        variant "none": the base alone.
      sharding: a device mesh and its rules (`sharding.run_sharding`); None: one device.
      expert_dispatch: on a mesh, how tokens reach the experts: "ring", "ragged_a2a" or "gspmd", or a factory
        of such a dispatch (models/moe/ep.py `expert_dispatch`); the model is built with it.
      placement: without `sharding`, where the parameters land; default: the first local device.
    """
    cfg = resolve_model_config(section)
    dispatch = None if sharding is None else mesh_dispatch(sharding, expert_dispatch, cfg)
    sharded = sharding is not None and sharding.mesh.size > 1
    if section.checkpoint:
        model = _restore(pathlib.Path(section.checkpoint), cfg, sharding, placement, dispatch, sharded)
    else:  # a random base (tests, benchmarks): built whole on one device, then placed
        model = init_model(cfg, seed=section.init_seed, dispatch=dispatch, sharded=sharded)
        if sharding is not None:
            shard_model(model, sharding)
        elif placement is not None:
            nnx.update(model, jax.device_put(nnx.state(model), placement))
    if sharding is not None:
        remember_sharding(model, sharding)  # adapters attached later and the train step follow this placement
    if perft is not None and perft.variant != "none":
        attach_perft(model, perft, seed=seed, param_dtype=jnp.dtype(section.adapter_dtype))
    return model


def _restore(ckpt_dir: pathlib.Path, cfg: ModelConfig, sharding: LogicalSharding | None,
             placement: jax.sharding.Sharding | None, dispatch, sharded: bool) -> MoeForCausalLM:
    """A converted base restored group by group, each parameter straight onto its target sharding (each process
    reads only the shards its devices hold)."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg, dispatch, sharded))
    if sharding is not None:
        shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_state))
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              nnx.to_pure_dict(abstract_state), shardings)
    else:
        placement = placement or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement),
                              nnx.to_pure_dict(abstract_state))
    restored = base_ckpt.restore_groups(ckpt_dir, base_ckpt.group_names(cfg), target)
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)


__all__ = ["build_model", "load_base_tokenizer", "load_run_config", "resolve_model_config"]
