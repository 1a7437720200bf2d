"""Multinomial sampling for `generate`: temperature, top-k and top-p warpers as transformers 5.23 applies them.

HF `GenerationMixin._get_logits_processor` (do_sample=True, one beam, so `min_tokens_to_keep=1`) runs, in order:

1. `TemperatureLogitsWarper`: `scores / temperature` (float32; skipped by HF at 1.0, where it is the identity);
2. `TopKLogitsWarper`: scores below the k-th largest become -inf (ties with it stay; `top_k=0` disables);
3. `TopPLogitsWarper`: scores sorted ascending, softmax, cumulative sum; a token whose cumulative probability is
   `<= 1 - top_p` becomes -inf, the most probable token always stays (`top_p >= 1` disables);

then `_sample` draws from `softmax(scores)`. Here the draw is `jax.random.categorical` on the warped scores
(Gumbel-max: the same distribution; -inf scores are never drawn).

Every setting is data (`SamplingSettings`, a pytree of scalars), so one compilation serves every temperature,
top-k, top-p and seed. Each row draws from its own stream, `fold_in(fold_in(key(seed), stream), step)`: a row's
tokens depend on the seed, its stream id and nothing else (not on the batch it shares or the padding around it).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from perft_jax.errors import UserError

# HF GenerationConfig defaults for sampling (transformers 5.23 `_get_default_generation_params`).
DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P = 1.0, 50, 1.0


class SamplingSettings(NamedTuple):
    """The warpers' settings as device scalars (a pytree: changing them does not recompile).

    temperature: float32 scalar > 0.
    top_k: int32 scalar; 0 keeps every token.
    p_cutoff: float32 scalar `1 - top_p` (computed in float64 as HF's Python float is, then rounded once, as torch
        rounds it for the comparison), or -1 when top-p is off (no cumulative probability is <= -1).
    key: the typed PRNG key of the seed.
    """

    temperature: jax.Array
    top_k: jax.Array
    p_cutoff: jax.Array
    key: jax.Array


def check_settings(temperature: float, top_k: int, top_p: float, seed: int) -> None:
    """HF's checks of the warpers' arguments, plus an integer seed.

    Raises:
        UserError: temperature <= 0, a negative or non-integer top_k, top_p outside [0, 1], a non-integer seed.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise UserError(f"temperature must be a number > 0 (use greedy decoding for 0), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise UserError(f"top_k must be an integer >= 0 (0: no top-k filter), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 <= top_p <= 1.0:
        raise UserError(f"top_p must be a number in [0, 1] (1: no top-p filter), got {top_p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be an integer, got {seed!r}")


def sampling_settings(temperature: float = DEFAULT_TEMPERATURE, top_k: int = DEFAULT_TOP_K,
                      top_p: float = DEFAULT_TOP_P, seed: int = 0) -> SamplingSettings:
    """Checked settings (`check_settings`; HF's defaults: top_k 50, top_p 1, temperature 1) as device scalars."""
    check_settings(temperature, top_k, top_p, seed)
    cutoff = 1.0 - float(top_p) if top_p < 1.0 else -1.0
    top_k = min(top_k, 2**31 - 1)  # any k above the vocabulary keeps every token; int32 holds them all
    return SamplingSettings(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(cutoff), jax.random.key(seed))


def top_k_mask(scores: jax.Array, top_k: jax.Array) -> jax.Array:
    """Tokens `TopKLogitsWarper` removes: scores [B, V] below the k-th largest of their row; bool [B, V]."""
    vocab = scores.shape[-1]
    k = jnp.where(top_k > 0, jnp.clip(top_k, 1, vocab), vocab)  # HF: max(top_k, min_tokens_to_keep), min(., V)
    kth = jnp.take(jnp.sort(scores, axis=-1), vocab - k, axis=-1)[..., None]  # ascending: the k-th largest
    return scores < kth


def top_p_mask(scores: jax.Array, p_cutoff: jax.Array) -> jax.Array:
    """Tokens `TopPLogitsWarper` removes from scores [B, V]; bool [B, V]."""
    order = jnp.argsort(scores, axis=-1)  # ascending, as HF's torch.sort(descending=False)
    ranked = jnp.take_along_axis(scores, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1)
    remove = (cumulative <= p_cutoff).at[..., -1].set(False)  # min_tokens_to_keep=1: the most probable stays
    # Back to vocabulary order (HF's scatter with the sort indices).
    return jnp.take_along_axis(remove, jnp.argsort(order, axis=-1), axis=-1)


def warp(scores: jax.Array, settings: SamplingSettings) -> jax.Array:
    """float32 scores [B, V] after temperature, top-k and top-p, in HF's order; removed tokens are -inf."""
    scores = scores.astype(jnp.float32)
    # HF divides; XLA rewrites a division by a broadcast scalar into a multiplication by its reciprocal (off by
    # an ulp for many values), unless the broadcast is opaque to its simplifier.
    scores = scores / jax.lax.optimization_barrier(jnp.broadcast_to(settings.temperature, scores.shape))
    scores = jnp.where(top_k_mask(scores, settings.top_k), -jnp.inf, scores)
    return jnp.where(top_p_mask(scores, settings.p_cutoff), -jnp.inf, scores)


def row_keys(settings: SamplingSettings, streams: jax.Array) -> jax.Array:
    """One key per row [B] from the seed's key and each row's stream id [B] int32."""
    return jax.vmap(lambda s: jax.random.fold_in(settings.key, s))(streams)


def sample(keys: jax.Array, step: jax.Array, scores: jax.Array, settings: SamplingSettings) -> jax.Array:
    """One token per row [B] int32, drawn from softmax(warp(scores)) with each row's key [B] at `step`."""
    warped = warp(scores, settings)
    draw = jax.vmap(lambda key, row: jax.random.categorical(jax.random.fold_in(key, step), row))
    return draw(keys, warped).astype(jnp.int32)
