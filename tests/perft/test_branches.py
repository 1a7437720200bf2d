"""PERFT compositions on tiny models: shapes, exact-zero start, routing against hand computation, routed adapters
on the base experts' backend."""
from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import tiny_model_config

from perft_jax import ModelConfig, UserError, init_model
from perft_jax.config_parsing import from_dict
from perft_jax.optim import OptimConfig
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.attach import attach_perft
from perft_jax.perft.branches import RoutedAdapters
from perft_jax.perft.config import PerftConfig
from perft_jax.sharding import LogicalSharding, MeshConfig, build_mesh, remember_sharding
from perft_jax.train.optim import make_optimizer
from perft_jax.train.step import loss_fn, train_step

VARIANTS = ["perft_s", "perft_d", "perft_r", "perft_e", "qv_lora"]
D, E, K_BASE, M, K, R = 32, 4, 2, 3, 2, 5


def tiny_config(arch: str) -> ModelConfig:
    return tiny_model_config(arch, hidden_size=D, num_experts=E, num_experts_per_tok=K_BASE)


def adapter_shapes(model) -> dict[str, tuple[int, ...]]:
    flat = nnx.to_flat_state(nnx.state(model, AdapterParam))
    return {"/".join(map(str, path)): tuple(var.shape) for path, var in flat}


EXPECTED_LAYER_SHAPES = {
    # variant: (adapter form, shapes of layer 0's adapters)
    "perft_s": {"layers/0/moe/adapters/bank/adapter_w1": (1, D, R), "layers/0/moe/adapters/bank/adapter_w2": (1, R, D)},
    "perft_d": {"layers/0/moe/adapters/bank/adapter_w1": (M, D, R), "layers/0/moe/adapters/bank/adapter_w2": (M, R, D)},
    "perft_r": {"layers/0/moe/adapters/bank/adapter_w1": (M, D, R), "layers/0/moe/adapters/bank/adapter_w2": (M, R, D),
                "layers/0/moe/adapters/router": (D, M)},
    "perft_e": {"layers/0/moe/adapters/bank/adapter_w1": (E, D, R), "layers/0/moe/adapters/bank/adapter_w2": (E, R, D)},
    "qv_lora": {"layers/0/attn/q_lora/lora_A": (D, R), "layers/0/attn/q_lora/lora_B": (R, 32),
                "layers/0/attn/v_lora/lora_A": (D, R), "layers/0/attn/v_lora/lora_B": (R, 16)},
}


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_adapter_shapes_and_zero_init_is_the_base_model(arch, variant):
    cfg = tiny_config(arch)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)), jnp.int32)
    base = init_model(cfg)(ids)
    perft = PerftConfig(variant=variant, bottleneck=R, num_adapters=M, top_k=K, init="zero")
    model = attach_perft(init_model(cfg), perft)
    shapes = adapter_shapes(model)
    layer0 = {k: v for k, v in shapes.items() if k.startswith("layers/0/")}
    assert layer0 == EXPECTED_LAYER_SHAPES[variant]
    assert len(shapes) == 2 * len(layer0)  # both layers carry the same adapters
    out = model(ids)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(base.logits))  # bit for bit
    if variant == "perft_r":
        chex.assert_shape(out.adapter_router_logits, (cfg.num_layers, 2, 7, M))
    else:
        assert out.adapter_router_logits is None


def test_lora_form_shapes():
    model = attach_perft(init_model(tiny_config("olmoe")),
                         PerftConfig(variant="perft_r", adapter="lora", bottleneck=R, num_adapters=M, top_k=K))
    shapes = adapter_shapes(model)
    assert shapes["layers/1/moe/adapters/bank/lora_A"] == (M, D, R)
    assert shapes["layers/1/moe/adapters/bank/lora_B"] == (M, R, D)


