"""Sorted, block-padded grouped matmul (models/moe/grouped.py), and the routed adapter bank through every routed
pipeline (models/moe/experts.py `ROUTED_FFN`)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perft_jax.models.moe import experts, grouped, kernels
from perft_jax.perft.adapters import AdapterBank, AdapterParam
from perft_jax.perft.config import PerftConfig


def loop_reference(x, weights, indices, w):
    """y_p = x[p // K] @ w[group of p], one pair at a time."""
    k = indices.shape[1]
    return np.stack([x[p // k] @ w[g] for p, g in enumerate(indices.reshape(-1))])


@pytest.mark.parametrize("num_groups,block", [(4, 8), (16, 8), (3, 64), (64, None)])
def test_grouped_matmul_equals_per_pair_loop(num_groups, block):
    rng = np.random.default_rng(num_groups)
    t, k, d, f = 50, 2, 6, 5
    x = rng.normal(size=(t, d)).astype(np.float32)
    w = rng.normal(size=(num_groups, d, f)).astype(np.float32)
    # Skewed routing, some groups empty: padding and empty groups are the edge cases.
    indices = np.minimum(rng.geometric(0.4, size=(t, k)) - 1, num_groups - 1).astype(np.int32)
    layout = grouped.block_layout(jnp.asarray(indices.reshape(-1)), num_groups, block)
    blocks = grouped.gather_rows(jnp.asarray(x), layout, pairs_per_row=k)
    out = grouped.scatter_rows(grouped.grouped_matmul(blocks, jnp.asarray(w), layout), layout)
    np.testing.assert_allclose(np.asarray(out), loop_reference(x, None, indices, w), rtol=1e-5, atol=1e-5)


def test_layout_bounds_padding_and_keeps_group_order():
    ids = jnp.asarray([2, 0, 2, 2, 1, 0, 2], jnp.int32)
    layout = grouped.block_layout(ids, 3, block=2)
    assert layout.num_rows == (4 + 3 - 1) * 2  # ceil(7/2) + G - 1 blocks, whatever the routing
    row_pair = np.asarray(layout.row_pair)
    # group 0: pairs 1, 5 | group 1: pair 4, padding | group 2: pairs 0, 2, 3, 6; then padding blocks
    np.testing.assert_array_equal(row_pair[:8], [1, 5, 4, 7, 0, 2, 3, 6])
    assert (row_pair[8:] == 7).all()
    np.testing.assert_array_equal(np.asarray(layout.group_end_block), [1, 2, 4])  # blocks [0,1) [1,2) [2,4)
    np.testing.assert_array_equal(row_pair[np.asarray(layout.pair_row)], np.arange(7))


def dense_gates(weights, indices, num):
    rows = jnp.arange(weights.shape[0])[:, None]
    return jnp.zeros((weights.shape[0], num), weights.dtype).at[rows, indices].set(weights)


# Routed pipelines the banks can run through (experts.ROUTED_FFN), with the kernel one per CPU-runnable gmm impl.
PIPELINES = {"grouped": "grouped", "auto": "auto", "kernel-xla": functools.partial(kernels.routed_ffn, impl="xla"),
             "kernel-megablox": functools.partial(kernels.routed_ffn, impl="megablox", interpret=True)}


def _routed_problem(form, m=8, k=2, t=40, d=16, empty=(3, 6, 7)):
    bank = AdapterBank(m, d, PerftConfig(adapter=form, bottleneck=4, num_adapters=m), nnx.Rngs(0))
    bank_w2 = bank.lora_B if form == "lora" else bank.adapter_w2
    bank_w2[...] = jax.random.normal(jax.random.key(3), bank_w2.shape) * 0.1  # not near-zero: a real check
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (t, d))
    logits = jax.random.normal(keys[1], (t, m)).at[:, list(empty)].set(-30.0)  # adapter groups nobody picks
    weights, indices = jax.lax.top_k(jax.nn.softmax(logits), k)
    assert not np.isin(np.asarray(indices), empty).any()
    return bank, x, weights, indices


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
@pytest.mark.parametrize("form", ["lora", "parallel_adapter"])
def test_routed_bank_equals_dense_gated_bank_with_gradients(form, pipeline, monkeypatch):
    """Each routed pipeline (empty adapter groups first, middle and last) against every adapter densely gated,
    float32, forward and every gradient; the adapters' weight gradients are there and nonzero."""
    dispatch = PIPELINES[pipeline]
    if callable(dispatch):  # a kernel impl other than the platform's: run as the "kernel" pipeline
        monkeypatch.setitem(experts.ROUTED_FFN, "kernel", dispatch)
        dispatch = "kernel"
    m = 8
    bank, x, weights, indices = _routed_problem(form, m)

    def forward(bank, x, weights, sparse):
        return bank.routed(x, weights, indices, dispatch) if sparse else bank(x, dense_gates(weights, indices, m))

    def loss(bank, x, weights, sparse):
        return jnp.sum(jnp.sin(forward(bank, x, weights, sparse)))

    grad = nnx.grad(loss, argnums=(0, 1, 2))
    got_grads = grad(bank, x, weights, True)
    for leaf in jax.tree.leaves(nnx.state(got_grads[0], AdapterParam)):
        assert np.linalg.norm(np.asarray(leaf)) > 0  # adapters are trained: their weight gradient is built
    # Sums run in another order: compare outputs and every gradient leaf by relative L2 error.
    pairs = [(forward(bank, x, weights, True), forward(bank, x, weights, False))]
    pairs += zip(jax.tree.leaves(got_grads), jax.tree.leaves(grad(bank, x, weights, False)))
    for got, want in pairs:
        got, want = np.asarray(got), np.asarray(want)
        assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want)


@pytest.mark.parametrize("dispatch", ["grouped", "kernel", "auto"])
def test_routed_bank_dropout_draws_one_key_outside_the_pipeline(dispatch):
    """With dropout on, every pipeline runs under jit (where `auto` traces it inside lax.platform_dependent, and
    an nnx RNG stream advanced there raises TraceContextError) and the dropout stream advances once per call."""
    bank = AdapterBank(4, 16, PerftConfig(adapter="lora", bottleneck=4, num_adapters=4, dropout=0.5),
                       nnx.Rngs(params=0, dropout=1))
    x = jax.random.normal(jax.random.key(0), (12, 16))
    weights, indices = jax.lax.top_k(jax.nn.softmax(jax.random.normal(jax.random.key(1), (12, 4))), 2)
    run = nnx.jit(lambda bank, x, weights: bank.routed(x, weights, indices, dispatch))
    count = int(bank.dropout.rngs.count[...])
    first, second = run(bank, x, weights), run(bank, x, weights)
    assert int(bank.dropout.rngs.count[...]) == count + 2
    assert np.isfinite(np.asarray(first)).all() and not np.allclose(first, second)  # a fresh mask per call


def test_frozen_weights_get_no_weight_gradient_loop():
    """The base experts are frozen: differentiating w.r.t. the rows only must leave the forward loop and the
    dx loop in the compiled program, not the dW loop (ENGINEERING.md §5: custom-VJP grouped kernels that
    always compute both gradients double the frozen base's backward)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(40, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 8, 8)), jnp.float32)
    layout = grouped.block_layout(jnp.asarray(rng.integers(0, 4, size=40), jnp.int32), 4, block=8)

    def loss(x, w):
        return jnp.sum(grouped.grouped_matmul(grouped.gather_rows(x, layout), w, layout) ** 2)

    def loops(fn):
        hlo = jax.jit(fn).lower(x, w).compile().as_text()
        return sum(" while(" in line for line in hlo.splitlines())

    forward = loops(loss)  # the loop over groups and, inside it, the loop over a group's blocks
    assert forward == 2
    assert loops(jax.grad(loss, argnums=0)) == 2 * forward  # forward, dx
    assert loops(jax.grad(loss, argnums=(0, 1))) == 3 * forward  # forward, dx, dW
