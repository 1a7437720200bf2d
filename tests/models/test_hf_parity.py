"""Converted models give the HF PyTorch logits: relative L2 error <= 1e-5 in float32, at real tokens."""
from __future__ import annotations

import pathlib
import tempfile

import chex
import jax.numpy as jnp
import pytest
from flax import nnx
from tiny_models import build_hf_model, hf_logits, rel_l2, save_hf_model, token_batch

from perft_jax import load_model
from perft_jax.convert.hf_to_jax import convert_hf_to_jax

TOL = 1e-5

CASES = {
    # name: (arch, HF config overrides)
    "olmoe": ("olmoe", {}),
    "olmoe-gqa-clip": ("olmoe", dict(num_key_value_heads=1, clip_qkv=0.5)),
    "olmoe-norm-topk": ("olmoe", dict(norm_topk_prob=True)),
    "olmoe-topk-all": ("olmoe", dict(num_experts=4, num_experts_per_tok=4)),
    "olmoe-tied": ("olmoe", dict(tie_word_embeddings=True)),
    "mixtral": ("mixtral", {}),
    "mixtral-sliding": ("mixtral", dict(sliding_window=4)),
    "mixtral-topk-all-mha": ("mixtral", dict(num_experts=4, num_experts_per_tok=4, num_key_value_heads=4)),
    "mixtral-theta": ("mixtral", dict(rope_theta=1e6, head_dim=32)),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, torch_required):
    """name -> (HF model, converted checkpoint dir), built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            arch, overrides = CASES[name]
            hf = build_hf_model(arch, **overrides)
            root = tmp_path_factory.mktemp(name)
            convert_hf_to_jax(save_hf_model(hf, root / "hf"), root / "ckpt", show_progress=False)
            cache[name] = (hf, root / "ckpt")
        return cache[name]

    return get


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("backend", ["dense", "capacity", "grouped", "ragged"])
def test_logits_match_hf_with_padding(converted, name, backend):
    hf, ckpt = converted(name)
    model = load_model(ckpt, moe_backend=backend, capacity_factor=16.0)  # large enough to drop nothing
    ids, mask = token_batch(model.config.vocab_size)
    out = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    chex.assert_shape(out.logits, (*ids.shape, model.config.vocab_size))
    chex.assert_shape(out.router_logits, (model.config.num_layers, *ids.shape, model.config.num_experts))
    assert int(out.dropped_tokens.sum()) == 0
    assert rel_l2(out.logits, hf_logits(hf, ids, mask), mask) <= TOL


@pytest.mark.torch
def test_router_logits_match_hf(converted):
    import torch

    hf, ckpt = converted("olmoe")
    ids, mask = token_batch(256)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids), output_router_logits=True).router_logits
    got = load_model(ckpt)(jnp.asarray(ids)).router_logits
    for layer, want_layer in enumerate(want):
        assert rel_l2(got[layer].reshape(-1, got.shape[-1]), want_layer.numpy()) <= TOL


class JitAndEagerTest(chex.TestCase):
    """The model as a pure function of its state gives HF's logits both jitted and eager."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_functional_forward(self):
        pytest.importorskip("torch")
        for arch, overrides in (CASES["olmoe-gqa-clip"], CASES["mixtral-sliding"]):
            hf = build_hf_model(arch, seed=3, **overrides)
            with tempfile.TemporaryDirectory() as tmp:
                convert_hf_to_jax(save_hf_model(hf, pathlib.Path(tmp) / "hf"), pathlib.Path(tmp) / "ckpt",
                                  show_progress=False)
                graphdef, state = nnx.split(load_model(pathlib.Path(tmp) / "ckpt"))
            ids, mask = token_batch(256, seed=3)
            forward = self.variant(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m).logits)
            logits = forward(state, jnp.asarray(ids), jnp.asarray(mask))
            chex.assert_tree_all_finite(logits)
            assert rel_l2(logits, hf_logits(hf, ids, mask), mask) <= TOL
