"""Save and load trained adapters under the reference code's tensor names (spec/PERFT.md §6).

An adapter directory holds two files, both written by the reference PERFT code and by HF PEFT:

    adapter_model.safetensors   the trainable tensors only, in PyTorch layout (`nn.Linear` weights (out, in))
    adapter_config.json         the reference config keys, plus our own under the single key "perft_jax"

PERFT variants use the names of the reference code's patched modeling files, e.g.
`model.layers.L.mlp.shared_adapter.j.unit.lora_A.weight` (`block_sparse_moe` in place of `mlp` for Mixtral),
so a directory written here loads into the reference code with `load_state_dict(strict=False)`, and one written
by the reference code loads here. The `qv_lora` baseline is written in HF PEFT's LoRA format, which
`peft.PeftModel.from_pretrained` reads; its config stays pure PEFT (older PEFT versions refuse unknown keys), so
our own metadata rides in the safetensors header instead.

Our adapter banks are stacked and stored (in, out): bank weights [M, D, R] / [M, R, D], the PERFT-R router
[D, M], qv LoRA [D, r] / [r, out]. A file tensor is one adapter's slice, transposed. The tensor names are
perft/adapter_names.py's, the config formats perft/adapter_configs.py's; this module reads and writes the files.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  # registers numpy's bfloat16, which safe_open(framework="np") needs for BF16 files
import numpy as np
import safetensors
import safetensors.numpy

from perft_jax.errors import UserError
from perft_jax.io import atomic_directory
from perft_jax.models.config import ModelConfig
from perft_jax.models.decoder import MoeForCausalLM
from perft_jax.perft.adapter_configs import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_metadata,
    check_base_model,
    peft_config,
    read_adapter_config,
    read_metadata,
    reference_config,
)
from perft_jax.perft.adapter_names import Entry, abstract_attached, adapter_params, file_entries
from perft_jax.perft.attach import attach_perft, carried_config, check_matches, has_adapters
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.variants import VARIANTS

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _checked_tensors(weights: pathlib.Path, entries: list[Entry]) -> dict[str, np.ndarray]:
    """Every entry's tensor by its file name, strictly checked (names, dtypes, shapes), in PyTorch layout."""
    if not weights.is_file():
        raise UserError(f"{weights}: missing adapter weights file")
    expected = {e.name: e for e in entries}
    try:
        with safetensors.safe_open(weights, framework="np") as f:
            available = set(f.keys())
            missing = sorted(set(expected) - available)
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UserError(f"{weights}: missing tensor {missing[0]}{more}")
            unexpected = sorted(available - set(expected))
            if unexpected:
                more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
                raise UserError(f"{weights}: unexpected tensor {unexpected[0]}{more}")
            for name, e in expected.items():
                tensor = f.get_slice(name)
                if tensor.get_dtype() not in FLOAT_DTYPES:
                    raise UserError(f"{weights}: tensor {name} has dtype {tensor.get_dtype()}, "
                                    "expected a floating-point type")
                if tuple(tensor.get_shape()) != e.shape:
                    raise UserError(f"{weights}: tensor {name} has shape {list(tensor.get_shape())}, "
                                    f"expected {list(e.shape)}")
            return {name: f.get_tensor(name) for name in expected}
    except safetensors.SafetensorError as e:
        raise UserError(f"{weights}: unreadable safetensors file ({e})") from None


def read_adapter_tensors(adapter_dir: str | os.PathLike, cfg: PerftConfig,
                         model_cfg: ModelConfig) -> list[tuple[Entry, np.ndarray]]:
    """The tensors of an adapter directory, checked against the adapters `cfg` attaches to a `model_cfg` base.

    The base model recorded in the metadata must match `model_cfg`; every file tensor must be one of those
    adapters' (perft/adapter_names.py), with its name, a floating-point dtype and its shape. Nothing else is
    read. Used by both runtimes: `load_adapters` here and perft_jax.pytorch's loader.

    Returns:
      (entry, value) per file tensor, the value as stored: PyTorch layout (out, in), the file's dtype.
    """
    adapter_dir = pathlib.Path(adapter_dir)
    meta_source, meta = read_metadata(adapter_dir)
    check_base_model(meta, model_cfg, meta_source)
    try:
        entries = file_entries(abstract_attached(model_cfg, cfg, jnp.float32))
    except UserError as e:  # e.g. top_k above the base top-k for base_router_rank
        raise UserError(f"{adapter_dir / CONFIG_NAME}: {e}") from None
    tensors = _checked_tensors(adapter_dir / WEIGHTS_NAME, entries)
    return [(e, tensors[e.name]) for e in entries]


def _stacked(tensors: list[tuple[Entry, np.ndarray]]) -> dict[tuple, np.ndarray]:
    """File tensors assembled into our layout: {parameter path: array}, adapter slices stacked, (in, out)."""
    slices: dict[tuple, dict[int | None, np.ndarray]] = {}
    for e, value in tensors:
        slices.setdefault(e.path, {})[e.index] = value.T
    return {path: parts[None] if None in parts else np.stack([parts[j] for j in range(len(parts))])
            for path, parts in slices.items()}


