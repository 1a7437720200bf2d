"""Training only the adapters: loss goes down, the base stays bit-identical, optimizer state is adapters-only."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import tiny_model_config

from perft_jax import export_hf, init_model, load_model
from perft_jax.convert.hf_to_jax import convert_hf_to_jax
from perft_jax.optim import OptimConfig
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.attach import attach_perft
from perft_jax.perft.config import PerftConfig
from perft_jax.train.optim import make_optimizer
from perft_jax.train.step import loss_fn, train_step, train_step_fn

SETUPS = {
    "perft_s": PerftConfig(variant="perft_s"),
    "perft_d": PerftConfig(variant="perft_d", num_adapters=3, adapter="lora"),
    "perft_r": PerftConfig(variant="perft_r", num_adapters=4, top_k=2),
    "perft_r-dynmole": PerftConfig(variant="perft_r", num_adapters=4, top_k=2, router="dynmole"),
    "perft_e": PerftConfig(variant="perft_e", adapter="lora"),
    "qv_lora": PerftConfig(variant="qv_lora", bottleneck=4, lora_alpha=8.0),
}


@pytest.fixture(scope="module", params=["olmoe", "mixtral"])
def converted_base(request, tmp_path_factory):
    """A tiny base model that went through the real converter (exported to HF safetensors, converted back)."""
    arch = request.param
    cfg = tiny_model_config(arch)
    root = tmp_path_factory.mktemp(f"base-{arch}")
    export_hf(init_model(cfg, seed=3), root / "hf")
    convert_hf_to_jax(root / "hf", root / "ckpt", show_progress=False)
    return root / "ckpt"


def _batch(seed: int = 0):
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, 64, (4, 12)), jnp.int32)
    mask = jnp.ones_like(ids).at[0, :3].set(0)
    return {"input_ids": ids, "labels": jnp.where(mask == 1, ids, -100), "attention_mask": mask}


def _base_params(model):
    return jax.tree.map(np.array, nnx.state(model, nnx.All(nnx.Param, nnx.Not(AdapterParam))))


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_training_moves_only_the_adapters(converted_base, name):
    perft = SETUPS[name]
    model = load_model(converted_base, perft=perft)
    before = _base_params(model)
    optimizer = make_optimizer(model, OptimConfig(learning_rate=1e-2, warmup_steps=2, schedule="linear",
                                                  total_steps=12))
    batch = _batch()
    losses = [float(train_step(model, optimizer, batch, model.config, perft)["total"]) for _ in range(12)]
    assert losses[-1] < 0.98 * losses[0], losses  # at least 2 % lower after 12 steps
    chex.assert_trees_all_equal(_base_params(model), before)  # every base weight bit-identical
    # AdamW state: exactly mu and nu for every adapter parameter, nothing for the base.
    num_adapter = sum(x.size for x in jax.tree.leaves(nnx.state(model, AdapterParam)))
    moments = [x for x in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)) if x.dtype == jnp.float32]
    assert sum(x.size for x in moments) == 2 * num_adapter


@pytest.mark.parametrize("name", ["perft_r", "perft_e", "qv_lora"])
def test_gradients_exist_only_for_adapters_and_reach_them(converted_base, name):
    perft = SETUPS[name]
    model = load_model(converted_base, perft=perft)
    grad_fn = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, AdapterParam), has_aux=True),
                      static_argnums=(2, 3))
    grads, _ = grad_fn(model, _batch(1), model.config, perft)
    flat = nnx.to_flat_state(grads)
    adapter_paths = {path for path, _ in nnx.to_flat_state(nnx.state(model, AdapterParam))}
    assert {path for path, _ in flat} == adapter_paths
    for path, g in flat:
        largest = float(jnp.max(jnp.abs(g[...])))
        if name == "qv_lora" and path[-1] == "lora_A":
            # PEFT init: B = 0, so A's gradient is exactly 0 on the first step (B's is not).
            assert largest == 0.0, path
        else:
            assert largest > 0, path  # routers and both adapter matrices learn from the first step
    chex.assert_tree_all_finite(grads)


def test_loss_terms_are_reported_separately(converted_base):
    perft = SETUPS["perft_r-dynmole"]
    model = load_model(converted_base, perft=perft)
    optimizer = make_optimizer(model, OptimConfig(learning_rate=1e-3, warmup_steps=0))
    metrics = train_step(model, optimizer, _batch(), model.config, perft)
    assert {"lm", "base_router_aux", "adapter_router_aux", "adapter_router_entropy", "total",
            "grad_norm"} <= set(metrics)
    cfg = model.config
    recomposed = (metrics["lm"] + cfg.router_aux_loss_coef * metrics["base_router_aux"]
                  + perft.dynmole.router_dyn_loss_coef * metrics["adapter_router_entropy"]
                  + perft.dynmole.router_aux_loss_coef * metrics["adapter_router_aux"])
    np.testing.assert_allclose(float(metrics["total"]), float(recomposed), rtol=1e-6)


def test_a_fresh_model_compiles_the_step_once():
    """A random base with freshly attached adapters (their dropout RNG included) is committed like a restored
    one, so the step's written-back state does not look like new inputs on the second call."""
    cfg = tiny_model_config(vocab_size=72, hidden_size=24, intermediate_size=8, num_layers=1, num_heads=2,
                            head_dim=12)
    perft = PerftConfig(variant="perft_r", num_adapters=4, top_k=2, dropout=0.1)  # shapes no other test uses
    model = attach_perft(init_model(cfg, seed=0), perft, seed=0)
    optimizer = make_optimizer(model, OptimConfig(learning_rate=1e-3, warmup_steps=0, schedule="constant"))
    before = train_step_fn._cache_size()
    for seed in range(3):
        train_step(model, optimizer, _batch(seed), cfg, perft)
    assert train_step_fn._cache_size() == before + 1
