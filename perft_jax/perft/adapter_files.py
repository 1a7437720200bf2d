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
[D, M], qv LoRA [D, r] / [r, out]. A file tensor is one adapter's slice, transposed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  # registers numpy's bfloat16, which safe_open(framework="np") needs for BF16 files
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from perft_jax.config_parsing import from_dict, to_dict
from perft_jax.errors import UserError
from perft_jax.models import ARCHITECTURES
from perft_jax.models.config import ModelConfig
from perft_jax.models.decoder import MoeForCausalLM
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.attach import attach_perft, has_adapters
from perft_jax.perft.branches import EmbeddedAdapters, RoutedAdapters, SharedAdapters
from perft_jax.perft.config import PerftConfig

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
# Base-model fields an adapter depends on; a mismatch is refused before any tensor is read.
BASE_MODEL_KEYS = ("model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                   "num_experts", "num_experts_per_tok")
# Reference `hidden_act` (HF ACT2FN names) <-> PerftConfig.activation.
_ACT_FROM_REFERENCE = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu", "linear": "identity",
                       "identity": "identity"}
_ACT_TO_REFERENCE = {"silu": "silu", "relu": "relu", "gelu": "gelu", "identity": "linear"}
# PEFT LoRA options that change the computation; perft-jax's qv_lora implements none of them.
_PEFT_UNSUPPORTED = ("use_dora", "use_rslora", "fan_in_fan_out", "layers_to_transform", "modules_to_save",
                     "rank_pattern", "alpha_pattern", "lora_bias", "exclude_modules", "target_parameters",
                     "trainable_token_indices")


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One file tensor: its name, the NNX parameter it comes from, and which adapter slice (None: all of it)."""

    name: str
    path: tuple
    index: int | None
    shape: tuple[int, ...]  # PyTorch layout: the (slice of the) parameter, transposed


# ---------------------------------------------------------------------------------------------------------------
# Names


def _adapter_params(model: MoeForCausalLM) -> list[tuple[tuple, AdapterParam]]:
    return sorted(((tuple(p), v) for p, v in nnx.iter_graph(model) if isinstance(v, AdapterParam)),
                  key=lambda item: [str(k) for k in item[0]])


def _names_of(model: MoeForCausalLM, path: tuple, num: int) -> list[tuple[str, int | None]]:
    """Reference names of one adapter parameter, one per adapter slice (banks) or one for the whole."""
    moe = ARCHITECTURES[model.config.model_type].moe_prefix
    match path:
        case ("layers", int(layer), "moe", "adapters", "bank", ("lora_A" | "lora_B" | "adapter_w1" | "adapter_w2")
              as weight):
            branch = model.layers[layer].moe.adapters
            if isinstance(branch, EmbeddedAdapters):  # adapter e lives inside base expert e
                return [(f"model.layers.{layer}.{moe}.experts.{e}.embedded_routing_adapter.unit.{weight}.weight", e)
                        for e in range(num)]
            kind = "shared_routing_adapter" if isinstance(branch, RoutedAdapters) else "shared_adapter"
            return [(f"model.layers.{layer}.{moe}.{kind}.{j}.unit.{weight}.weight", j) for j in range(num)]
        case ("layers", int(layer), "moe", "adapters", "router"):
            return [(f"model.layers.{layer}.{moe}.shared_routing_adapter_gate.weight", None)]
        case ("layers", int(layer), "attn", ("q_lora" | "v_lora") as proj, ("lora_A" | "lora_B") as weight):
            # HF PEFT's saved names: the adapter name ("default") is stripped from `lora_A.default.weight`.
            return [(f"base_model.model.model.layers.{layer}.self_attn.{proj[0]}_proj.{weight}.weight", None)]
    raise NotImplementedError(f"no reference tensor name for adapter parameter {'/'.join(map(str, path))}")


def _entries(model: MoeForCausalLM) -> list[_Entry]:
    entries = []
    for path, var in _adapter_params(model):
        shape = tuple(var.shape)
        for name, index in _names_of(model, path, shape[0]):
            entries.append(_Entry(name, path, index, (shape[1:] if index is not None else shape)[::-1]))
    return entries


# ---------------------------------------------------------------------------------------------------------------
# What adapters a model carries


def _scale(value: float) -> float:
    # alpha / r recomputed from a reconstructed alpha may differ in the last bit; compare at 10 digits.
    return float(f"{value:.10g}")


def _signature(model: MoeForCausalLM) -> dict[str, dict[str, Any]]:
    """Everything that shapes the adapters' computation, per module path (dtypes excluded: loads cast)."""
    sig = {}
    for i, layer in enumerate(model.layers):
        branch = layer.moe.adapters
        if branch is not None:
            bank = branch.bank
            desc: dict[str, Any] = {"type": type(branch).__name__, "form": bank.form, "num": bank.num,
                                    "dropout": bank.dropout.rate}
            if bank.form == "lora":
                desc.update(scale=_scale(bank.scale), shape=tuple(bank.lora_A.shape))
            else:
                desc.update(activation=bank.activation, shape=tuple(bank.adapter_w1.shape))
            if isinstance(branch, RoutedAdapters):
                desc.update(top_k=branch.top_k, router=branch.kind, gate_weights=branch.gate_weights,
                            renormalize=branch.renormalize, dynmole=branch.dynmole, router_shape=branch.router.shape)
            elif isinstance(branch, EmbeddedAdapters):
                desc.update(top_k=branch.top_k)
            sig[f"layers/{i}/moe/adapters"] = desc
        for name in ("q_lora", "v_lora"):
            lora = getattr(layer.attn, name)
            if lora is not None:
                sig[f"layers/{i}/attn/{name}"] = {"scale": _scale(lora.scale), "dropout": lora.dropout.rate,
                                                  "A": tuple(lora.lora_A.shape), "B": tuple(lora.lora_B.shape)}
    return sig


