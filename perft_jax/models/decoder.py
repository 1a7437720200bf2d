"""The MoE decoder LM shared by OLMoE and Mixtral: embed -> N x (attention, MoE) -> norm -> LM head.

`MoeForCausalLM(input_ids, attention_mask=None)` returns an :class:`MoeLMOutput` whose `logits` equal
the HF PyTorch model's (HF's default positions `arange(T)` are used even for padded rows, so the
padded positions of a left-padded batch see the same rotary phases as in HF).

Incremental decoding passes an explicit, functional :class:`KVCache` (`init_cache`) in and gets the updated
one back in `MoeLMOutput.cache`: a prefill writes the (left-padded) prompt, each decode step appends tokens.
With a cache, positions default to those of HF `generate` (cumsum of the attention mask - 1), so a left-padded
row continues at its own real length.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from perft_jax.models.config import ModelConfig
from perft_jax.models.layers import Attention, Embed, Linear, RMSNorm, cached_causal_mask, causal_mask, rope_tables
from perft_jax.models.moe.block import SparseMoeBlock


@flax.struct.dataclass
class KVCache:
    """Per-layer attention keys/values of the tokens decoded so far (a pytree: jit, scan and gather it freely).

    Slots are columns of the padded batch: slot s of every row holds that row's s-th input column, so a
    left-padded prompt puts its padding in the leading slots (masked by `key_mask`). All rows advance together.

    Attributes:
        k, v: per layer, [B, S, kv_heads, head_dim] in the cache dtype; S = the cache budget in slots.
        key_mask: [B, S] bool, slots holding a real (non-padding) token.
        length: int32 scalar, slots [0, length) are written; the next call writes from `length`.
        positions: [B] int32, the position id of each row's next real token (= its real tokens so far).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    key_mask: jax.Array
    length: jax.Array
    positions: jax.Array

    @property
    def max_len(self) -> int:
        return self.key_mask.shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache of `max_len` slots for `batch` rows; `dtype` defaults to the compute dtype.

    Made inside a jitted decode loop, it takes the loop's placement. Made outside, `jax.device_put` it where the
    model lives: calls that return a committed cache would otherwise compile once more on their second call.
    """
    dtype = cfg.jnp_dtype if dtype is None else dtype
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   key_mask=jnp.zeros((batch, max_len), bool), length=jnp.zeros((), jnp.int32),
                   positions=jnp.zeros((batch,), jnp.int32))


@flax.struct.dataclass
class MoeLMOutput:
    logits: jax.Array  # [B, T, V] ([B, logits_to_keep, V] when asked for the last positions only)
    router_logits: jax.Array  # [L, B, T, E], the base routers' logits of every layer
    dropped_tokens: jax.Array  # [L] int32, (token, expert) pairs dropped by a capacity backend
    adapter_router_logits: jax.Array | None = None  # [L, B, T, M] PERFT-R routers' logits, if attached
    cache: KVCache | None = None  # the updated cache, when one was passed in


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dispatch=None, sharded: bool = False):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.attn = Attention(cfg, rngs, sharded)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.moe = SparseMoeBlock(cfg, rngs, dispatch)

    def __call__(self, x, cos, sin, mask, kv_cache=None, cache_index=None):
        """(x, aux) without a cache; (x, aux, updated (k, v)) with `kv_cache` (see `Attention`)."""
        if kv_cache is None:
            x = x + self.attn(self.input_norm(x), cos, sin, mask)
        else:
            attn_out, kv_cache = self.attn(self.input_norm(x), cos, sin, mask, kv_cache, cache_index)
            x = x + attn_out
        moe_out, aux = self.moe(self.post_attn_norm(x))
        return (x + moe_out, aux) if kv_cache is None else (x + moe_out, aux, kv_cache)


# Activations inside a layer are recomputed in the backward pass; only layer inputs are kept.
_remat_layer = nnx.remat(lambda layer, x, cos, sin, mask: layer(x, cos, sin, mask))


class MoeForCausalLM(nnx.Module):
    """The decoder. How it is laid out over devices is fixed at construction (build.py passes both):
    `dispatch`, how every MoE layer runs its experts (models/moe/experts.py `Experts`; default: the configured
    backend on one program, or expert parallelism over a mesh, models/moe/ep.py), and `sharded`, whether the
    model runs partitioned over several devices (the attention kernels ask, models/attention.py)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dispatch=None, sharded: bool = False):
        self.config = cfg
        self.embed = Embed(cfg, rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs, dispatch, sharded) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg, rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, cache: KVCache | None = None,
                 logits_to_keep: int | None = None) -> MoeLMOutput:
        """Logits of the next token at every input position.

        Args:
            input_ids: [B, T] int.
            attention_mask: [B, T] (1 = token, 0 = padding) for these T tokens; with a cache, the earlier
                tokens' mask is the cache's `key_mask`.
            position_ids: [B, T]. Default without a cache: `arange(T)` (HF forward); with a cache:
                `cache.positions + cumsum(attention_mask) - 1`, padding at 0 (HF `generate`).
            cache: a `KVCache` (`init_cache`); these T tokens are written at slots [length, length + T), which
                must fit in its budget (not checkable under jit: `dynamic_update_slice` would clamp).
            logits_to_keep: compute the LM head on the last `logits_to_keep` positions only (a prefill needs
                one; the full [B, T, V] logits of a long prompt would be the largest array).
        Returns:
            MoeLMOutput; `cache` holds the updated cache when one was given.
        """
        cfg = self.config
        b, t = input_ids.shape
        kv, index, new_cache = [None] * cfg.num_layers, None, None
        if cache is None:
            if position_ids is None:
                position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
            mask = causal_mask(attention_mask, b, t, cfg.sliding_window)
        else:
            new_cache, position_ids, mask = _cache_step(cache, attention_mask, position_ids, b, t, cfg)
            kv, index = list(zip(cache.k, cache.v)), cache.length
        x = self.embed(input_ids)
        cos, sin = rope_tables(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        auxes = []
        for i, layer in enumerate(self.layers):
            if cache is None and cfg.remat:
                x, aux = _remat_layer(layer, x, cos, sin, mask)
            elif cache is None:
                x, aux = layer(x, cos, sin, mask)
            else:
                x, aux, kv[i] = layer(x, cos, sin, mask, kv[i], index)
            auxes.append(aux)
        if logits_to_keep is not None:
            x = x[:, -logits_to_keep:]
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        if new_cache is not None:
            new_cache = new_cache.replace(k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv))
        adapter_logits = [a.adapter_router_logits for a in auxes if a.adapter_router_logits is not None]
        return MoeLMOutput(logits=logits, router_logits=jnp.stack([a.router_logits for a in auxes]),
                           dropped_tokens=jnp.stack([a.dropped for a in auxes]),
                           adapter_router_logits=jnp.stack(adapter_logits) if adapter_logits else None,
                           cache=new_cache)


