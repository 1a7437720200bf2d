"""Rematerialisation changes memory, not results: adapter gradients equal the stored-activation ones."""
from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tiny_models import tiny_model_config

from perft_jax import init_model
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.attach import attach_perft
from perft_jax.perft.config import PerftConfig
from perft_jax.train.step import loss_fn


def _grads(remat: bool):
    cfg = tiny_model_config(remat=remat)
    perft = PerftConfig(variant="perft_r")
    model = attach_perft(init_model(cfg), perft)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": jnp.ones_like(ids)}
    grad_fn = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, AdapterParam), has_aux=True), static_argnums=(2, 3))
    return grad_fn(model, batch, cfg, perft)[0]


def test_remat_gives_the_same_adapter_gradients():
    chex.assert_trees_all_close(_grads(True), _grads(False), rtol=1e-5, atol=1e-7)
