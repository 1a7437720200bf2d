"""Which adapters a model carries, under which reference tensor names (spec/PERFT.md §6).

Every `AdapterParam` of a model maps to one or more file tensors: a bank of M stacked adapters to M tensors named
as the reference code's patched modeling files name them (`model.layers.L.mlp.shared_adapter.j.unit.lora_A.weight`,
`block_sparse_moe` for Mixtral; the variant's own name, perft/variants.py), qv LoRA to HF PEFT's names.
"""
from __future__ import annotations

import dataclasses

from flax import nnx

from perft_jax.models import ARCHITECTURES
from perft_jax.models.config import ModelConfig
from perft_jax.models.decoder import MoeForCausalLM
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.attach import attach_perft
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.variants import VARIANTS


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
            variant = VARIANTS[model.perft_config.variant]
            return [(variant.tensor_name(moe, layer, weight, j), j) for j in range(num)]
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


def abstract_attached(model_cfg: ModelConfig, cfg: PerftConfig, param_dtype) -> MoeForCausalLM:
    """The model `attach_perft` would build, as shapes only (no memory, no compute)."""
    return nnx.eval_shape(lambda: attach_perft(MoeForCausalLM(model_cfg, nnx.Rngs(0)), cfg, param_dtype=param_dtype))
