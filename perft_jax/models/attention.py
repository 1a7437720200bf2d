"""The attention core, one table of implementations (`IMPLEMENTATIONS`; `ModelConfig.attention_impl` is a key).

Every entry has one signature, `fn(q [B, T, H, hd], k/v [B, S, KV, hd], mask [B, 1, T, S] bool, form) ->
[B, T, H, hd]` in q's dtype, H a multiple of KV (GQA: query head h reads kv head h // (H // KV)):

- `xla`: the reference. Scores and softmax in float32, masked scores filled with a finite float32 minimum, so
  a fully masked (padding) query row gets finite uniform weights, never NaN. Heads-major batched matmuls:
  bit-identical to the attention this model always had. `jax.nn.dot_product_attention(...,
  implementation="xla")` agrees to 1 ulp in float32 but cost 13-35 % more in fwd + bwd on CPU (it vmaps an
  einsum over the query groups), so it is not used here.
- `blocked`: the CPU path, in plain XLA. Under the causal form the queries go in blocks of `BLOCK_ROWS`, each
  over the keys it can see (a prefix, shortened from the left by a sliding window), so the scores the causal
  mask throws away are mostly never computed (n blocks compute (n + 1) / 2n of the T x T scores). A forward
  alone (evaluation, decoding) normalises each block's softmax after the PV product (a [t, hd] division instead
  of a pass over [t, S]); under differentiation the hand-written VJP (`_block_attention`) keeps only the
  probabilities, and its backward is the four-matmul flash form. Any other mask (the KV cache's) runs as one
  block. Equal to `xla` to float32 rounding at every query row that sees a key; a fully masked (padding) row
  gets uniform weights over its block's keys instead of all S (finite; as the kernels, see below).
- `cudnn`: `jax.nn.dot_product_attention(..., implementation="cudnn")`, cuDNN's fused flash attention (GPU).
- `splash`: JAX's Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`). Chosen over
  the older Pallas `flash_attention` because it takes GQA directly (K/V with fewer heads, no repeat), encodes
  causal and sliding-window masks as static block sparsity (fully masked blocks are skipped, not computed) and
  key padding as segment ids; `flash_attention` needs H K/V heads and can express a window only as a dense
  [B, H, T, S] bias.
- `auto`: per platform, decided at lowering (`jax.lax.platform_dependent`, so it is right for `jax.export` and
  cross-platform lowering, where `jax.default_backend()` would name the tracing host): `AUTO` below. A call
  the platform's kernel cannot run (`why_not`) takes `xla` instead.

A named kernel (`cudnn`, `splash`) raises UserError for a call it cannot run instead of falling back: asking
for a kernel by name means wanting it (benchmarks, tests); `auto`, the default, is the one that adapts.

The kernels take the structure of the mask from `form` (`MaskForm`), not from its values: a kernel's causal
and window masks are static, and key padding is read off the mask's diagonal. Their outputs at fully masked
(padding) query rows differ from `xla`'s, finite all the same; the model ignores them (they reach real tokens
only as masked keys), except that padding tokens compete for expert capacity under `moe_backend: capacity`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from perft_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class MaskForm:
    """Static facts about `mask` that a kernel may use in place of its values.

    causal: mask is `layers.causal_mask`'s: the keys are the queries' own T tokens (S == T) and key s is visible
        from query t iff s <= t, s > t - sliding_window and s is not padding. False: any mask, notably the KV
        cache's `cached_causal_mask`, whose causal offset is a traced slot index no static kernel mask can take.
    sliding_window: the model's window (keys s > t - window), or None.
    sharded: the call is part of a program partitioned over several devices (the model was built on a mesh,
        build.py): kernels with no partitioning rule (splash) cannot take it.
    """

    causal: bool
    sliding_window: int | None = None
    sharded: bool = False


AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, MaskForm], jax.Array]

# Why a kernel cannot take a call not in the self-attention form: decode steps (T new queries over S cache
# slots) are bound by reading the cache, which a fused kernel does not reduce, and their causal offset is traced.
_CACHE_FORM = "the KV-cache form (queries at traced cache slots) runs in XLA"


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, form: MaskForm) -> jax.Array:
    """The reference computation (see the module docstring); any mask."""
    del form
    b, t, h, hd = q.shape
    s, kv = k.shape[1], k.shape[2]
    groups = h // kv
    # Heads-major operands, the `groups` query heads of a kv head stacked along the rows, so that both
    # products are plain batched matmuls [G*T, hd] x [hd, S]; the einsum form over [B, T, KV, G, hd] cost
    # 15-20 % more in fwd + bwd on CPU (bench-small attention, B=8 T=256 H=8 hd=64).
    q = q.reshape(b, t, kv, groups, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv, groups * t, hd)  # h = kv*G + g
    scores = (q @ k.transpose(0, 2, 3, 1)).astype(jnp.float32) / math.sqrt(hd)  # [B, KV, G*T, S]
    # A finite fill keeps fully masked (padding) query rows finite instead of NaN.
    scores = jnp.where(mask[:, :, None], scores.reshape(b, kv, groups, t, s), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, groups * t, s)
    out = (probs @ v.transpose(0, 2, 1, 3)).reshape(b, kv, groups, t, hd)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


# Query rows per block of `blocked`: smaller blocks skip more scores but run smaller matmuls. Attention fwd + bwd,
# B=8 T=256 H=8 hd=64 float32 on the 2-core CPU (medians of 7): xla 63.6 ms; blocks of 64 / 128 / 256 rows 37.6 /
# 32.5 / 50.9 ms (256: one block, no skipping); at B=2 T=1024: xla 273, blocks of 64 / 128 / 256 112 / 98 / 99 ms.
BLOCK_ROWS = 128
_MASKED = float(jnp.finfo(jnp.float32).min)  # the finite fill of masked scores (as `xla`'s)


def _heads_matmul(a: jax.Array, b: jax.Array, a_dim: int, b_dim: int) -> jax.Array:
    """a [B, KV, ., .] and b [B, KV, ., .] contracted over one dimension each, batched over (B, KV), in float32."""
    return jax.lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32)


def _block_exp(q, k, bias, groups: int, scale: float):
    """exp(scores - row max) [B, KV, G*t, S] and the row sums [B, KV, G*t, 1] of one query block, float32."""
    b, kv, rows, _ = q.shape
    scores = _heads_matmul(q, k, 3, 3).reshape(b, kv, groups, rows // groups, -1) * scale + bias[:, :, None]
    e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    return e.reshape(b, kv, rows, -1), jnp.sum(e, axis=-1).reshape(b, kv, rows, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _block_attention(q, k, v, bias, groups: int, scale: float):
    """softmax(q k^T * scale + bias) v of one query block: q [B, KV, G*t, hd] (query group g's rows g*t..),
    k / v [B, KV, S, hd], bias [B, 1, t, S] float32 (0 or the masked fill) -> [B, KV, G*t, hd] in q's dtype."""
    e, total = _block_exp(q, k, bias, groups, scale)
    return (_heads_matmul(e.astype(v.dtype), v, 3, 2) / total).astype(q.dtype)


def _block_attention_fwd(q, k, v, bias, groups, scale):
    e, total = _block_exp(q, k, bias, groups, scale)
    probs = e / total
    out = _heads_matmul(probs.astype(v.dtype), v, 3, 2).astype(q.dtype)
    return out, (q, k, v, probs, out)


def _block_attention_bwd(groups, scale, residuals, grad):
    q, k, v, probs, out = residuals
    grad_probs = _heads_matmul(grad, v, 3, 3)  # [B, KV, G*t, S]
    # softmax backward: dS = P * (dP - rowsum(dP * P)), with rowsum(dP * P) = rowsum(dO * O) ([t, hd], cheaper)
    row = jnp.sum(grad.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    grad_scores = (probs * (grad_probs - row) * scale).astype(q.dtype)
    dq = _heads_matmul(grad_scores, k, 3, 2).astype(q.dtype)
    dk = _heads_matmul(grad_scores, q, 2, 2).astype(k.dtype)
    dv = _heads_matmul(probs.astype(grad.dtype), grad, 2, 2).astype(v.dtype)
    return dq, dk, dv, None


_block_attention.defvjp(_block_attention_fwd, _block_attention_bwd)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, form: MaskForm) -> jax.Array:
    """Causal block skipping in XLA (see the module docstring); any mask, the KV cache's as one block."""
    b, t, h, hd = q.shape
    s, kv = k.shape[1], k.shape[2]
    groups = h // kv
    heads = q.reshape(b, t, kv, groups, hd).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, hd]: h = kv*G + g
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, hd]
    bias = jnp.where(mask, 0.0, _MASKED)  # [B, 1, T, S] float32
    if form.causal:  # query block [start, stop) sees keys [first, stop): none after it, none before the window
        blocks = [(start, min(t, start + BLOCK_ROWS)) for start in range(0, t, BLOCK_ROWS)]
        spans = [(start, stop, 0 if form.sliding_window is None else max(0, start - form.sliding_window + 1), stop)
                 for start, stop in blocks]
    else:
        spans = [(0, t, 0, s)]
    outs = []
    for start, stop, first, last in spans:
        rows = heads[:, :, :, start:stop].reshape(b, kv, groups * (stop - start), hd)
        out = _block_attention(rows, k[:, :, first:last], v[:, :, first:last], bias[:, :, start:stop, first:last],
                               groups, 1.0 / math.sqrt(hd))
        outs.append(out.reshape(b, kv, groups, stop - start, hd))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