def _cache_step(cache: KVCache, attention_mask: jax.Array | None, position_ids: jax.Array | None, b: int, t: int,
                cfg: ModelConfig) -> tuple[KVCache, jax.Array, jax.Array]:
    """The cache after T new tokens (k/v still to be written by the layers), their positions and mask."""
    if cache.key_mask.shape[0] != b:
        raise ValueError(f"cache has {cache.key_mask.shape[0]} rows but input_ids has {b}")
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
    if attention_mask.shape != (b, t):
        raise ValueError(f"with a cache, attention_mask covers the new tokens only: expected {(b, t)}, "
                         f"got {attention_mask.shape}")
    real = attention_mask.astype(jnp.int32)
    if position_ids is None:
        # HF generate: cumsum(mask) - 1, padding filled with 0; later tokens continue from the last real one.
        position_ids = jnp.where(real == 1, cache.positions[:, None] + jnp.cumsum(real, axis=1) - 1, 0)
    key_mask = jax.lax.dynamic_update_slice(cache.key_mask, real.astype(bool), (0, cache.length))
    mask = cached_causal_mask(key_mask, cache.length, t, cfg.sliding_window)
    new_cache = cache.replace(key_mask=key_mask, length=cache.length + t,
                              positions=cache.positions + real.sum(axis=1, dtype=jnp.int32))
    return new_cache, position_ids, mask


def init_model(cfg: ModelConfig, seed: int = 0, dispatch=None, sharded: bool = False) -> MoeForCausalLM:
    """A randomly initialised model (tests, benchmarks, the demo's tiny base), committed to the first local
    device like a restored one: a jitted step writes its state back committed, and uncommitted inputs on the
    first call would compile the step a second time."""
    model = MoeForCausalLM(cfg, nnx.Rngs(seed), dispatch, sharded)
    nnx.update(model, jax.device_put(nnx.state(model), jax.local_devices()[0]))
    return model


def abstract_model(cfg: ModelConfig, dispatch=None, sharded: bool = False) -> MoeForCausalLM:
    """The model's structure with `ShapeDtypeStruct` leaves: no memory, no compute."""
    return nnx.eval_shape(lambda: MoeForCausalLM(cfg, nnx.Rngs(0), dispatch, sharded))
