"""The attention implementations (perft_jax/models/attention.py) against a float64 numpy reference.

Every implementation that runs on CPU is checked forward and backward (w.r.t. q, k, v) with the model's masks:
left padding (fully masked query rows), GQA, Mixtral's sliding window and the KV cache's T queries over S
slots; `blocked` also with several query blocks, the last one ragged. splash runs in Pallas interpret mode.
cuDNN needs a GPU to run; its lowering, splash's and `auto`'s are checked for cuda and tpu with `jax.export`,
which needs neither device.
"""
from __future__ import annotations

import dataclasses
import json
import re
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import tiny_model_config

from perft_jax.build import resolve_model_config
from perft_jax.checkpoint import base as base_ckpt
from perft_jax.config import ModelSection
from perft_jax.errors import UserError
from perft_jax.models import attention
from perft_jax.models.attention import IMPLEMENTATIONS, MaskForm, attend
from perft_jax.models.config import ATTENTION_IMPLS, ModelConfig
from perft_jax.models.decoder import init_model
from perft_jax.models.layers import cached_causal_mask, causal_mask

TOL = {jnp.float32: dict(rtol=1e-5, atol=2e-6), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}
CUDNN_TARGETS = ("__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward")


def reference(q, k, v, mask, cotangent):
    """Float64 attention and its gradients w.r.t. q, k, v (for the loss sum(out * cotangent)).

    Masked scores are left out of the softmax; a fully masked query row gets uniform weights over all S keys
    and no score gradient, as the `xla` implementation's finite fill gives."""
    q, k, v, dout = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, k, v, cotangent))
    groups = q.shape[2] // k.shape[2]
    kh, vh = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # query head h reads kv head h // G
    scale = 1.0 / np.sqrt(q.shape[-1])
    m = np.broadcast_to(np.asarray(mask), (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))  # [B, H, T, S]
    scores = np.where(m, np.einsum("bthd,bshd->bhts", q, kh) * scale, -1e30)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", p, vh)
    dp = np.einsum("bthd,bshd->bhts", dout, vh)
    ds = np.where(m, p * (dp - (dp * p).sum(-1, keepdims=True)), 0.0) * scale
    dq = np.einsum("bhts,bshd->bthd", ds, kh)
    per_head = lambda x: x.reshape(x.shape[0], x.shape[1], k.shape[2], groups, x.shape[-1]).sum(3)  # noqa: E731
    dk = per_head(np.einsum("bhts,bthd->bshd", ds, q))
    dv = per_head(np.einsum("bhts,bthd->bshd", p, dout))
    return out, (dq, dk, dv)


def run(fn, q, k, v, mask, form, cotangent):
    """fn's output and its gradients w.r.t. q, k, v (of sum(out * cotangent)), under one jit."""
    def loss(q, k, v):
        out = fn(q, k, v, mask, form)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def inputs(dtype, b=2, t=16, s=None, heads=4, kv=2, hd=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    s = t if s is None else s
    q = jax.random.normal(keys[0], (b, t, heads, hd), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, s, kv, hd), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, s, kv, hd), jnp.float32).astype(dtype)
    return q, k, v, jax.random.normal(keys[3], (b, t, heads, hd), jnp.float32)


def left_padded(b: int, t: int, pad: int) -> jax.Array:
    """[B, T] attention mask, the last row left-padded by `pad` (its first `pad` query rows fully masked)."""
    return jnp.ones((b, t), jnp.int32).at[-1, :pad].set(0)


def check(fn, q, k, v, mask, form, cotangent, rows=None):
    """fn against the reference, forward and gradients; `rows` [B, T]: compare only these query rows and
    back-propagate only from them (the kernels' fully masked rows are theirs, finite)."""
    if rows is not None:
        cotangent = cotangent * rows[:, :, None, None]
    out, grads = run(fn, q, k, v, mask, form, cotangent)
    want, want_grads = reference(q, k, v, mask, cotangent)
    tol = TOL[q.dtype.type]
    assert all(bool(jnp.isfinite(a.astype(jnp.float32)).all()) for a in (out, *grads))
    keep = np.ones(out.shape[:2], bool) if rows is None else np.asarray(rows, bool)
    np.testing.assert_allclose(np.asarray(out, np.float64)[keep], want[keep], **tol)
    for got, exp in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got.astype(jnp.float32), np.float64), exp, **tol)


