"""Adapter configs in the three formats a directory may hold: ours, the reference PERFT code's, HF PEFT's.

`adapter_config.json` holds the reference code's keys plus ours under the single key "perft_jax" (PERFT
variants), or a pure HF PEFT LoRA config (`qv_lora`; older PEFT versions refuse unknown keys, so our metadata
then rides in the safetensors header). `read_adapter_config` reads any of them back as a `PerftConfig`.

Our metadata ("perft_jax": `adapter_metadata`) records what a user needs to reload the adapters anywhere: the
PerftConfig, the base model (architecture, its HF config, and its name or path when the caller knows it), the
versions of perft-jax, JAX, Flax and transformers that wrote it, and `format_version`. Directories without it (the
reference code's, PEFT's) or with an older format still load; a newer format is refused.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
from typing import Any

import flax
import jax
import ml_dtypes  # noqa: F401  # registers numpy's bfloat16, which safe_open(framework="np") needs for BF16 files
import safetensors
import transformers

from perft_jax.config_parsing import from_dict, to_dict
from perft_jax.errors import UserError
from perft_jax.io import read_json_object
from perft_jax.models import ARCHITECTURES
from perft_jax.models.config import ModelConfig
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.variants import VARIANTS

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# 1: perft, base_model (ModelConfig fields); 2: + base_model.architecture / hf_config / name_or_path, versions.
FORMAT_VERSION = 2
# Base-model fields an adapter depends on; a mismatch is refused before any tensor is read.
BASE_MODEL_KEYS = ("model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                   "num_experts", "num_experts_per_tok")
# Reference `hidden_act` (HF ACT2FN names) <-> PerftConfig.activation.
ACT_FROM_REFERENCE = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu", "linear": "identity",
                       "identity": "identity"}
ACT_TO_REFERENCE = {"silu": "silu", "relu": "relu", "gelu": "gelu", "identity": "linear"}
# PEFT LoRA options that change the computation; perft-jax's qv_lora implements none of them.
_PEFT_UNSUPPORTED = ("use_dora", "use_rslora", "fan_in_fan_out", "layers_to_transform", "modules_to_save",
                     "rank_pattern", "alpha_pattern", "lora_bias", "exclude_modules", "target_parameters",
                     "trainable_token_indices")


def base_model_fields(mcfg: ModelConfig, name_or_path: str | None = None) -> dict[str, Any]:
    """The base model an adapter was trained on: the checked ModelConfig fields, its HF class and the HF config
    that rebuilds it (`transformers.AutoConfig.for_model(**hf_config)`), and its name or path when known."""
    arch = ARCHITECTURES[mcfg.model_type]
    fields = {key: getattr(mcfg, key) for key in (*BASE_MODEL_KEYS, "vocab_size", "intermediate_size",
                                                  "norm_topk_prob")}
    return {**fields, "architecture": arch.hf_class_name, "hf_config": arch.config_to_hf(mcfg),
            "name_or_path": name_or_path}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # perft-jax run from a checkout it was not installed from
        return None


def adapter_metadata(cfg: PerftConfig, mcfg: ModelConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """Our "perft_jax" metadata of an adapter directory; `extra`'s `base_model_name_or_path` names the base."""
    versions = {"perft_jax": _version("perft-jax"), "jax": jax.__version__, "flax": flax.__version__,
                "transformers": transformers.__version__}
    return {"format_version": FORMAT_VERSION, "perft": to_dict(cfg),
            "base_model": base_model_fields(mcfg, extra.get("base_model_name_or_path")), "versions": versions,
            **extra}