def cudnn_traceable() -> bool:
    """Whether JAX can trace cuDNN attention here. It reads the cuDNN version at trace time (not lowering) from
    its CUDA plugin (`jax-cuda12/13-plugin` and the `nvidia-cudnn` wheel), raising "cuDNN is not detected."
    without it; no GPU is needed once the plugin is installed."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

        check_cudnn_version()
        return True
    except Exception:  # RuntimeError without the plugin; ImportError should JAX move the module
        return False


def _cudnn_why_not(q: jax.Array, k: jax.Array, form: MaskForm) -> str | None:
    hd, t = q.shape[-1], q.shape[1]
    if not form.causal:
        return _CACHE_FORM
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention takes float16/bfloat16 only, got {q.dtype}"
    if hd % 8 or hd > 128:  # 256 on Hopper and later, which is not known at trace time
        return f"cuDNN flash attention needs head_dim a multiple of 8 and <= 128, got {hd}"
    if t % 2:  # with a bias (our mask), cuDNN's backward takes even sequence lengths only
        return f"cuDNN flash attention with a mask needs an even sequence length, got {t}"
    if not cudnn_traceable():
        return "JAX's CUDA plugin is not installed, so cuDNN attention cannot be traced"
    return None


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, form: MaskForm) -> jax.Array:
    """cuDNN flash attention. The boolean mask (key padding, any row pattern, left padding included) becomes
    an additive bias inside JAX; `is_causal` and the window are passed as well so that cuDNN skips the masked
    blocks (they agree with the mask, so the result is the same)."""
    _require("cudnn", _cudnn_why_not(q, k, form))
    window = None if form.sliding_window is None else (form.sliding_window - 1, 0)  # cuDNN: s in (t - w, t]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=window,
                                        implementation="cudnn")


_LANES = 128  # the TPU vreg lane width: splash's kv blocks are multiples of it


def _splash_why_not(q: jax.Array, k: jax.Array, form: MaskForm) -> str | None:
    hd, t = q.shape[-1], q.shape[1]
    if not form.causal:
        return _CACHE_FORM
    if t % _LANES:
        return f"splash attention needs a sequence length that is a multiple of {_LANES}, got {t}"
    if hd % _LANES:  # smaller heads may lower, but cannot be checked on a TPU here
        return f"splash attention needs head_dim a multiple of {_LANES}, got {hd}"
    if form.sharded:
        # A Mosaic call in a multi-device computation fails to lower ("Mosaic kernels cannot be automatically
        # partitioned. Please wrap the call in a shard_map."); the shard_map over batch and heads is not written yet.
        return "splash attention runs on one device only (no shard_map wrapper yet), and the model is sharded"
    return None


@functools.lru_cache(maxsize=32)
def _splash_kernel(length: int, heads: int, window: int | None, interpret: bool):
    """The splash kernel for one (T, H, window): the static mask's block tables are computed in numpy once."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    shape = (length, length)
    # Key s visible from query t iff t - (window - 1) <= s <= t, as `causal_mask` (s > t - window).
    head = sm.CausalMask(shape) if window is None else sm.LocalMask(shape, (window - 1, 0), offset=0)
    block = next(b for b in (512, 256, _LANES) if length % b == 0)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # Concrete block tables even when first built inside a jit trace, so the cached kernel holds no tracer.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(sm.MultiHeadMask([head] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret), sk.SegmentIds


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, form: MaskForm, *,
                     interpret: bool = False) -> jax.Array:
    """Pallas splash attention (TPU; `interpret=True` runs it on any backend, slowly, for tests).

    Causality and the window are the kernel's static mask; key padding enters as segment ids, 1 for a real
    key and 0 for padding, read off the mask's diagonal (under `causal_mask` query s always sees key s unless
    s is padding). A real query then sees exactly its mask's keys; a padding query sees the padding keys up to
    itself (never none, so the kernel's softmax stays finite). Single-device only: for a model built on a mesh
    (`MaskForm.sharded`) `auto` takes xla instead; a model sharded by hand after it was built fails to lower on
    TPU with JAX's "Mosaic kernels cannot be automatically partitioned".
    """
    _require("splash", _splash_why_not(q, k, form))
    b, t, h, hd = q.shape
    kernel, segment_ids = _splash_kernel(t, h, form.sliding_window, interpret)
    valid = jnp.diagonal(mask[:, 0], axis1=1, axis2=2).astype(jnp.int32)  # [B, T]
    # The kernel takes no softmax scale: scale q, in float32, before the cast back.
    q = (q.astype(jnp.float32) * (1.0 / math.sqrt(hd))).astype(q.dtype)
    heads_major = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [B, T, N, hd] <-> [B, N, T, hd]
    out = jax.vmap(lambda q1, k1, v1, seg: kernel(q1, k1, v1, segment_ids=segment_ids(seg, seg)))(
        heads_major(q), heads_major(k), heads_major(v), valid)
    return heads_major(out).astype(q.dtype)


