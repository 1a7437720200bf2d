"""Load an adapter directory into a transformers OLMoE / Mixtral model, in place, and read its config back.

The directory is read exactly as perft_jax reads it (perft/adapter_files.py `read_adapter_tensors`): its config
(ours, the reference PERFT code's keys, or HF PEFT's for qv_lora), the base model it records (refused when it is
not this one), and every tensor by name, dtype and shape, all checked before the model changes. Then the adapters
are attached (pytorch/attach.py) and their weights set from the file.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import torch
from torch import nn

from perft_jax.errors import UserError
from perft_jax.perft.adapter_configs import WEIGHTS_NAME, read_adapter_config, read_metadata
from perft_jax.perft.adapter_files import read_adapter_tensors
from perft_jax.perft.adapter_names import Entry
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.variants import VARIANTS
from perft_jax.pytorch import qv_lora
from perft_jax.pytorch.attach import attach_perft, base_config, moe_blocks
from perft_jax.pytorch.branches import BRANCHES


def read_perft_config(adapter_dir: str | os.PathLike, overrides: dict[str, Any] | None = None) -> PerftConfig:
    """The PerftConfig of an adapter directory (perft_jax's `read_adapter_config`; `overrides` as there)."""
    return read_adapter_config(adapter_dir, overrides)


def read_perft_metadata(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """perft_jax's metadata of an adapter directory: the base model it was trained on (architecture, HF config,
    name or path), the library versions, the training step; {} for directories of the reference code or PEFT."""
    return read_metadata(pathlib.Path(adapter_dir))[1] or {}


def _parameter(hf_model: nn.Module, cfg: PerftConfig, entry: Entry) -> nn.Parameter:
    """The torch parameter of a file tensor, found from its perft_jax parameter path
    ("layers", L, ..., weight name) and adapter index (perft/adapter_names.py)."""
    block, branch = moe_blocks(hf_model)[entry.path[1]], BRANCHES[cfg.variant]
    if entry.path[-1] == "router":
        return getattr(block, branch.router).weight
    return getattr(getattr(block, branch.units)[entry.index].unit, entry.path[-1]).weight


def load_perft_adapters(hf_model: nn.Module, adapter_dir: str | os.PathLike,
                        overrides: dict[str, Any] | None = None) -> nn.Module:
    """Attach the adapters of `adapter_dir` to `hf_model` and load their weights (in place; also returned).

    Afterwards `hf_model(...)` and `hf_model.generate(...)` run with the adapters, computed in the model's dtype
    from float32 weights as perft_jax computes them; dropout follows the model's mode (`hf_model.eval()` for
    inference: models from `from_pretrained` are in eval mode).

    Args:
      hf_model: a transformers `OlmoeForCausalLM` / `MixtralForCausalLM` without adapters.
      adapter_dir: written by perft_jax's `save_adapters` (any format version), by the reference PERFT code, or
        by HF PEFT (qv_lora, which PEFT then runs: `pip install peft`).
      overrides: PerftConfig fields applied on top of the directory's config, e.g.
        {"adapter_gate_weights": "base_router_rank"} for a PERFT-R directory of the reference OLMoE code.

    Raises:
      UserError: one line naming the file and key or tensor: an unreadable config, adapters of another base
        model, a missing, unexpected or mis-shaped tensor, a model that already carries adapters.
    """
    adapter_dir = pathlib.Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir, overrides)
    if getattr(hf_model, "perft_config", None) is not None:
        raise UserError(f"{adapter_dir}: the model already carries PERFT adapters; load into a base model")
    tensors = read_adapter_tensors(adapter_dir, cfg, base_config(hf_model))
    attach_perft(hf_model, cfg)
    if VARIANTS[cfg.variant].peft_format:
        qv_lora.load(hf_model, tensors, str(adapter_dir / WEIGHTS_NAME))
        return hf_model
    with torch.no_grad():
        for entry, value in tensors:  # stored in torch layout; float32 first: numpy's bfloat16 is not torch's
            _parameter(hf_model, cfg, entry).copy_(torch.from_numpy(np.asarray(value, np.float32)))
    return hf_model