def _check_format(meta: dict[str, Any], where: pathlib.Path) -> dict[str, Any]:
    """`meta`, if this perft-jax reads its format (1 to FORMAT_VERSION; directories before format 1 had none)."""
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{where}: perft_jax.format_version: expected a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(f"{where}: perft_jax.format_version {version} is newer than this perft-jax reads (1 to "
                        f"{FORMAT_VERSION}): upgrade perft-jax")
    return meta


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def reference_config(cfg: PerftConfig) -> dict[str, Any]:
    """The reference code's config keys (spec/PERFT.md §6)."""
    if cfg.adapter == "lora":
        adapter_type = "LoRA"
        args = {"r": cfg.bottleneck, "lora_alpha": _number(cfg.lora_alpha), "lora_dropout": cfg.dropout}
    else:
        adapter_type = "Parallel_Adapter"
        args = {"hidden_dim": cfg.bottleneck, "hidden_act": ACT_TO_REFERENCE[cfg.activation], "dropout": cfg.dropout}
    return {"adapter_type": adapter_type, "adapter_args": args, **VARIANTS[cfg.variant].reference_keys(cfg),
            "shared_routing_adapter_router_aux_loss_coef": cfg.router_aux_loss_coef}


def peft_config(cfg: PerftConfig, base_model_name: str | None) -> dict[str, Any]:
    """A HF PEFT LoRA config; only keys every PEFT 0.x LoraConfig accepts, all others at their defaults."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "inference_mode": True,
        "r": cfg.bottleneck,
        "lora_alpha": _number(cfg.lora_alpha),
        "lora_dropout": cfg.dropout,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _from_reference(raw: dict[str, Any], path: pathlib.Path) -> dict[str, Any]:
    """PerftConfig data from the reference code's keys alone (a directory the reference code wrote)."""
    args = raw.get("adapter_args")
    if not isinstance(args, dict):
        raise UserError(f"{path}: adapter_args: expected a mapping, got {args!r}")

    def arg(key: str, default: Any = None) -> Any:
        if key not in args and default is None:
            raise UserError(f"{path}: adapter_args.{key}: missing")
        return args.get(key, default)

    adapter_type = raw["adapter_type"]
    if adapter_type == "LoRA":
        data = {"adapter": "lora", "bottleneck": arg("r"), "lora_alpha": arg("lora_alpha"),
                "dropout": arg("lora_dropout", 0.0)}
    elif adapter_type == "Parallel_Adapter":
        act = arg("hidden_act", "silu")
        if act not in ACT_FROM_REFERENCE:
            raise UserError(f"{path}: adapter_args.hidden_act: expected one of {sorted(ACT_FROM_REFERENCE)}, "
                            f"got {act!r}")
        data = {"adapter": "parallel_adapter", "bottleneck": arg("hidden_dim"),
                "activation": ACT_FROM_REFERENCE[act], "dropout": arg("dropout", 0.0)}
    else:
        raise UserError(f"{path}: adapter_type: expected 'LoRA' or 'Parallel_Adapter', got {adapter_type!r}")
    if raw.get("embedded_routing_adapter") and (raw.get("shared_adapter") or raw.get("shared_routing_adapter")):
        raise UserError(f"{path}: embedded_routing_adapter together with shared_adapter / shared_routing_adapter "
                        "is not supported (perft-jax attaches one variant)")
    # The first variant whose flags are set: shared adapters win over routed ones, as in the reference code.
    selected = next(filter(None, (variant.from_reference(raw) for variant in VARIANTS.values())), None)
    if selected is None:
        raise UserError(f"{path}: no PERFT variant enabled (shared_adapter, shared_routing_adapter and "
                        "embedded_routing_adapter are all false)")
    return {**data, **selected}