def load_adapters(model: MoeForCausalLM, adapter_dir: str | os.PathLike, overrides: dict[str, Any] | None = None,
                  *, param_dtype=jnp.float32) -> MoeForCausalLM:
    """Load an adapter directory into `model` (in place; also returned).

    A base model gets adapters attached first (`attach_perft`, weights kept in `param_dtype`); a model that
    already carries adapters must carry exactly the ones the config describes. Every tensor is checked by
    name, dtype and shape before anything changes: a missing, unexpected or mis-shaped tensor is a UserError
    naming the file and the tensor. Values are cast to the adapter parameters' dtype.

    Args:
      model: a base model, or one carrying matching adapters.
      adapter_dir: written by `save_adapters`, by the reference PERFT code, or by HF PEFT (qv_lora).
      overrides: PerftConfig fields applied on top of the directory's config (see `read_adapter_config`).
      param_dtype: dtype of freshly attached adapter weights (ignored for carried adapters).
    """
    adapter_dir = pathlib.Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir, overrides)
    carried = has_adapters(model)
    if carried:
        check_matches(model, cfg, str(adapter_dir / CONFIG_NAME))
    arrays = _stacked(read_adapter_tensors(adapter_dir, cfg, model.config))
    if not carried:
        attach_perft(model, cfg, param_dtype=param_dtype)
    for path, var in adapter_params(model):
        old = var.get_value()
        value = arrays[path].astype(var.dtype)
        # Keep the parameter where it was placed (sharded or on one device).
        var.set_value(jax.device_put(value, old.sharding) if isinstance(old, jax.Array) else jnp.asarray(value))
    return model


def _check_replaceable(out: pathlib.Path, overwrite: bool) -> None:
    """An existing `out` may be replaced only with `overwrite`, and only when it holds nothing but adapter files."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out}: exists and is not a directory")
        if not overwrite:
            raise UserError(f"{out}: exists (pass overwrite=True to replace it)")
        others = sorted(p.name for p in out.iterdir() if p.name not in (WEIGHTS_NAME, CONFIG_NAME))
        if others:  # never delete what we did not write
            raise UserError(f"{out}: exists and holds {others[0]}, which is not an adapter file; not replacing it")


def save_adapters(model: MoeForCausalLM, out_dir: str | os.PathLike, extra_config: dict[str, Any] | None = None,
                  *, config: PerftConfig | None = None, overwrite: bool = False) -> pathlib.Path:
    """Write `model`'s adapters (only they train) to `out_dir` as safetensors + adapter_config.json.

    PERFT variants get the reference names and config keys (spec/PERFT.md §6) plus "perft_jax"
    (adapter_configs.py `adapter_metadata`): the full PerftConfig, the base model's description (architecture, HF
    config), the library versions and `extra_config`. `qv_lora` is written in HF PEFT's LoRA format, with that
    metadata in the safetensors header. In a multi-process run, call it from one process only.

    Args:
      model: a model carrying adapters.
      out_dir: the adapter directory, created with its parents.
      extra_config: JSON-serialisable keys stored under "perft_jax" (e.g. training step, data set);
        `base_model_name_or_path` (the base checkpoint or hub name trained on) also goes to
        `base_model.name_or_path` and to the PEFT config.
      config: the PerftConfig to record (e.g. with training-only settings changed); it must describe the
        adapters the model carries. Default: the one they were attached with (`model.perft_config`).
      overwrite: replace an existing `out_dir`, as a whole; refused if it holds anything but adapter files.
    """
    out = pathlib.Path(out_dir)
    cfg = carried_config(model, "save_adapters")
    if config is not None:
        check_matches(model, config, "save_adapters(config=...)")
        cfg = config
    extra = dict(extra_config or {})
    reserved = sorted({"format_version", "perft", "base_model", "versions"} & set(extra))
    if reserved:
        raise UserError(f"save_adapters: extra_config key {reserved[0]!r} is reserved")
    meta = adapter_metadata(cfg, model.config, extra)
    try:
        meta_text = json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise UserError(f"save_adapters: extra_config is not JSON-serialisable ({e})") from None
    if VARIANTS[cfg.variant].peft_format:
        config_json = peft_config(cfg, extra.get("base_model_name_or_path"))
    else:
        config_json = {**reference_config(cfg), "perft_jax": meta}
    tensors = {}
    values = {path: np.asarray(jax.device_get(var.get_value())) for path, var in adapter_params(model)}
    for e in file_entries(model):
        value = values[e.path]
        tensors[e.name] = np.ascontiguousarray((value if e.index is None else value[e.index]).T)
    _check_replaceable(out, overwrite)
    with atomic_directory(out) as tmp:
        # "format": "pt" lets transformers / PEFT read the file; our metadata rides beside it.
        safetensors.numpy.save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", "perft_jax": meta_text})
        (tmp / CONFIG_NAME).write_text(json.dumps(config_json, indent=2) + "\n")
    return out


__all__ = ["load_adapters", "read_adapter_config", "read_adapter_tensors", "save_adapters"]
