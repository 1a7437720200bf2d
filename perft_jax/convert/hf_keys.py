"""Where every parameter of :class:`MoeForCausalLM` lives in a Hugging Face checkpoint, and how to move it.

A :class:`TensorMap` ties one JAX parameter (a path in the NNX state) to the HF tensors it is made of,
with a function each way. Torch `Linear` weights are (out, in) and our kernels (in, out), so most maps
are a transpose; expert weights are stacked over the expert axis and gate/up fused (gate first).

Both expert layouts are supported on import:
- per-expert (hub files, default `save_pretrained`): `<moe>.experts.{e}.{gate,up,down}` (Mixtral: w1, w3, w2);
- fused (transformers >= 5 in memory): `mlp.experts.gate_up_proj` [E, 2I, D] and `mlp.experts.down_proj` [E, D, I].
Export always writes the per-expert layout, which every transformers version loads.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from perft_jax.models.architecture import Architecture
from perft_jax.models.config import ModelConfig

Path = tuple  # a path in the model's pure-dict state, e.g. ("layers", 0, "attn", "q_proj", "kernel")


@dataclasses.dataclass(frozen=True)
class TensorMap:
    path: Path
    hf_keys: tuple[str, ...]
    to_jax: Callable[[Sequence[np.ndarray]], np.ndarray]  # HF tensors (in hf_keys order) -> our array
    to_hf: Callable[[np.ndarray], Sequence[np.ndarray]]  # our array -> HF tensors (hf_keys order)
    shape: tuple[int, ...]  # our array's shape


def _one(fn):
    return lambda arrays: fn(arrays[0])


def _copy(path, key, shape):
    return TensorMap(path, (key,), _one(lambda a: a), lambda a: (a,), shape)


def _transposed(path, key, shape):
    return TensorMap(path, (key,), _one(lambda a: a.T), lambda a: (a.T,), shape)


def embed_maps(cfg: ModelConfig) -> list[TensorMap]:
    return [_copy(("embed", "embedding"), "model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))]


def head_maps(cfg: ModelConfig) -> list[TensorMap]:
    maps = [_copy(("final_norm", "scale"), "model.norm.weight", (cfg.hidden_size,))]
    if not cfg.tie_word_embeddings:
        maps.append(_transposed(("lm_head", "kernel"), "lm_head.weight", (cfg.hidden_size, cfg.vocab_size)))
    return maps


def _expert_maps(cfg: ModelConfig, arch: Architecture, layer: int, fused: bool) -> list[TensorMap]:
    e, d, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    base = ("layers", layer, "moe", "experts")
    if fused:
        prefix = f"model.layers.{layer}.mlp.experts"
        return [
            TensorMap(base + ("gate_up",), (f"{prefix}.gate_up_proj",),
                      _one(lambda a: a.transpose(0, 2, 1)), lambda a: (a.transpose(0, 2, 1),), (e, d, 2 * i)),
            TensorMap(base + ("down",), (f"{prefix}.down_proj",),
                      _one(lambda a: a.transpose(0, 2, 1)), lambda a: (a.transpose(0, 2, 1),), (e, i, d)),
        ]
    gate, up, down = arch.expert_proj_names
    prefix = f"model.layers.{layer}.{arch.moe_prefix}.experts"
    gate_up_keys = tuple(k for x in range(e) for k in (f"{prefix}.{x}.{gate}.weight", f"{prefix}.{x}.{up}.weight"))

    # Experts are copied one at a time into a preallocated stack, so that with a lazy `arrays`
    # (see convert/hf_to_jax.py) host memory holds the stack plus a single expert matrix.
    def gate_up_to_jax(arrays):  # [gate_0, up_0, gate_1, up_1, ...], each (I, D) -> (E, D, 2I)
        out = None
        for x in range(e):
            gate_x = arrays[2 * x]
            out = np.empty((e, d, 2 * i), gate_x.dtype) if out is None else out
            out[x, :, :i] = gate_x.T
            out[x, :, i:] = arrays[2 * x + 1].T
        return out

    def down_to_jax(arrays):  # e arrays (D, I) -> (E, I, D)
        out = None
        for x in range(e):
            down_x = arrays[x]
            out = np.empty((e, i, d), down_x.dtype) if out is None else out
            out[x] = down_x.T
        return out

    def gate_up_to_hf(a):
        return [m for x in range(e) for m in (a[x, :, :i].T, a[x, :, i:].T)]

    return [
        TensorMap(base + ("gate_up",), gate_up_keys, gate_up_to_jax, gate_up_to_hf, (e, d, 2 * i)),
        TensorMap(base + ("down",), tuple(f"{prefix}.{x}.{down}.weight" for x in range(e)),
                  down_to_jax, lambda a: [m.T for m in a], (e, i, d)),
    ]


def layer_maps(cfg: ModelConfig, arch: Architecture, layer: int, fused_experts: bool = False) -> list[TensorMap]:
    d, hd = cfg.hidden_size, cfg.head_dim
    hf = f"model.layers.{layer}"
    ours = ("layers", layer)
    maps = [
        _copy(ours + ("input_norm", "scale"), f"{hf}.input_layernorm.weight", (d,)),
        _copy(ours + ("post_attn_norm", "scale"), f"{hf}.post_attention_layernorm.weight", (d,)),
        _transposed(ours + ("attn", "q_proj", "kernel"), f"{hf}.self_attn.q_proj.weight", (d, cfg.num_heads * hd)),
        _transposed(ours + ("attn", "k_proj", "kernel"), f"{hf}.self_attn.k_proj.weight", (d, cfg.num_kv_heads * hd)),
        _transposed(ours + ("attn", "v_proj", "kernel"), f"{hf}.self_attn.v_proj.weight", (d, cfg.num_kv_heads * hd)),
        _transposed(ours + ("attn", "o_proj", "kernel"), f"{hf}.self_attn.o_proj.weight", (cfg.num_heads * hd, d)),
    ]
    if cfg.qk_norm:
        maps += [
            _copy(ours + ("attn", "q_norm", "scale"), f"{hf}.self_attn.q_norm.weight", (cfg.num_heads * hd,)),
            _copy(ours + ("attn", "k_norm", "scale"), f"{hf}.self_attn.k_norm.weight", (cfg.num_kv_heads * hd,)),
        ]
    # The fused layout renamed Mixtral's `block_sparse_moe` to `mlp` (ENGINEERING.md §6).
    router_prefix = "mlp" if fused_experts else arch.moe_prefix
    maps.append(_transposed(ours + ("moe", "router", "kernel"), f"{hf}.{router_prefix}.gate.weight",
                            (d, cfg.num_experts)))
    return maps + _expert_maps(cfg, arch, layer, fused_experts)


def hf_shapes(tmap: TensorMap) -> list[tuple[int, ...]]:
    """The HF shapes of `tmap.hf_keys`, derived by running `to_hf` on a zero-stride dummy (no memory)."""
    dummy = np.broadcast_to(np.zeros((), np.float32), tmap.shape)
    return [tuple(a.shape) for a in tmap.to_hf(dummy)]


# Buffers some older checkpoints carry that have no parameter behind them.
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)