def _require(name: str, reason: str | None) -> None:
    if reason is not None:
        raise UserError(f"model.attention_impl={name!r} cannot run this attention call: {reason}; "
                        "'auto' would take 'xla' here")


# platform -> the implementation `auto` lowers there; other platforms (rocm, ...) take `xla`.
AUTO = {"cpu": "blocked", "cuda": "cudnn", "tpu": "splash"}
_WHY_NOT = {"xla": lambda q, k, form: None, "blocked": lambda q, k, form: None, "cudnn": _cudnn_why_not,
            "splash": _splash_why_not}


def auto_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, form: MaskForm) -> jax.Array:
    """Per platform the implementation of `AUTO`, or `xla` for a call that kernel cannot run (`why_not`)."""
    names = {p: (name if _WHY_NOT[name](q, k, form) is None else "xla") for p, name in AUTO.items()}
    if len(set(names.values())) == 1:
        return IMPLEMENTATIONS[names["cpu"]](q, k, v, mask, form)
    bound = {name: functools.partial(IMPLEMENTATIONS[name], form=form) for name in set(names.values()) | {"xla"}}
    # Every branch is traced; only the lowering platform's one is lowered (see the module docstring).
    return jax.lax.platform_dependent(q, k, v, mask, default=bound["xla"], **{p: bound[n] for p, n in names.items()})


def why_not(name: str, q: jax.Array, k: jax.Array, form: MaskForm) -> str | None:
    """Why implementation `name` cannot run a call with these q, k and mask form; None if it can."""
    return None if name == "auto" else _WHY_NOT[name](q, k, form)


IMPLEMENTATIONS: dict[str, AttentionFn] = {"auto": auto_attention, "xla": xla_attention, "blocked": blocked_attention,
                                           "cudnn": cudnn_attention, "splash": splash_attention}
ATTENTION_IMPLS = tuple(IMPLEMENTATIONS)  # the values of `ModelConfig.attention_impl`


def attend(impl: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, form: MaskForm) -> jax.Array:
    """Attention of q over k, v under `mask` with implementation `impl` (a key of IMPLEMENTATIONS)."""
    return IMPLEMENTATIONS[impl](q, k, v, mask, form)