def _from_peft(raw: dict[str, Any], path: pathlib.Path) -> dict[str, Any]:
    """PerftConfig data (`qv_lora`) from a HF PEFT LoRA config."""
    if raw["peft_type"] != "LORA":
        raise UserError(f"{path}: peft_type: expected 'LORA' (the qv_lora baseline), got {raw['peft_type']!r}")
    targets = raw.get("target_modules")
    if not isinstance(targets, list) or sorted(targets) != ["q_proj", "v_proj"]:
        raise UserError(f"{path}: target_modules: expected exactly ['q_proj', 'v_proj'] (qv_lora), got {targets!r}")
    if raw.get("bias", "none") != "none":
        raise UserError(f"{path}: bias: expected 'none', got {raw['bias']!r}")
    for key in _PEFT_UNSUPPORTED:
        if raw.get(key):
            raise UserError(f"{path}: {key}: not supported by perft-jax's qv_lora, got {raw[key]!r}")
    # PEFT LoraConfig defaults: r 8, lora_alpha 8, lora_dropout 0.
    return {"variant": "qv_lora", "adapter": "lora", "bottleneck": raw.get("r", 8),
            "lora_alpha": raw.get("lora_alpha", 8), "dropout": raw.get("lora_dropout", 0.0)}


def _merge(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_adapter_config(adapter_dir: str | os.PathLike, overrides: dict[str, Any] | None = None) -> PerftConfig:
    """The PerftConfig of an adapter directory written here, by the reference PERFT code, or by HF PEFT.

    Our "perft_jax" key wins when present; otherwise the reference keys (spec/PERFT.md §6) or a PEFT LoRA
    config on exactly q_proj / v_proj (read as `qv_lora`) are translated. Settings the reference keys cannot
    express keep their defaults: a directory from the reference OLMoE code needs
    `overrides={"adapter_gate_weights": "base_router_rank"}` to reproduce its PERFT-R numbers (spec/PERFT.md §3).

    Args:
      adapter_dir: the directory holding `adapter_config.json`.
      overrides: PerftConfig fields (nested mappings for sections, e.g. {"dynmole": {...}}) applied on top.
    """
    path = pathlib.Path(adapter_dir) / CONFIG_NAME
    raw = read_json_object(path, "adapter config")
    if "perft_jax" in raw:
        data = _check_format(raw["perft_jax"], path).get("perft") if isinstance(raw["perft_jax"], dict) else None
        if not isinstance(data, dict):
            raise UserError(f"{path}: perft_jax.perft: expected a mapping, got {data!r}")
    elif "peft_type" in raw:
        data = _from_peft(raw, path)
    elif "adapter_type" in raw:
        data = _from_reference(raw, path)
    else:
        raise UserError(f"{path}: not an adapter config (none of the keys perft_jax, adapter_type, peft_type)")
    try:
        return from_dict(PerftConfig, _merge(data, overrides or {}), "perft")
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def read_metadata(adapter_dir: pathlib.Path) -> tuple[pathlib.Path, dict[str, Any] | None]:
    """Our "perft_jax" metadata: from the config, else from the safetensors header (PEFT-format directories)."""
    config_path = adapter_dir / CONFIG_NAME
    raw = read_json_object(config_path, "adapter config")
    if isinstance(raw.get("perft_jax"), dict):
        return config_path, _check_format(raw["perft_jax"], config_path)
    weights = adapter_dir / WEIGHTS_NAME
    try:
        with safetensors.safe_open(weights, framework="np") as f:
            text = (f.metadata() or {}).get("perft_jax")
    except Exception:  # a missing or broken file is reported, with its name, when the tensors are read
        return weights, None
    try:
        meta = json.loads(text) if text else None
    except ValueError:
        raise UserError(f"{weights}: header entry perft_jax is not JSON") from None
    return weights, _check_format(meta, weights) if isinstance(meta, dict) else None


def check_base_model(meta: dict[str, Any] | None, mcfg: ModelConfig, where: pathlib.Path) -> None:
    base = (meta or {}).get("base_model")
    if not isinstance(base, dict):
        return  # the reference code and PEFT do not record it; the tensor shapes are still checked
    for key in BASE_MODEL_KEYS:
        if key in base and base[key] != getattr(mcfg, key):
            raise UserError(f"{where}: perft_jax.base_model.{key} is {base[key]!r}, but the model has "
                            f"{getattr(mcfg, key)!r} (adapters trained on another base model)")
