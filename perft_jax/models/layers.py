"""Building blocks shared by every decoder: linear maps, embeddings, RMSNorm, RoPE, attention.

Numerics follow Hugging Face's PyTorch implementations (modeling_olmoe.py / modeling_mixtral.py):
RMSNorm statistics in float32, softmax in float32, RoPE tables in float32 cast to the compute dtype.
Every parameter carries logical axis names (`axes` metadata) that the sharding rules map to mesh axes.
`Attention` optionally reads and writes a per-layer KV cache (decoding; see decoder.KVCache).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from perft_jax.models.attention import MaskForm, attend
from perft_jax.models.config import ModelConfig


def normal_init(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


def _contract(x: jax.Array, w: jax.Array, x_dim: int, w_dim: int, batch: int = 0) -> jax.Array:
    """x and w contracted over one dimension each (their first `batch` dimensions paired), in float32."""
    b = tuple(range(batch))
    return jax.lax.dot_general(x, w, (((x_dim,), (w_dim,)), (b, b)), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, transpose_w: bool = False) -> jax.Array:
    """x [..., K] @ w [K, N] (w [N, K] with `transpose_w`) -> [..., N] in x's dtype, accumulated in float32.
    With a stacked w [E, K, N] (the experts), x is [E, C, K] and each of the E products is taken separately.

    Every matmul against a base weight goes through here. Numerically it is the plain product (bfloat16 inputs
    accumulate in float32 and round once, as XLA's and PyTorch's bfloat16 matmuls do; float32 is unchanged).
    The custom VJP exists for memory: XLA:CPU runs bfloat16 dots natively only with a float32 result, and
    upcasts every bfloat16 transpose, so JAX's own derivative (a float32 cotangent against a bfloat16 `w`,
    or a transposed `w`) made XLA convert each whole weight to float32 and keep that copy from the forward to
    the backward: 2x the bfloat16 base in temporaries (issue 11). Here the backward contracts `w` in place,
    in its own dtype. dW is written here but never reaches the program for a frozen `w`: JAX's dead-code elimination
    drops it before lowering (tests/models/moe/test_dispatch.py checks the lowered program). Symbolic zeros
    (`defvjp(..., symbolic_zeros=True)`) would say so by construction, but under `nnx.remat` jax 0.10.2 reuses a
    custom-VJP forward traced for other perturbed inputs and fails (tests/train/test_remat.py, PERFT-R).
    """
    batch = w.ndim - 2
    return _contract(x, w, x.ndim - 1, batch + (1 if transpose_w else 0), batch).astype(x.dtype)


def _matmul_fwd(x, w, transpose_w):
    return matmul(x, w, transpose_w), (x, w)


def _matmul_bwd(transpose_w, residuals, g):
    x, w = residuals
    batch = w.ndim - 2
    g = g.astype(x.dtype)
    dx = _contract(g, w, g.ndim - 1, batch + (0 if transpose_w else 1), batch)
    lead = x.shape[:batch]
    rows, grads = x.reshape(*lead, -1, x.shape[-1]), g.reshape(*lead, -1, g.shape[-1])
    dw = _contract(grads, rows, batch, batch, batch) if transpose_w else _contract(rows, grads, batch, batch, batch)
    return _like(dx.astype(x.dtype), x), _like(dw.astype(w.dtype), w)


def _like(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """Inside `shard_map` (expert parallelism), sum a cotangent over the manual mesh axes it varies over and its
    primal does not (a weight replicated over `data` gets the sum of every shard's gradient), as JAX's own
    derivative does."""
    extra = jax.typeof(cotangent).manual_axis_type.varying - jax.typeof(primal).manual_axis_type.varying
    return jax.lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nnx.Module):
    """Bias-free `x @ kernel` with kernel stored (in, out) — a torch `nn.Linear` weight transposed."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], cfg: ModelConfig,
                 rngs: nnx.Rngs, std: float = 0.02):
        self.kernel = nnx.Param(normal_init(rngs, (in_features, out_features), std, cfg.jnp_param_dtype), axes=axes)
        self.dtype = cfg.jnp_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class Embed(nnx.Module):
    """Token embedding table [V, D]; `attend` reuses it as the tied LM head."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.embedding = nnx.Param(normal_init(rngs, (cfg.vocab_size, cfg.hidden_size), 0.02, cfg.jnp_param_dtype),
                                   axes=("vocab", "embed"))
        self.dtype = cfg.jnp_dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return matmul(x.astype(self.dtype), self.embedding[...].astype(self.dtype), transpose_w=True)


class RMSNorm(nnx.Module):
    """HF RMSNorm: normalise in float32, cast back to the input dtype, then scale."""

    def __init__(self, width: int, eps: float, cfg: ModelConfig, axes: tuple[str] = ("embed",)):
        self.scale = nnx.Param(jnp.ones((width,), cfg.jnp_param_dtype), axes=axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        # HF multiplies the weight with the already down-cast activations (weight * x.to(input_dtype)).
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, head_dim] for HF's default RoPE (the two halves repeat the same frequencies)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, heads, hd]; rotate-half convention (not interleaved), as HF `apply_rotary_pos_emb`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def causal_mask(attention_mask: jax.Array | None, batch: int, length: int,
                   sliding_window: int | None) -> jax.Array:
    """Boolean mask [B, 1, T, S]: causal, key padding, and (Mixtral) sliding window.

    Sliding window as in transformers' masking_utils: key s is visible from query t iff s > t - window.
    """
    q = jnp.arange(length)[:, None]
    k = jnp.arange(length)[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed &= k > q - sliding_window
    allowed = jnp.broadcast_to(allowed, (batch, 1, length, length))
    if attention_mask is not None:
        allowed &= attention_mask.astype(bool)[:, None, None, :]
    return allowed


def cached_causal_mask(key_mask: jax.Array, start: jax.Array, length: int,
                       sliding_window: int | None) -> jax.Array:
    """Boolean mask [B, 1, T, S] of T new queries at cache slots [start, start + T) over all S cache slots.

    The slot arithmetic is `causal_mask`'s, shifted by `start` (a traced scalar, so one compilation serves
    every decode step): key slot s is visible from query slot q iff s <= q, s > q - window (sliding window,
    counted in slots as transformers does, padding included), and `key_mask[b, s]` (a written, non-padding
    slot).

    Args:
        key_mask: [B, S] bool, the cache's valid slots after this step's keys were written.
        start: int32 scalar, the slot of the first new query.
        length: T, the number of new queries (static).
    """
    q = start + jnp.arange(length)[:, None]
    k = jnp.arange(key_mask.shape[1])[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed &= k > q - sliding_window
    return allowed[None, None] & key_mask.astype(bool)[:, None, None, :]


class Attention(nnx.Module):
    """Causal self-attention with GQA, optional full-width q/k RMSNorm (OLMoE) and `clip_qkv`.

    `sharded`: the model runs partitioned over several devices, which some attention kernels cannot
    (models/attention.py `MaskForm`)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, sharded: bool = False):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(d, cfg.num_heads * hd, ("embed", "q_heads"), cfg, rngs)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, rngs)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, rngs)
        self.o_proj = Linear(cfg.num_heads * hd, d, ("q_heads", "embed"), cfg, rngs)
        if cfg.qk_norm:
            # OLMoE normalises the whole projected vector before the head split (not per head as Qwen3).
            self.q_norm = RMSNorm(cfg.num_heads * hd, cfg.rms_norm_eps, cfg, axes=("q_heads",))
            self.k_norm = RMSNorm(cfg.num_kv_heads * hd, cfg.rms_norm_eps, cfg, axes=("kv_heads",))
        else:
            self.q_norm = self.k_norm = None
        # Optional low-rank deltas on q_proj / v_proj outputs (the qv_lora baseline), attached later.
        self.q_lora, self.v_lora = nnx.data(None), nnx.data(None)
        self.cfg = cfg
        self.sharded = sharded

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 kv_cache: tuple[jax.Array, jax.Array] | None = None, cache_index: jax.Array | None = None):
        """Self-attention of x [B, T, D] -> [B, T, D].

        Without `kv_cache`, keys are the T tokens themselves and `mask` is [B, 1, T, T] (`causal_mask`).
        With `kv_cache` = (k, v), each [B, S, kv_heads, head_dim], this step's keys and values are written at
        slots [cache_index, cache_index + T) with `dynamic_update_slice` (shape-stable: a decode step compiles
        once), the queries attend over all S slots under `mask` [B, 1, T, S] (`cached_causal_mask`), and the
        call returns (out, (k, v)) with the updated cache.
        """
        q, k, v = self._project(x, cos, sin)
        if kv_cache is None:
            return self._attend(q, k, v, mask)
        cache_k, cache_v = kv_cache
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, cache_index, 0, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, cache_index, 0, 0))
        out = self._attend(q, cache_k.astype(k.dtype), cache_v.astype(v.dtype), mask, cached=True)
        return out, (cache_k, cache_v)

    def _project(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> q [B, T, heads, hd] and rotated k, v [B, T, kv_heads, hd]."""
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_lora is not None:  # HF PEFT wraps q_proj / v_proj: the delta joins before the q norm
            q = q + self.q_lora(x).astype(q.dtype)
        if self.v_lora is not None:
            v = v + self.v_lora(x).astype(v.dtype)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:  # after the norm, as in HF OlmoeAttention
            q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
        q = apply_rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        return q, k, v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cached: bool = False) -> jax.Array:
        """q [B, T, heads, hd], k/v [B, S, kv_heads, hd], mask [B, 1, T, S] bool -> [B, T, D].

        `cached`: the keys are KV-cache slots under `cached_causal_mask`; else the queries' own tokens under
        `causal_mask`, a form the attention kernels may rely on (models/attention.py, `cfg.attention_impl`).
        """
        cfg = self.cfg
        b, t = q.shape[:2]
        out = attend(cfg.attention_impl, q, k, v, mask, MaskForm(causal=not cached, sliding_window=cfg.sliding_window,
                                                            sharded=self.sharded))
        return self.o_proj(out.reshape(b, t, cfg.num_heads * cfg.head_dim))
