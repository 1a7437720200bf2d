"""Adapter configs in the three formats a directory may hold: ours, the reference PERFT code's, HF PEFT's.

`adapter_config.json` holds the reference code's keys plus ours under the single key "perft_jax" (PERFT
variants), or a pure HF PEFT LoRA config (`qv_lora`; older PEFT versions refuse unknown keys, so our metadata
then rides in the safetensors header). `read_adapter_config` reads any of them back as a `PerftConfig`.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import ml_dtypes  # noqa: F401  # registers numpy's bfloat16, which safe_open(framework="np") needs for BF16 files
import safetensors

from perft_jax.config_parsing import from_dict
from perft_jax.errors import UserError
from perft_jax.io import read_json_object
from perft_jax.models.config import ModelConfig
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.variants import VARIANTS

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1
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


def base_model_fields(mcfg: ModelConfig) -> dict[str, Any]:
    return {key: getattr(mcfg, key) for key in (*BASE_MODEL_KEYS, "vocab_size", "norm_topk_prob")}


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
        data = raw["perft_jax"].get("perft") if isinstance(raw["perft_jax"], dict) else None
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
        return config_path, raw["perft_jax"]
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
    return weights, meta if isinstance(meta, dict) else None


def check_base_model(meta: dict[str, Any] | None, mcfg: ModelConfig, where: pathlib.Path) -> None:
    base = (meta or {}).get("base_model")
    if not isinstance(base, dict):
        return  # the reference code and PEFT do not record it; the tensor shapes are still checked
    for key in BASE_MODEL_KEYS:
        if key in base and base[key] != getattr(mcfg, key):
            raise UserError(f"{where}: perft_jax.base_model.{key} is {base[key]!r}, but the model has "
                            f"{getattr(mcfg, key)!r} (adapters trained on another base model)")
