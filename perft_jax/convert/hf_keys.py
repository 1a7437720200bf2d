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
import functools
from typing import Callable, Protocol, Sequence

import jax
import numpy as np

from perft_jax.checkpoint import base as base_ckpt
from perft_jax.models.architecture import Architecture
from perft_jax.models.config import ModelConfig

Path = tuple  # a path in the model's pure-dict state, e.g. ("layers", 0, "attn", "q_proj", "kernel")


class HFTensors(Protocol):
    """The HF tensors of one TensorMap (in `hf_keys` order), read lazily: indexing reads one whole tensor,
    `rows(i, start, stop)` only rows [start, stop) of tensor i's first axis."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...

    def rows(self, index: int, start: int, stop: int) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class TensorMap:
    path: Path
    hf_keys: tuple[str, ...]
    to_jax: Callable[[Sequence[np.ndarray]], np.ndarray]  # HF tensors (in hf_keys order) -> our array
    to_hf: Callable[[np.ndarray], Sequence[np.ndarray]]  # our array -> HF tensors (hf_keys order)
    shape: tuple[int, ...]  # our array's shape
    # Expert stacks only: (HF tensors, start, stop) -> rows [start, stop) of our array, reading only the
    # experts in that range, so a converter can write a stack block by block (issue 6: peak memory).
    to_jax_rows: Callable[[HFTensors, int, int], np.ndarray] | None = None


def _one(fn):
    return lambda arrays: fn(arrays[0])


@functools.cache
def _jit_transpose():
    return jax.jit(lambda a: a.T)


def transpose(a: np.ndarray) -> np.ndarray:
    """`a.T` of a 2-D array as a new C-contiguous (read-only) array, transposed by XLA on the CPU (also
    where an accelerator is the default device): numpy's strided copy moves 2-byte dtypes at about a third
    of XLA's speed (benchmarks/RESULTS.md, converter). A 64-byte aligned `a` is used in place."""
    return np.asarray(_jit_transpose()(jax.device_put(a, jax.local_devices(backend="cpu")[0])))


def _copy(path, key, shape):
    return TensorMap(path, (key,), _one(lambda a: a), lambda a: (a,), shape)


def _transposed(path, key, shape):
    return TensorMap(path, (key,), _one(transpose), lambda a: (a.T,), shape)


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

        def fused_rows(arrays, start, stop):  # rows of [E, out, in] -> rows of [E, in, out]
            block = arrays.rows(0, start, stop)
            out = np.empty((stop - start, block.shape[2], block.shape[1]), block.dtype)
            for x in range(stop - start):
                out[x] = transpose(block[x])
            return out

        return [
            TensorMap(base + ("gate_up",), (f"{prefix}.gate_up_proj",), _one(lambda a: a.transpose(0, 2, 1)),
                      lambda a: (a.transpose(0, 2, 1),), (e, d, 2 * i), fused_rows),
            TensorMap(base + ("down",), (f"{prefix}.down_proj",), _one(lambda a: a.transpose(0, 2, 1)),
                      lambda a: (a.transpose(0, 2, 1),), (e, i, d), fused_rows),
        ]
    gate, up, down = arch.expert_proj_names
    prefix = f"model.layers.{layer}.{arch.moe_prefix}.experts"
    gate_up_keys = tuple(k for x in range(e) for k in (f"{prefix}.{x}.{gate}.weight", f"{prefix}.{x}.{up}.weight"))

    # Experts are copied one at a time into a preallocated block, so that with a lazy `arrays`
    # (see convert/hf_to_jax.py) host memory holds the block plus a single expert matrix.
    def gate_up_rows(arrays, start, stop):  # [gate_0, up_0, gate_1, up_1, ...], each (I, D) -> (stop-start, D, 2I)
        out = None
        for x in range(start, stop):
            gate_x = arrays[2 * x]
            out = np.empty((stop - start, d, 2 * i), gate_x.dtype) if out is None else out
            out[x - start, :, :i] = transpose(gate_x)
            out[x - start, :, i:] = transpose(arrays[2 * x + 1])
        return out

    def down_rows(arrays, start, stop):  # e arrays (D, I) -> (stop-start, I, D)
        out = None
        for x in range(start, stop):
            down_x = arrays[x]
            out = np.empty((stop - start, i, d), down_x.dtype) if out is None else out
            out[x - start] = transpose(down_x)
        return out

    def gate_up_to_hf(a):
        return [m for x in range(e) for m in (a[x, :, :i].T, a[x, :, i:].T)]

    return [
        TensorMap(base + ("gate_up",), gate_up_keys, lambda arrays: gate_up_rows(arrays, 0, e), gate_up_to_hf,
                  (e, d, 2 * i), gate_up_rows),
        TensorMap(base + ("down",), tuple(f"{prefix}.{x}.{down}.weight" for x in range(e)),
                  lambda arrays: down_rows(arrays, 0, e), lambda a: [m.T for m in a], (e, i, d), down_rows),
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


def group_plan(cfg: ModelConfig, arch: Architecture, fused_experts: bool = False) -> list[tuple[str, list[TensorMap]]]:
    """Every tensor map, by checkpoint group (checkpoint/base.py `group_names`): embed, layer_000 ..., head; in
    `save_pretrained` order. The converter writes, the exporter and the converter benchmark read this one plan."""
    names = base_ckpt.group_names(cfg)
    layers = [(names[1 + i], layer_maps(cfg, arch, i, fused_experts)) for i in range(cfg.num_layers)]
    return [(names[0], embed_maps(cfg)), *layers, (names[-1], head_maps(cfg))]