def test_near_zero_init_scales():
    """First matrix ~ N(0, 2 / out) with out = r (PERFT.md §8.5); second ~ N(0, 1e-12)."""
    model = attach_perft(init_model(tiny_config("olmoe")),
                         PerftConfig(variant="perft_e", adapter="lora", bottleneck=64))
    first = np.asarray(model.layers[0].moe.adapters.bank.lora_A[...])
    second = np.asarray(model.layers[0].moe.adapters.bank.lora_B[...])
    assert first.std() == pytest.approx(np.sqrt(2 / 64), rel=0.05)
    assert second.std() == pytest.approx(1e-6, rel=0.05)


# ---- PERFT-R routing against a by-hand computation ----

def reference_routed(x, router, w1, w2, k, renormalize, base_weights=None):
    """y_t = sum_{j in topK(p_t)} g_tj * W2_j silu(W1_j x_t), numpy float64, one token at a time."""
    x, router, w1, w2 = (np.asarray(a, np.float64) for a in (x, router, w1, w2))
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        logits = x[t] @ router
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p)[:k]
        g = p[top] / p[top].sum() if renormalize else p[top]
        if base_weights is not None:  # reference OLMoE quirk: slot s weighted by the s-th base weight
            g = np.asarray(base_weights[t, :k], np.float64)
        for slot, j in enumerate(top):
            h = x[t] @ w1[j]
            y[t] += g[slot] * ((h / (1 + np.exp(-h))) @ w2[j])
    return y


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("gate_weights", ["adapter_router", "base_router_rank"])
def test_routed_adapters_match_hand_computation(renormalize, gate_weights):
    cfg = PerftConfig(variant="perft_r", bottleneck=R, num_adapters=4, top_k=2, adapter_gate_weights=gate_weights)
    branch = RoutedAdapters(D, cfg, renormalize, nnx.Rngs(0), jnp.float32, jnp.float32)
    keys = jax.random.split(jax.random.key(1), 4)
    branch.router[...] = jax.random.normal(keys[0], (D, 4))
    branch.bank.adapter_w2[...] = jax.random.normal(keys[1], (4, R, D)) * 0.1
    x = jax.random.normal(keys[2], (9, D))
    base_weights = jax.nn.softmax(jax.random.normal(keys[3], (9, K_BASE)))  # any [T, k] weights
    base_weights = -jnp.sort(-base_weights, axis=-1)
    y, logits = branch(x, base_weights, jnp.zeros((9, K_BASE), jnp.int32))
    want = reference_routed(x, branch.router[...], branch.bank.adapter_w1[...], branch.bank.adapter_w2[...], 2,
                            renormalize, base_weights if gate_weights == "base_router_rank" else None)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(x) @ np.asarray(branch.router[...]), rtol=1e-5)


def test_perft_r_follows_the_base_models_renormalisation():
    for arch, renorm in (("olmoe", False), ("mixtral", True)):
        model = attach_perft(init_model(tiny_config(arch)), PerftConfig(variant="perft_r", top_k=2))
        assert model.layers[0].moe.adapters.renormalize is renorm


# ---- routed adapters on the base experts' path (issue 13) ----

@pytest.mark.parametrize("backend,pipeline", [("grouped", "grouped"), ("kernel", "kernel"), ("auto", "auto"),
                                              ("dense", "auto"), ("capacity", "auto"), ("ragged", "auto")])
def test_routed_adapters_follow_the_moe_backend(backend, pipeline):
    cfg = tiny_config("olmoe").replace(moe_backend=backend)
    for variant in ("perft_r", "perft_e"):
        model = attach_perft(init_model(cfg), PerftConfig(variant=variant, num_adapters=M, top_k=K))
        assert model.layers[0].moe.adapters.dispatch == pipeline
    # On a device mesh (here a one-device one): densely gated, whatever the backend.
    model = init_model(cfg)
    remember_sharding(model, LogicalSharding.create(build_mesh(MeshConfig())))
    assert attach_perft(model, PerftConfig(variant="perft_e")).layers[0].moe.adapters.dispatch == "dense"


def _batch():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    mask = jnp.ones_like(ids).at[0, :3].set(0)
    return {"input_ids": ids, "labels": jnp.where(mask == 1, ids, -100), "attention_mask": mask}