# --- xla (the CPU path) ---

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("window", [None, 4])
def test_xla_self_attention(dtype, kv, window):
    q, k, v, ct = inputs(dtype, kv=kv)
    mask = causal_mask(left_padded(2, 16, 5), 2, 16, window)
    assert not bool(mask[-1, 0, :5].any())  # fully masked padding rows are part of the test
    check(attention.xla_attention, q, k, v, mask, MaskForm(causal=True, sliding_window=window), ct)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("t,start", [(1, 9), (3, 6)])
@pytest.mark.parametrize("window", [None, 4])
def test_xla_kv_cache(dtype, t, start, window):
    """T new queries at cache slots [start, start + T) over S=16 slots, left padding in the leading slots."""
    q, k, v, ct = inputs(dtype, t=t, s=16, kv=2)
    key_mask = (jnp.arange(16)[None] < start + t) & (jnp.arange(16)[None] >= jnp.array([[0], [3]]))
    mask = cached_causal_mask(key_mask, jnp.int32(start), t, window)
    assert mask.shape == (2, 1, t, 16)
    check(attention.xla_attention, q, k, v, mask, MaskForm(causal=False, sliding_window=window), ct)


# --- blocked (the CPU path: causal block skipping) ---

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kv", [4, 1])
@pytest.mark.parametrize("t,window", [(16, None), (150, None), (150, 40), (2 * attention.BLOCK_ROWS, 70), (300, 200)])
def test_blocked_self_attention(dtype, kv, t, window):
    """One block (16), two or three with a ragged last one (150 = 128 + 22, 300 = 128 + 128 + 44), windows shorter
    (40, 70) and longer (200) than a block: real query rows as the reference; fully masked padding rows finite
    (uniform over their block's keys)."""
    q, k, v, ct = inputs(dtype, t=t, kv=kv)
    am = left_padded(2, t, 37 if t > 16 else 5)
    mask = causal_mask(am, 2, t, window)
    check(attention.blocked_attention, q, k, v, mask, MaskForm(causal=True, sliding_window=window), ct, rows=am)


@pytest.mark.parametrize("t,start", [(1, 9), (3, 6)])
def test_blocked_kv_cache(t, start):
    """The KV cache's form runs as one block: every row as the reference, fully masked ones included."""
    q, k, v, ct = inputs(jnp.float32, t=t, s=16, kv=2)
    key_mask = (jnp.arange(16)[None] < start + t) & (jnp.arange(16)[None] >= jnp.array([[0], [3]]))
    check(attention.blocked_attention, q, k, v, cached_causal_mask(key_mask, jnp.int32(start), t, 4),
          MaskForm(causal=False, sliding_window=4), ct)


def test_blocked_skips_the_scores_the_causal_mask_hides():
    """At T = 4 blocks only the blocks' key prefixes are scored: 10 of 16 [block x block] tiles, forward (QK^T and
    PV), so at least 30 % of the full square's score FLOPs are skipped."""
    t = 4 * attention.BLOCK_ROWS
    q, k, v, _ = inputs(jnp.float32, b=1, t=t, heads=1, kv=1, hd=8)
    mask, form = causal_mask(None, 1, t, None), MaskForm(causal=True)
    flops = {name: jax.jit(lambda q, k, v, f=f: f(q, k, v, mask, form)).lower(q, k, v).compile().cost_analysis()
             ["flops"] for name, f in (("blocked", attention.blocked_attention), ("xla", attention.xla_attention))}
    matmuls = 2 * 2 * t * t * 8  # QK^T and PV over the full square
    assert flops["blocked"] < flops["xla"] - 0.3 * matmuls, flops


def test_xla_is_jax_dot_product_attention_to_an_ulp():
    """jax.nn.dot_product_attention(implementation="xla") computes the same to float32 rounding (it was not
    taken as the `xla` path only because it is slower on CPU; models/attention.py)."""
    q, k, v, _ = inputs(jnp.float32, kv=2)
    mask = causal_mask(left_padded(2, 16, 5), 2, 16, 4)
    ours = attention.xla_attention(q, k, v, mask, MaskForm(causal=True, sliding_window=4))
    theirs = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-6, atol=1e-6)