def _abstract_attached(model_cfg: ModelConfig, cfg: PerftConfig, param_dtype) -> MoeForCausalLM:
    """The model `attach_perft` would build, as shapes only (no memory, no compute)."""
    return nnx.eval_shape(lambda: attach_perft(MoeForCausalLM(model_cfg, nnx.Rngs(0)), cfg, param_dtype=param_dtype))


def _check_matches(model: MoeForCausalLM, cfg: PerftConfig, where: str) -> None:
    want = _signature(_abstract_attached(model.config, cfg, jnp.float32))
    got = _signature(model)
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise UserError(f"{where}: the model carries adapters that differ from this config at {key}: "
                            f"model {got.get(key)}, config {want.get(key)}")


def perft_config_of(model: MoeForCausalLM) -> PerftConfig:
    """The PerftConfig that built `model`'s adapters, read back from the modules.

    The modules do not keep the settings that only training reads (`router_aux_loss_coef`,
    `base_router_aux_loss`, `init`, `router_init_std`); those come back as their defaults. Pass the config
    to `save_adapters(config=...)` to record them.
    """
    layer = model.layers[0]
    branch, lora = layer.moe.adapters, layer.attn.q_lora
    if lora is not None:
        r = lora.lora_A.shape[1]
        cfg = PerftConfig(variant="qv_lora", adapter="lora", bottleneck=r, lora_alpha=_scale(lora.scale * r),
                          dropout=lora.dropout.rate)
    elif branch is not None:
        bank = branch.bank
        fields: dict[str, Any] = {"adapter": bank.form, "dropout": bank.dropout.rate}
        if bank.form == "lora":
            fields.update(bottleneck=bank.lora_A.shape[2], lora_alpha=_scale(bank.scale * bank.lora_A.shape[2]))
        else:
            fields.update(bottleneck=bank.adapter_w1.shape[2], activation=bank.activation)
        if isinstance(branch, SharedAdapters):
            if bank.num == 1:
                fields.update(variant="perft_s")
            else:
                fields.update(variant="perft_d", num_adapters=bank.num)
        elif isinstance(branch, RoutedAdapters):
            fields.update(variant="perft_r", num_adapters=bank.num, top_k=branch.top_k, router=branch.kind,
                          adapter_gate_weights=branch.gate_weights, dynmole=branch.dynmole)
        else:
            fields.update(variant="perft_e")
        cfg = PerftConfig(**fields)
    else:
        raise UserError("save_adapters: the model carries no adapters (attach_perft or load_adapters first)")
    _check_matches(model, cfg, "save_adapters")  # every layer built the same way
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Configs