def _compiled_sorts(backend: str, variant: str) -> int:
    """Sort ops in the optimised HLO of a jitted forward + backward on one tiny batch."""
    cfg = tiny_config("olmoe").replace(moe_backend=backend)
    perft = PerftConfig(variant=variant, bottleneck=R, num_adapters=M, top_k=K)
    model = attach_perft(init_model(cfg), perft)
    trained = AdapterParam if variant != "none" else nnx.Param  # the base alone: its full backward
    step = nnx.jit(nnx.grad(lambda m, b: loss_fn(m, b, cfg, perft), argnums=nnx.DiffState(0, trained), has_aux=True))
    return len(re.findall(r"\ssort\(", step.lower(model, _batch()).compile().as_text()))


@pytest.mark.parametrize("backend", ["grouped", "kernel"])
def test_perft_e_sorts_no_more_than_the_base(backend):
    """PERFT-E's adapters route by exactly the base's (weights, indices) through the base's pipeline, so they
    sort exactly as the experts do, and XLA's CSE merges the two sorts: no sort of its own. (Traced, each layer
    has two argsorts; compiled, one.) PERFT-R's own router adds one sort per layer."""
    base = _compiled_sorts(backend, "none")
    assert base == tiny_config("olmoe").num_layers
    assert _compiled_sorts(backend, "perft_e") == base
    assert _compiled_sorts(backend, "perft_r") == 2 * base


def test_kernel_backend_trains_one_step_as_grouped_does():
    """PERFT-R and PERFT-E on the `kernel` backend (adapters through the grouped-matmul kernels, XLA's on CPU)
    and on `grouped`: the same loss, gradients and updated adapters, float32."""
    batch = _batch()
    for variant in ("perft_r", "perft_e"):
        perft = PerftConfig(variant=variant, bottleneck=R, num_adapters=M, top_k=K)
        results = []
        for backend in ("grouped", "kernel"):
            cfg = tiny_config("olmoe").replace(moe_backend=backend)
            model = attach_perft(init_model(cfg, seed=1), perft, seed=2)
            grad_fn = nnx.jit(nnx.grad(lambda m, b: loss_fn(m, b, cfg, perft), argnums=nnx.DiffState(0, AdapterParam),
                                       has_aux=True))
            grads, _ = grad_fn(model, batch)
            optimizer = make_optimizer(model, OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant"))
            loss = train_step(model, optimizer, batch, cfg, perft)["total"]
            results.append((loss, nnx.to_pure_dict(grads), nnx.to_pure_dict(nnx.state(model, AdapterParam))))
        (loss, grads, after), (want_loss, want_grads, want_after) = results
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_close(after, want_after, rtol=1e-5, atol=1e-7)


# ---- configuration errors name the key ----

@pytest.mark.parametrize("data, message", [
    ({"variant": "perft_x"}, "perft.variant: expected one of 'none', 'perft_s'"),
    ({"num_adapters": 2, "top_k": 3}, "perft.top_k: expected an integer in [1, num_adapters=2], got 3"),
    ({"bottleneck": 0}, "perft.bottleneck: expected a positive integer"),
    ({"router": "dynmole", "num_adapters": 2, "top_k": 2, "dynmole": {"keep_top_k": 3}},
     "perft.dynmole.keep_top_k: expected int in [1, num_experts=2], got 3"),
    ({"router": "dynmole", "num_adapters": 4, "top_k": 1}, "perft.dynmole.keep_top_k: must equal perft.top_k=1"),
    ({"num_adapter": 4}, "perft.num_adapter: unknown key"),
    ({"dynmole": {"top_q": 0.5}}, "perft.dynmole.top_q: unknown key"),
    ({"dropout": "high"}, "perft.dropout: expected a number, got 'high'"),
])
def test_bad_configs_are_refused_naming_the_key(data, message):
    with pytest.raises(UserError) as err:
        from_dict(PerftConfig, data, "perft")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_quirk_needs_top_k_within_base_top_k():
    cfg = PerftConfig(variant="perft_r", num_adapters=4, top_k=3, adapter_gate_weights="base_router_rank")
    with pytest.raises(UserError, match="perft.top_k: expected at most the base top-k=2"):
        attach_perft(init_model(tiny_config("olmoe")), cfg)
