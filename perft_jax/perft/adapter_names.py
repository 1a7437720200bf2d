"""Which adapters a model carries, under which reference tensor names (spec/PERFT.md §6).

Every `AdapterParam` of a model maps to one or more file tensors: a bank of M stacked adapters to M tensors named
as the reference code's patched modeling files name them (`model.layers.L.mlp.shared_adapter.j.unit.lora_A.weight`,
`block_sparse_moe` for Mixtral), qv LoRA to HF PEFT's names. `signature` describes everything that shapes the
adapters' computation, so that a config and a model (or two models) can be checked to carry the same adapters.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from perft_jax.errors import UserError
from perft_jax.models import ARCHITECTURES
from perft_jax.models.config import ModelConfig
from perft_jax.models.decoder import MoeForCausalLM
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.attach import attach_perft
from perft_jax.perft.branches import EmbeddedAdapters, RoutedAdapters, SharedAdapters
from perft_jax.perft.config import PerftConfig


@dataclasses.dataclass(frozen=True)
class Entry:
    """One file tensor: its name, the NNX parameter it comes from, and which adapter slice (None: all of it)."""

    name: str
    path: tuple
    index: int | None
    shape: tuple[int, ...]  # PyTorch layout: the (slice of the) parameter, transposed


def adapter_params(model: MoeForCausalLM) -> list[tuple[tuple, AdapterParam]]:
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


def file_entries(model: MoeForCausalLM) -> list[Entry]:
    entries = []
    for path, var in adapter_params(model):
        shape = tuple(var.shape)
        for name, index in _names_of(model, path, shape[0]):
            entries.append(Entry(name, path, index, (shape[1:] if index is not None else shape)[::-1]))
    return entries


def _scale(value: float) -> float:
    # alpha / r recomputed from a reconstructed alpha may differ in the last bit; compare at 10 digits.
    return float(f"{value:.10g}")


def signature(model: MoeForCausalLM) -> dict[str, dict[str, Any]]:
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


def abstract_attached(model_cfg: ModelConfig, cfg: PerftConfig, param_dtype) -> MoeForCausalLM:
    """The model `attach_perft` would build, as shapes only (no memory, no compute)."""
    return nnx.eval_shape(lambda: attach_perft(MoeForCausalLM(model_cfg, nnx.Rngs(0)), cfg, param_dtype=param_dtype))


def check_matches(model: MoeForCausalLM, cfg: PerftConfig, where: str) -> None:
    want = signature(abstract_attached(model.config, cfg, jnp.float32))
    got = signature(model)
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
    check_matches(model, cfg, "save_adapters")  # every layer built the same way
    return cfg