# --- splash (TPU kernel, Pallas interpret mode) ---

def splash_interpret(q, k, v, mask, form):
    return attention.splash_attention(q, k, v, mask, form, interpret=True)


@pytest.mark.parametrize("dtype,kv,window", [(jnp.float32, 2, None), (jnp.float32, 1, 100), (jnp.bfloat16, 2, 100)])
def test_splash_interpret(dtype, kv, window):
    """Two 128-blocks per sequence (block skipping in play); real query rows as the reference, padding rows finite."""
    q, k, v, ct = inputs(dtype, t=256, kv=kv, hd=128)
    am = left_padded(2, 256, 37)
    mask = causal_mask(am, 2, 256, window)
    check(splash_interpret, q, k, v, mask, MaskForm(causal=True, sliding_window=window), ct, rows=am)


# --- auto, and the forms a kernel refuses ---

def test_auto_on_cpu_is_blocked():
    """On CPU `auto` lowers the blocked branch: the same numbers, bit for bit, also for a call splash could take."""
    for t, hd in ((16, 16), (128, 128)):  # the second traces splash and cuDNN branches too (not lowered)
        q, k, v, ct = inputs(jnp.float32, t=t, hd=hd)
        mask = causal_mask(left_padded(2, t, 5), 2, t, None)
        form = MaskForm(causal=True)
        got, want = run(IMPLEMENTATIONS["auto"], q, k, v, mask, form, ct), run(attention.blocked_attention, q, k, v,
                                                                                mask, form, ct)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        text = jax.jit(lambda q, k, v: attend("auto", q, k, v, mask, form)).lower(q, k, v).as_text()
        assert "tpu_custom_call" not in text and "cudnn" not in text


@pytest.mark.parametrize("name,t,hd,dtype,causal,reason", [
    ("splash", 16, 128, jnp.float32, True, "multiple of 128"),
    ("splash", 128, 64, jnp.float32, True, "head_dim"),
    ("splash", 128, 128, jnp.float32, False, "KV-cache"),
    ("cudnn", 128, 128, jnp.float32, True, "float16/bfloat16"),
    ("cudnn", 128, 136, jnp.bfloat16, True, "head_dim"),
    ("cudnn", 15, 128, jnp.bfloat16, True, "even sequence length"),
    ("cudnn", 128, 128, jnp.bfloat16, False, "KV-cache"),
])
@pytest.mark.usefixtures("cudnn_version")
def test_kernels_refuse_forms_they_cannot_run(name, t, hd, dtype, causal, reason):
    """A kernel asked for by name raises; `auto` lowers xla for that call on the kernel's platform."""
    q, k, v, _ = inputs(dtype, t=t, hd=hd)
    mask = causal_mask(None, 2, t, None)
    form = MaskForm(causal=causal)
    assert reason in attention.why_not(name, q, k, form)
    with pytest.raises(UserError, match=re.escape(reason)):
        attend(name, q, k, v, mask, form)
    platform = {"cudnn": "cuda", "splash": "tpu"}[name]
    assert KERNEL_MARK[platform] not in lowered(lambda q, k, v: attend("auto", q, k, v, mask, form), platform, q, k, v)


def test_splash_only_on_one_device():
    """A sharded model's Mosaic call cannot be partitioned: splash refuses and `auto` keeps xla."""
    q, k, v, _ = inputs(jnp.float32, t=128, hd=128)
    mask, form = causal_mask(None, 2, 128, None), MaskForm(causal=True)
    sharded = MaskForm(causal=True, sharded=True)
    assert "one device" in attention.why_not("splash", q, k, sharded)
    with pytest.raises(UserError, match="one device"):
        jax.make_jaxpr(lambda q, k, v: attend("splash", q, k, v, mask, sharded))(q, k, v)
    jaxpr = jax.make_jaxpr(lambda q, k, v: attend("auto", q, k, v, mask, sharded))(q, k, v)
    assert "pallas_call" not in str(jaxpr)
    assert "pallas_call" in str(jax.make_jaxpr(lambda q, k, v: attend("auto", q, k, v, mask, form))(q, k, v))


# --- lowering for cuda and tpu without either device ---

