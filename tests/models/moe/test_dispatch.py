"""Every MoE dispatch backend equals a per-expert loop reference, forward and backward (float32)."""
from __future__ import annotations

import typing

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perft_jax.config import ModelSection
from perft_jax.models.config import MOE_BACKENDS
from perft_jax.models.moe.experts import (
    DISPATCH,
    auto_dispatch,
    capacity,
    capacity_dispatch,
    dense_dispatch,
    grouped_dispatch,
    kernel_dispatch,
    ragged_dispatch,
)
from perft_jax.models.moe.routing import topk_routing
from tests.testing_utils import lowered_ops_shaped

T, D, I, E, K = 24, 16, 8, 6, 2


def loop_reference(x, weights, indices, gate_up, down):
    """y_t = sum_k w_tk * down_e(silu(gate_e x_t) * up_e x_t), one token and one choice at a time (numpy)."""
    x, weights, gate_up, down = (np.asarray(a, np.float64) for a in (x, weights, gate_up, down))
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(indices.shape[1]):
            e = int(indices[t, k])
            h = x[t] @ gate_up[e]
            gate, up = h[:I], h[I:]
            y[t] += weights[t, k] * ((gate / (1 + np.exp(-gate)) * up) @ down[e])
    return y


@pytest.fixture
def problem():
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (T, D))
    logits = jax.random.normal(keys[1], (T, E))
    gate_up = jax.random.normal(keys[2], (E, D, 2 * I)) * 0.3
    down = jax.random.normal(keys[3], (E, I, D)) * 0.3
    weights, indices, _ = topk_routing(logits, K, renormalize=False)
    return x, weights, indices, gate_up, down


BACKENDS = {
    "dense": dense_dispatch,
    "ragged": ragged_dispatch,
    "grouped": grouped_dispatch,
    "capacity": lambda *a, **kw: capacity_dispatch(*a, capacity_factor=float(E), **kw),  # room for every pair
    "kernel": kernel_dispatch,  # on CPU: XLA's ragged_dot under the kernels' VJP (models/moe/kernels.py)
    "auto": auto_dispatch,  # on CPU: grouped
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_forward_equals_loop_reference(problem, backend):
    y, dropped = jax.jit(BACKENDS[backend])(*problem)
    chex.assert_shape(y, (T, D))
    assert int(dropped) == 0
    np.testing.assert_allclose(np.asarray(y), loop_reference(*problem), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["capacity", "grouped", "ragged"])
def test_gradients_equal_dense(problem, backend):
    """Gradients w.r.t. tokens, routing weights and expert weights agree with the dense reference."""
    def loss(fn, x, w, gu, dn):
        return jnp.sum(fn(x, w, problem[2], gu, dn)[0] ** 2)

    x, w, _, gu, dn = problem
    grads = jax.grad(lambda *a: loss(BACKENDS[backend], *a), argnums=(0, 1, 2, 3))(x, w, gu, dn)
    want = jax.grad(lambda *a: loss(dense_dispatch, *a), argnums=(0, 1, 2, 3))(x, w, gu, dn)
    chex.assert_trees_all_close(grads, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_valid_mask_computes_only_the_valid_pairs(problem, backend):
    """Expert parallelism passes `valid`: the other pairs contribute nothing, whatever their indices."""
    x, weights, indices, gate_up, down = problem
    valid = np.asarray(jax.random.bernoulli(jax.random.key(5), 0.5, indices.shape))
    y, _ = BACKENDS[backend](x, weights, jnp.where(valid, indices, 0), gate_up, down, valid=jnp.asarray(valid))
    want = loop_reference(x, np.asarray(weights) * valid, np.asarray(indices), gate_up, down)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)


def test_capacity_drops_overflow_and_counts_it():
    """All tokens pick expert 0 first: with capacity C only C first choices fit; the rest are dropped."""
    x = jax.random.normal(jax.random.key(1), (8, D))
    gate_up = jax.random.normal(jax.random.key(2), (4, D, 2 * I))
    down = jax.random.normal(jax.random.key(3), (4, I, D))
    indices = jnp.stack([jnp.zeros(8, jnp.int32), 1 + jnp.arange(8, dtype=jnp.int32) % 3], axis=1)
    weights = jnp.full((8, 2), 0.5)
    cap = capacity(8, 2, 4, capacity_factor=1.0)  # = 4 slots per expert
    y, dropped = capacity_dispatch(x, weights, indices, gate_up, down, capacity_factor=1.0)
    assert cap == 4 and int(dropped) == 4  # expert 0 gets 8 first choices for 4 slots
    # Tokens 0..3 keep both choices; tokens 4..7 keep only their second choice (choice-major priority).
    kept = np.ones((8, 2))
    kept[4:, 0] = 0
    want = loop_reference(x, np.asarray(weights) * kept, np.asarray(indices), gate_up, down)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_one_list_of_backends():
    """The dispatch table is the list: the model config's and the run config's choices are its keys."""
    assert MOE_BACKENDS == tuple(DISPATCH)
    hint = typing.get_type_hints(ModelSection)["moe_backend"]
    assert set(typing.get_args(typing.get_args(hint)[0])) == set(DISPATCH)
    assert set(BACKENDS) == set(DISPATCH)  # every backend is tested here


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_frozen_experts_get_no_weight_gradient(problem, backend):
    """The base experts are frozen: differentiating the tokens and routing weights only must leave nothing of the
    experts' size in the lowered program (no weight gradient, on every backend); differentiating them must."""
    x, weights, indices, gate_up, down = problem

    def loss(x, weights, gate_up, down):
        return jnp.sum(jnp.sin(BACKENDS[backend](x, weights, indices, gate_up, down)[0]))

    args = (x, weights, gate_up, down)
    frozen, trained = jax.grad(loss, argnums=(0, 1)), jax.grad(loss, argnums=(0, 2, 3))
    assert lowered_ops_shaped(frozen, args, gate_up.shape) == lowered_ops_shaped(frozen, args, down.shape) == 0
    assert lowered_ops_shaped(trained, args, gate_up.shape) > 0 and lowered_ops_shaped(trained, args, down.shape) > 0


def test_auto_compiles_to_grouped_on_cpu(problem):
    """`auto` is a `platform_dependent` switch; lowered for CPU only its grouped branch remains: the compiled
    backward is the grouped one, byte for byte in temporaries."""
    x, weights, indices, gate_up, down = problem

    def memory(dispatch):
        loss = lambda x, w: jnp.sum(jnp.sin(dispatch(x, w, indices, gate_up, down)[0]))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, weights).compile().memory_analysis()

    auto, grouped = memory(auto_dispatch), memory(grouped_dispatch)
    assert (auto.temp_size_in_bytes, auto.output_size_in_bytes) == (grouped.temp_size_in_bytes,
                                                                    grouped.output_size_in_bytes)