def _base_model(mcfg: ModelConfig) -> dict[str, Any]:
    return {key: getattr(mcfg, key) for key in (*BASE_MODEL_KEYS, "vocab_size", "norm_topk_prob")}


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _reference_config(cfg: PerftConfig) -> dict[str, Any]:
    """The reference code's config keys (spec/PERFT.md §6)."""
    if cfg.adapter == "lora":
        adapter_type = "LoRA"
        args = {"r": cfg.bottleneck, "lora_alpha": _number(cfg.lora_alpha), "lora_dropout": cfg.dropout}
    else:
        adapter_type = "Parallel_Adapter"
        args = {"hidden_dim": cfg.bottleneck, "hidden_act": _ACT_TO_REFERENCE[cfg.activation], "dropout": cfg.dropout}
    shared, routed = cfg.variant in ("perft_s", "perft_d"), cfg.variant == "perft_r"
    return {
        "adapter_type": adapter_type,
        "adapter_args": args,
        "shared_adapter": shared,
        "shared_adapter_num": (1 if cfg.variant == "perft_s" else cfg.num_adapters) if shared else 0,
        "shared_routing_adapter": routed,
        "shared_routing_adapter_num_experts": cfg.num_adapters if routed else 0,
        "shared_routing_adapter_num_experts_per_tok": cfg.top_k if routed else 0,
        "shared_routing_adapter_router_aux_loss_coef": cfg.router_aux_loss_coef,
        "embedded_routing_adapter": cfg.variant == "perft_e",
    }


def _peft_config(cfg: PerftConfig, base_model_name: str | None) -> dict[str, Any]:
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


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: missing adapter config")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable adapter config ({e.__class__.__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    return raw


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
        if act not in _ACT_FROM_REFERENCE:
            raise UserError(f"{path}: adapter_args.hidden_act: expected one of {sorted(_ACT_FROM_REFERENCE)}, "
                            f"got {act!r}")
        data = {"adapter": "parallel_adapter", "bottleneck": arg("hidden_dim"),
                "activation": _ACT_FROM_REFERENCE[act], "dropout": arg("dropout", 0.0)}
    else:
        raise UserError(f"{path}: adapter_type: expected 'LoRA' or 'Parallel_Adapter', got {adapter_type!r}")
    shared, routed = bool(raw.get("shared_adapter")), bool(raw.get("shared_routing_adapter"))
    embedded = bool(raw.get("embedded_routing_adapter"))
    if embedded and (shared or routed):
        raise UserError(f"{path}: embedded_routing_adapter together with shared_adapter / shared_routing_adapter "
                        "is not supported (perft-jax attaches one variant)")
    if shared:  # S/D take precedence over R, as in the reference code (spec/PERFT.md §3)
        num = raw.get("shared_adapter_num")
        if num == 1:
            data.update(variant="perft_s")
        else:
            data.update(variant="perft_d", num_adapters=num)
    elif routed:
        data.update(variant="perft_r", num_adapters=raw.get("shared_routing_adapter_num_experts"),
                    top_k=raw.get("shared_routing_adapter_num_experts_per_tok"))
        if "shared_routing_adapter_router_aux_loss_coef" in raw:
            data["router_aux_loss_coef"] = raw["shared_routing_adapter_router_aux_loss_coef"]
    elif embedded:
        data.update(variant="perft_e")
    else:
        raise UserError(f"{path}: no PERFT variant enabled (shared_adapter, shared_routing_adapter and "
                        "embedded_routing_adapter are all false)")
    return data


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
    raw = _read_json(path)
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


def _read_metadata(adapter_dir: pathlib.Path) -> tuple[pathlib.Path, dict[str, Any] | None]:
    """Our "perft_jax" metadata: from the config, else from the safetensors header (PEFT-format directories)."""
    config_path = adapter_dir / CONFIG_NAME
    raw = _read_json(config_path)
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


def _check_base_model(meta: dict[str, Any] | None, mcfg: ModelConfig, where: pathlib.Path) -> None:
    base = (meta or {}).get("base_model")
    if not isinstance(base, dict):
        return  # the reference code and PEFT do not record it; the tensor shapes are still checked
    for key in BASE_MODEL_KEYS:
        if key in base and base[key] != getattr(mcfg, key):
            raise UserError(f"{where}: perft_jax.base_model.{key} is {base[key]!r}, but the model has "
                            f"{getattr(mcfg, key)!r} (adapters trained on another base model)")


# ---------------------------------------------------------------------------------------------------------------
# Tensors