def lowered(fn, platform: str, *args) -> str:
    """StableHLO text of jit(fn) exported for `platform`. The cuDNN custom calls carry no compatibility
    guarantee, so serialising them must be allowed explicitly."""
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in CUDNN_TARGETS]
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*specs).mlir_module()


KERNEL_MARK = {"cuda": "__cudnn$fmha", "tpu": "tpu_custom_call"}


@pytest.mark.parametrize("platform,name", [("cuda", "cudnn"), ("cuda", "auto"), ("tpu", "splash"), ("tpu", "auto")])
@pytest.mark.usefixtures("cudnn_version")
def test_lowers_the_kernel(platform, name):
    """Forward and backward lower to the platform's kernel, also under `auto` (decided at lowering)."""
    q, k, v, ct = inputs(jnp.bfloat16, t=128, hd=128)
    mask = causal_mask(left_padded(2, 128, 5), 2, 128, 32)
    form = MaskForm(causal=True, sliding_window=32)
    fwd = lambda q, k, v, mask: attend(name, q, k, v, mask, form)  # noqa: E731
    grad = jax.grad(lambda q, k, v, mask: jnp.sum(fwd(q, k, v, mask).astype(jnp.float32) * ct), argnums=(0, 1, 2))
    text = lowered(fwd, platform, q, k, v, mask)
    assert KERNEL_MARK[platform] in text
    backward = lowered(grad, platform, q, k, v, mask)
    if platform == "cuda":
        assert "__cudnn$fmhaScaleBiasSoftmaxBackward" in backward
        # The mask rides as the bias; causality and the window also go to cuDNN, which skips those blocks.
        assert "mask_type\\22: \\22CAUSAL" in text and "sliding_window_length\\22: 32" in text
    else:
        assert backward.count("tpu_custom_call") >= 3  # forward, dq and dkv kernels
    other = KERNEL_MARK["tpu" if platform == "cuda" else "cuda"]
    assert other not in text and other not in backward  # the other platform's branch is not lowered


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.usefixtures("cudnn_version")
def test_model_forward_lowers_the_kernel(platform):
    """A whole tiny model (head_dim 128, 128 tokens, bfloat16, attention_impl auto) exported per platform: its
    attention is the platform's kernel (the layers share one lowered kernel function)."""
    cfg = tiny_model_config(head_dim=128, dtype="bfloat16", param_dtype="bfloat16")
    assert cfg.attention_impl == "auto"
    graphdef, state = nnx.split(init_model(cfg, seed=0))
    ids, am = jnp.zeros((2, 128), jnp.int32), left_padded(2, 128, 5)
    text = lowered(lambda state, ids, am: nnx.merge(graphdef, state)(ids, am).logits, platform, state, ids, am)
    assert KERNEL_MARK[platform] in text


# --- the config switch ---

def test_one_list_of_implementations():
    """The table is the list: the model config's and the run config's choices are its keys."""
    assert ATTENTION_IMPLS == tuple(IMPLEMENTATIONS) == ("auto", "xla", "blocked", "cudnn", "splash")
    hint = typing.get_type_hints(ModelSection)["attention_impl"]
    assert set(typing.get_args(typing.get_args(hint)[0])) == set(IMPLEMENTATIONS)
    assert set(attention.AUTO.values()) <= set(IMPLEMENTATIONS)
    with pytest.raises(UserError, match=re.escape("model.attention_impl: expected one of ['auto', 'xla'")):
        tiny_model_config(attention_impl="flash")


def test_threaded_from_the_model_section(tmp_path):
    """`model.attention_impl` overrides the stored config; a manifest written before the key existed loads."""
    cfg = tiny_model_config()
    base_ckpt.write_manifest(tmp_path, cfg)
    assert resolve_model_config(ModelSection(checkpoint=str(tmp_path))).attention_impl == "auto"
    assert resolve_model_config(ModelSection(checkpoint=str(tmp_path), attention_impl="xla")).attention_impl == "xla"
    manifest = json.loads((tmp_path / base_ckpt.MANIFEST).read_text())
    del manifest["model"]["attention_impl"]
    (tmp_path / base_ckpt.MANIFEST).write_text(json.dumps(manifest))
    old, _ = base_ckpt.read_manifest(tmp_path)
    assert old == cfg and dataclasses.asdict(old)["attention_impl"] == "auto"
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