def _read_tensors(weights: pathlib.Path, entries: list[_Entry]) -> dict[tuple, np.ndarray]:
    """Every entry's tensor, strictly checked, assembled into our layout: {parameter path: array}."""
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
            tensors = {name: f.get_tensor(name) for name in expected}
    except safetensors.SafetensorError as e:
        raise UserError(f"{weights}: unreadable safetensors file ({e})") from None
    slices: dict[tuple, dict[int | None, np.ndarray]] = {}
    for name, e in expected.items():
        slices.setdefault(e.path, {})[e.index] = tensors[name].T
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
    meta_source, meta = _read_metadata(adapter_dir)
    _check_base_model(meta, model.config, meta_source)
    carried = has_adapters(model)
    if carried:
        _check_matches(model, cfg, str(adapter_dir / CONFIG_NAME))
        target = model
    else:
        try:
            target = _abstract_attached(model.config, cfg, param_dtype)
        except UserError as e:  # e.g. top_k above the base top-k for base_router_rank
            raise UserError(f"{adapter_dir / CONFIG_NAME}: {e}") from None
    arrays = _read_tensors(adapter_dir / WEIGHTS_NAME, _entries(target))
    if not carried:
        attach_perft(model, cfg, param_dtype=param_dtype)
    for path, var in _adapter_params(model):
        old = var.get_value()
        value = arrays[path].astype(var.dtype)
        # Keep the parameter where it was placed (sharded or on one device).
        var.set_value(jax.device_put(value, old.sharding) if isinstance(old, jax.Array) else jnp.asarray(value))
    return model


# ---------------------------------------------------------------------------------------------------------------
# Saving


def _replace_dir(out: pathlib.Path, write, overwrite: bool) -> None:
    """Write into a fresh sibling directory, then rename it into place: a crash never leaves half a directory."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out}: exists and is not a directory")
        if not overwrite:
            raise UserError(f"{out}: exists (pass overwrite=True to replace it)")
        others = sorted(p.name for p in out.iterdir() if p.name not in (WEIGHTS_NAME, CONFIG_NAME))
        if others:  # never delete what we did not write
            raise UserError(f"{out}: exists and holds {others[0]}, which is not an adapter file; not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:12]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_adapters(model: MoeForCausalLM, out_dir: str | os.PathLike, extra_config: dict[str, Any] | None = None,
                  *, config: PerftConfig | None = None, overwrite: bool = False) -> pathlib.Path:
    """Write `model`'s adapters (only they train) to `out_dir` as safetensors + adapter_config.json.

    PERFT variants get the reference names and config keys (spec/PERFT.md §6) plus "perft_jax": the full
    PerftConfig, the base model's description and `extra_config`. `qv_lora` is written in HF PEFT's LoRA
    format. In a multi-process run, call it from one process only.

    Args:
      model: a model carrying adapters.
      out_dir: the adapter directory, created with its parents.
      extra_config: JSON-serialisable keys stored under "perft_jax" (e.g. training step, data set);
        `base_model_name_or_path` also goes to the PEFT config.
      config: the PerftConfig the adapters were attached with; it must match them. Default: the model's
        `perft_config` attribute if set, else read back from the modules (see `perft_config_of`).
      overwrite: replace an existing `out_dir`, as a whole; refused if it holds anything but adapter files.
    """
    out = pathlib.Path(out_dir)
    if not has_adapters(model):
        raise UserError("save_adapters: the model carries no adapters (attach_perft or load_adapters first)")
    cfg = config or getattr(model, "perft_config", None)
    if cfg is None:
        cfg = perft_config_of(model)
    else:
        _check_matches(model, cfg, "save_adapters(config=...)")
    extra = dict(extra_config or {})
    reserved = sorted({"format_version", "perft", "base_model"} & set(extra))
    if reserved:
        raise UserError(f"save_adapters: extra_config key {reserved[0]!r} is reserved")
    meta = {"format_version": FORMAT_VERSION, "perft": to_dict(cfg), "base_model": _base_model(model.config), **extra}
    try:
        meta_text = json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise UserError(f"save_adapters: extra_config is not JSON-serialisable ({e})") from None
    if cfg.variant == "qv_lora":
        config_json = _peft_config(cfg, extra.get("base_model_name_or_path"))
    else:
        config_json = {**_reference_config(cfg), "perft_jax": meta}
    tensors = {}
    values = {path: np.asarray(jax.device_get(var.get_value())) for path, var in _adapter_params(model)}
    for e in _entries(model):
        value = values[e.path]
        tensors[e.name] = np.ascontiguousarray((value if e.index is None else value[e.index]).T)

    def write(tmp: pathlib.Path) -> None:
        # "format": "pt" lets transformers / PEFT read the file; our metadata rides beside it.
        safetensors.numpy.save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", "perft_jax": meta_text})
        (tmp / CONFIG_NAME).write_text(json.dumps(config_json, indent=2) + "\n")

    _replace_dir(out, write, overwrite)
    return out


__all__ = ["load_adapters", "perft_config_of", "read_adapter_config", "save_adapters"]
