"""Tests for perft_jax.models.moe.routing (top-K gating, HF load-balancing loss parity) and perft_jax.perft.dynmole.

Golden numbers come from spec/DYNMOLE.md (§1 calibration table, §2 worked examples and simulation table,
§3 toy check) and are compared to the digits printed there; HF parity uses transformers' own
``load_balancing_loss_func``; everything else is checked against an independent per-token NumPy oracle
written from the spec text.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perft_jax.models.moe.routing import load_balancing_loss, topk_routing
from perft_jax.perft.dynmole import (
    DynMoLEConfig,
    dynmole_aux_loss,
    dynmole_routing,
    dynmole_routing_from_probs,
    tsallis_entropy,
)

DEFAULT = DynMoLEConfig()
NO_BROADCAST = DynMoLEConfig(entropy_threshold=1.0)


def _digits(value: float, decimals: int) -> float:
    """Rounds like the spec's printed tables (half away from zero is not needed at these values)."""
    return round(float(value), decimals)


def _random_logits(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Independent NumPy oracle (DYNMOLE.md §1-3), one token at a time in float64.


def _oracle_entropy(p: np.ndarray, q: float, eps: float) -> float:
    n = len(p)
    pt = np.asarray(p, np.float64) + eps
    if q == 1.0:
        return float(-np.sum(pt * np.log(pt)) / np.log(n))
    return float(((1.0 - np.sum(pt**q)) / (q - 1.0)) / ((1.0 - n ** (1.0 - q)) / (q - 1.0)))


def _oracle_route(p: np.ndarray, cfg: DynMoLEConfig) -> tuple[np.ndarray, bool, float]:
    n = len(p)
    h = _oracle_entropy(p, cfg.entropy_index, cfg.entropy_eps)
    if cfg.entropy_threshold < 1.0 and h > cfg.entropy_threshold:
        return np.ones(n, bool), True, h
    order = sorted(range(n), key=lambda i: (-p[i], i))
    mask = np.zeros(n, bool)
    total = 0.0
    for position, expert in enumerate(order):
        total += float(p[expert])
        if position < cfg.keep_top_k or total <= cfg.top_p:
            mask[expert] = True
    return mask, False, h


def _oracle_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _oracle_aux(rows: np.ndarray, cfg: DynMoLEConfig, row_mask: np.ndarray | None) -> dict[str, np.ndarray]:
    probs = _oracle_softmax(rows)
    routed = [_oracle_route(p, cfg) for p in probs]
    weights = np.stack([p * m for p, (m, _, _) in zip(probs, routed)])
    entropy = np.array([h for _, _, h in routed])
    m = np.ones(len(rows)) if row_mask is None else np.asarray(row_mask, np.float64)
    f = (weights * m[:, None]).sum(0) / m.sum()
    big_p = (probs * m[:, None]).sum(0) / m.sum()
    lb = rows.shape[-1] * np.sum(f * big_p)
    ent = entropy.mean()
    return {
        "entropy_loss": ent,
        "load_balance_loss": lb,
        "f": f,
        "P": big_p,
        "total": cfg.router_dyn_loss_coef * ent + cfg.router_aux_loss_coef * lb,
    }


# ----------------------------------------------------------------------------------------------------------
# Top-K routing (PERFT.md §3).


class TopKRoutingTest(chex.TestCase):
    # Probabilities given as log-probabilities, so the softmax returns them.
    PROBS = np.array([[0.1, 0.4, 0.2, 0.3], [0.5, 0.05, 0.25, 0.2]], np.float32)

    @chex.variants(with_jit=True, without_jit=True)
    def test_top2_without_renormalisation(self):
        fn = self.variant(functools.partial(topk_routing, k=2, renormalize=False))
        weights, indices, probs = fn(jnp.log(self.PROBS))
        np.testing.assert_array_equal(np.asarray(indices), [[1, 3], [0, 2]])
        np.testing.assert_allclose(weights, [[0.4, 0.3], [0.5, 0.25]], rtol=1e-6)
        np.testing.assert_allclose(probs, self.PROBS, rtol=1e-6)
        chex.assert_type([weights, indices, probs], [jnp.float32, jnp.int32, jnp.float32])

    @chex.variants(with_jit=True, without_jit=True)
    def test_top2_with_renormalisation(self):
        fn = self.variant(functools.partial(topk_routing, k=2, renormalize=True))
        weights, indices, _ = fn(jnp.log(self.PROBS))
        np.testing.assert_array_equal(np.asarray(indices), [[1, 3], [0, 2]])
        np.testing.assert_allclose(weights, [[4 / 7, 3 / 7], [2 / 3, 1 / 3]], rtol=1e-6)

    def test_renormalised_equals_softmax_over_topk_logits(self):
        # Mixtral's equivalence (PERFT.md §1): renormalised top-k == softmax of the k selected logits.
        logits = _random_logits(0, (16, 8), 2.0)
        weights, indices, _ = topk_routing(jnp.asarray(logits), 3, True)
        expected = jax.nn.softmax(jnp.take_along_axis(jnp.asarray(logits), indices, axis=-1), axis=-1)
        np.testing.assert_allclose(weights, expected, rtol=1e-6, atol=1e-7)

    def test_bfloat16_input_routes_in_float32(self):
        logits = jnp.asarray(_random_logits(1, (4, 6)), jnp.bfloat16)
        weights, _, probs = topk_routing(logits, 2, False)
        chex.assert_type([weights, probs], jnp.float32)
        np.testing.assert_allclose(probs, jax.nn.softmax(logits.astype(jnp.float32), axis=-1), rtol=1e-6)

    def test_leading_dims_and_bad_k(self):
        weights, indices, probs = topk_routing(jnp.zeros((2, 3, 5)), 2, False)
        chex.assert_shape([weights, indices, probs], [(2, 3, 2), (2, 3, 2), (2, 3, 5)])
        for bad_k in (0, 6, True):
            with pytest.raises(ValueError, match="top_k"):
                topk_routing(jnp.zeros((2, 5)), bad_k, False)


# ----------------------------------------------------------------------------------------------------------
# HF load_balancing_loss_func parity (PERFT.md §4).


class LoadBalancingLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_computed(self):
        # E=2, K=1, two tokens with probs [.75, .25] and [.5+, .5-]: both pick expert 0, so f = [1, 0],
        # P = [(.75 + p) / 2, ...] and loss = 2 * P_0.
        p2 = 0.6
        logits = jnp.log(jnp.array([[0.75, 0.25], [p2, 1 - p2]], jnp.float32))
        fn = self.variant(functools.partial(load_balancing_loss, num_experts=2, top_k=1))
        np.testing.assert_allclose(fn((logits,)), 2 * (0.75 + p2) / 2, rtol=1e-6)
        # A [B, T] mask dropping the second token leaves P_0 = .75.
        mask = jnp.array([[1, 0]])
        np.testing.assert_allclose(fn((logits,), attention_mask=mask), 2 * 0.75, rtol=1e-6)

    def test_padding_is_excluded(self):
        layers = [_random_logits(20 + i, (6, 4)) for i in range(2)]
        mask = np.array([[1, 1, 0], [1, 0, 0]])
        keep = mask.reshape(-1).astype(bool)
        masked = load_balancing_loss(layers, 4, 2, attention_mask=jnp.asarray(mask))
        only_real = load_balancing_loss([z[keep] for z in layers], 4, 2)
        np.testing.assert_allclose(masked, only_real, rtol=1e-6)
        assert abs(float(masked) - float(load_balancing_loss(layers, 4, 2))) > 1e-4

    def test_shape_errors(self):
        with pytest.raises(ValueError, match="num_experts=4"):
            load_balancing_loss([jnp.zeros((6, 5))], 4, 2)
        with pytest.raises(ValueError, match="attention_mask"):
            load_balancing_loss(jnp.zeros((7, 4)), 4, 2, attention_mask=jnp.ones((2, 3)))
        with pytest.raises(ValueError, match="router_logits_per_layer"):
            load_balancing_loss([], 4, 2)


@pytest.mark.torch
class HFLoadBalancingParityTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_hf(self):
        torch = pytest.importorskip("torch")
        olmoe = pytest.importorskip("transformers.models.olmoe.modeling_olmoe")
        num_layers, batch, seq, experts, top_k = 3, 2, 5, 8, 2
        layers = [_random_logits(10 + i, (batch * seq, experts), 1.5) for i in range(num_layers)]
        mask = np.ones((batch, seq), np.int64)
        mask[0, 3:] = 0  # right padding
        mask[1, :1] = 0  # left padding
        fn = self.variant(functools.partial(load_balancing_loss, num_experts=experts, top_k=top_k))
        for attention_mask in (None, mask):
            expected = olmoe.load_balancing_loss_func(
                tuple(torch.from_numpy(z) for z in layers),
                experts,
                top_k,
                None if attention_mask is None else torch.from_numpy(attention_mask),
            ).item()
            jax_mask = None if attention_mask is None else jnp.asarray(attention_mask)
            np.testing.assert_allclose(
                fn([jnp.asarray(z) for z in layers], attention_mask=jax_mask), expected, rtol=1e-6
            )
            # Stacked [L, B*T, E] and per-layer [B, T, E] inputs give the same loss.
            np.testing.assert_allclose(fn(jnp.stack(layers), attention_mask=jax_mask), expected, rtol=1e-6)
            np.testing.assert_allclose(
                fn([jnp.asarray(z.reshape(batch, seq, experts)) for z in layers], attention_mask=jax_mask),
                expected,
                rtol=1e-6,
            )


# ----------------------------------------------------------------------------------------------------------
# DynMoLE golden numbers from spec/DYNMOLE.md.


# §1 calibration: one peak of mass m, the rest uniform, q = 1.1.
CALIBRATION = {
    4: [0.295, 0.589, 0.794, 0.892, 0.959, 0.995, 1.0],
    6: [0.255, 0.524, 0.726, 0.831, 0.912, 0.969, 1.0],
    8: [0.234, 0.490, 0.689, 0.796, 0.882, 0.948, 1.0],
}
PEAKS = [0.9, 0.75, 0.6, 0.5, 0.4, 0.3]


@pytest.mark.parametrize("n", sorted(CALIBRATION))
def test_calibration_table(n):
    rows = [[m] + [(1 - m) / (n - 1)] * (n - 1) for m in PEAKS] + [[1 / n] * n]
    h = np.asarray(tsallis_entropy(jnp.asarray(rows, jnp.float32), q=1.1))
    assert [_digits(v, 3) for v in h] == CALIBRATION[n]


def test_max_entropy_values_and_raw_threshold_fraction():
    # §1: S_q^max for q = 1.1 is 1.294 / 1.640 / 1.877, and a raw 0.9 is about 55 % of it at N = 6.
    s_max = {}
    for n, expected in ((4, 1.294), (6, 1.640), (8, 1.877)):
        s_max[n] = float(tsallis_entropy(jnp.full((1, n), 1 / n), q=1.1, normalize=False)[0])
        assert _digits(s_max[n], 3) == expected
    assert _digits(0.9 / s_max[6], 2) == 0.55


def test_threshold_peak_mass_crossover():
    # §1 / §8: tau = 0.9 broadcasts when the top expert holds less than "about" 0.50 (M=4), 0.42 (M=6) and
    # 0.38 (M=8). M=6 and M=8 hold to the printed digits; at M=4 the crossover is 0.490 (the calibration
    # table agrees: m = 0.5 gives H = 0.892 < 0.9), so "about 0.50" is checked to within 0.01.
    for n, expected, tolerance in ((4, 0.50, 0.0101), (6, 0.42, 0.005), (8, 0.38, 0.005)):
        peaks = np.arange(1 / n, 1.0, 1e-4)
        rows = np.stack([peaks] + [(1 - peaks) / (n - 1)] * (n - 1), axis=-1)
        routing = dynmole_routing_from_probs(jnp.asarray(rows, jnp.float32), DEFAULT)
        broadcast = np.asarray(routing.broadcast)
        first_sparse = peaks[np.argmin(broadcast)]
        assert broadcast[: np.argmin(broadcast)].all() and not broadcast[np.argmin(broadcast) :].any()
        assert abs(first_sparse - expected) < tolerance, (n, first_sparse)


# §2 worked examples: (p, H to the printed digits, selected experts, sum of weights, broadcast).
WORKED_EXAMPLES = [
    ([0.5, 0.2, 0.1, 0.1, 0.05, 0.05], (0.794, 3), [0, 1], 0.70, False),
    ([0.8, 0.05, 0.05, 0.04, 0.03, 0.03], (0.440, 3), [0, 1], 0.85, False),
    ([0.35, 0.25, 0.12, 0.08, 0.08, 0.05, 0.04, 0.03], (0.845, 3), [0, 1, 2], 0.72, False),
    ([0.3, 0.2, 0.2, 0.1, 0.1, 0.1], (0.946, 3), [0, 1, 2, 3, 4, 5], 1.00, True),
    ([1 / 6] * 6, (0.9997, 4), [0, 1, 2, 3, 4, 5], 1.00, True),
]


class DynMoLEWorkedExamplesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_worked_examples(self):
        fn = self.variant(functools.partial(dynmole_routing_from_probs, config=DEFAULT))
        for p, (h, decimals), selected, weight_sum, broadcast in WORKED_EXAMPLES:
            out = fn(jnp.asarray([p], jnp.float32))
            expected_w = np.zeros(len(p), np.float32)
            expected_w[selected] = np.asarray(p, np.float32)[selected]
            np.testing.assert_array_equal(out.weights[0], expected_w)  # raw probabilities, no renormalisation
            assert _digits(out.entropy[0], decimals) == h, (p, float(out.entropy[0]))
            assert _digits(jnp.sum(out.weights[0]), 2) == weight_sum
            assert int(out.num_selected[0]) == len(selected)
            assert bool(out.broadcast[0]) is broadcast

    @chex.variants(with_jit=True, without_jit=True)
    def test_toy_check(self):
        # §3: N = 4, 4 tokens, no padding.
        logits = jnp.array(
            [[2, 0.5, 0.1, -1], [0.1, 0.1, 0, 0], [-1, 3, 0, 0.2], [0, 0, 2.5, 0.3]], jnp.float32
        )
        routing = self.variant(functools.partial(dynmole_routing, config=DEFAULT))(logits)
        assert [_digits(v, 3) for v in routing.entropy] == [0.633, 0.999, 0.321, 0.529]
        np.testing.assert_array_equal(routing.broadcast, [False, True, False, False])
        np.testing.assert_array_equal(routing.num_selected, [2, 4, 2, 2])
        loss = self.variant(functools.partial(dynmole_aux_loss, config=DEFAULT))(logits)
        assert _digits(loss.entropy_loss, 4) == 0.6207
        assert [_digits(v, 4) for v in loss.expert_load] == [0.2414, 0.3263, 0.2555, 0.0946]
        assert [_digits(v, 4) for v in loss.expert_prob] == [0.2615, 0.3424, 0.2928, 0.1033]
        assert _digits(loss.load_balance_loss, 4) == 1.0376
        assert _digits(loss.total, 6) == 0.007245


@pytest.mark.parametrize(
    "scale, broadcast_pct, pct_decimals, mean_selected, sel_decimals",
    [
        (0.3, 100, 0, 6, 0),
        (0.5, 90, 0, 5.6, 1),
        (1.0, 24, 0, 3.0, 1),
        (2.0, 2, 0, 2.1, 1),
        (3.0, 0.3, 1, 2.0, 1),
    ],
)
def test_simulation_table(scale, broadcast_pct, pct_decimals, mean_selected, sel_decimals):
    # §2 "behaviour against router sharpness": i.i.d. Gaussian logits of std s, N = 6, defaults.
    logits = jax.random.normal(jax.random.key(0), (400_000, 6)) * scale
    routing = jax.jit(dynmole_routing, static_argnames="config")(logits, config=DEFAULT)
    assert _digits(100 * jnp.mean(routing.broadcast), pct_decimals) == broadcast_pct
    assert _digits(jnp.mean(routing.num_selected), sel_decimals) == mean_selected
    if scale == 1.0:
        assert _digits(jnp.mean(jnp.sum(routing.weights, axis=-1)), 2) == 0.77


# ----------------------------------------------------------------------------------------------------------
# DynMoLE properties and oracle parity.

ORACLE_CONFIGS = [
    DEFAULT,
    NO_BROADCAST,
    DynMoLEConfig(top_p=0.5, keep_top_k=1, entropy_threshold=0.8, entropy_index=1.0),
    DynMoLEConfig(top_p=0.9, keep_top_k=3, entropy_threshold=0.95, entropy_index=2.0),
    DynMoLEConfig(top_p=0.6, keep_top_k=2, entropy_threshold=0.7, entropy_index=0.5),
]


@pytest.mark.parametrize("cfg", ORACLE_CONFIGS)
def test_routing_matches_oracle(cfg):
    logits = np.concatenate([_random_logits(s, (64, 6), s) for s in (1, 2, 3)])
    out = jax.tree.map(np.asarray, dynmole_routing(jnp.asarray(logits), cfg))
    probs = _oracle_softmax(logits)
    for t, p in enumerate(probs):
        mask, broadcast, h = _oracle_route(p, cfg)
        np.testing.assert_array_equal(out.mask[t], mask, err_msg=f"token {t}")
        assert bool(out.broadcast[t]) is broadcast
        np.testing.assert_allclose(out.entropy[t], h, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(out.weights[t], p * mask, rtol=1e-5, atol=1e-7)
        assert int(out.num_selected[t]) == mask.sum()


def test_gate_properties():
    logits = jnp.asarray(
        np.concatenate(
            [_random_logits(seed, (256, 8), scale) for seed, scale in ((4, 0.5), (5, 1.0), (6, 2.0))]
        )
    )
    out = dynmole_routing(logits, DEFAULT)
    weights, mask, probs = map(np.asarray, (out.weights, out.mask, out.probs))
    # Zeros exactly off the mask, raw probabilities on it.
    np.testing.assert_array_equal(weights, np.where(mask, probs, 0.0))
    sums = weights.sum(-1)
    bc = np.asarray(out.broadcast)
    assert bc.any() and (~bc).any(), "the sample must contain both regimes"
    np.testing.assert_allclose(sums[bc], 1.0, rtol=1e-6)
    assert (sums[~bc] < 1.0).all()
    # Broadcast exactly when H > threshold, and then all M experts.
    np.testing.assert_array_equal(bc, np.asarray(out.entropy) > DEFAULT.entropy_threshold)
    assert mask[bc].all()
    # Keep-top-k floor: the 2 most probable experts are always selected, at least 2 experts per token.
    top2 = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
    assert np.take_along_axis(mask, top2, axis=-1).all()
    assert (np.asarray(out.num_selected) >= 2).all()
    # Sparse tokens: every kept expert beyond the floor fits within top_p cumulatively.
    for t in np.flatnonzero(~bc):
        if mask[t].sum() > 2:
            assert weights[t].sum() <= DEFAULT.top_p + 1e-6


def test_exclusive_top_p_boundary():
    # Sorted [.4, .3, .2, .1]: c = [.4, .7, .9, 1.]; classic nucleus at .75 keeps 3, DynMoLE keeps 2.
    probs = jnp.array([[0.2, 0.4, 0.1, 0.3]], jnp.float32)
    out = dynmole_routing_from_probs(probs, DynMoLEConfig(keep_top_k=1, entropy_threshold=1.0))
    np.testing.assert_array_equal(out.mask[0], [False, True, False, True])


def test_keep_top_k_floor_overrides_top_p():
    probs = jnp.array([[0.05, 0.7, 0.15, 0.1]], jnp.float32)
    out = dynmole_routing_from_probs(probs, DynMoLEConfig(top_p=0.1, keep_top_k=3, entropy_threshold=1.0))
    np.testing.assert_array_equal(out.mask[0], [False, True, True, True])
    out = dynmole_routing_from_probs(probs, DynMoLEConfig(top_p=0.1, keep_top_k=1, entropy_threshold=1.0))
    np.testing.assert_array_equal(out.mask[0], [False, True, False, False])


def test_ties_go_to_lower_index():
    probs = jnp.array([[0.1, 0.3, 0.3, 0.3]], jnp.float32)
    out = dynmole_routing_from_probs(probs, DynMoLEConfig(top_p=0.35, keep_top_k=1, entropy_threshold=1.0))
    np.testing.assert_array_equal(out.mask[0], [False, True, False, False])


def test_broadcast_switch_is_strict_and_can_be_disabled():
    probs = jnp.array([[0.3, 0.2, 0.2, 0.1, 0.1, 0.1]], jnp.float32)
    h = float(dynmole_routing_from_probs(probs, DEFAULT).entropy[0])
    at = dynmole_routing_from_probs(probs, DynMoLEConfig(entropy_threshold=h))
    just_below = float(np.nextafter(np.float32(h), np.float32(0.0)))  # the next float32 below H
    below = dynmole_routing_from_probs(probs, DynMoLEConfig(entropy_threshold=just_below))
    assert not bool(at.broadcast[0]) and int(at.num_selected[0]) == 3  # strict ">"; top-p keeps .3+.2+.2
    assert bool(below.broadcast[0]) and int(below.num_selected[0]) == 6
    uniform = jnp.full((1, 6), 1 / 6)
    off = dynmole_routing_from_probs(uniform, DynMoLEConfig(entropy_threshold=1.0))
    assert not bool(off.broadcast[0]) and int(off.num_selected[0]) < 6


def test_shannon_entropy_branch():
    p = np.array([0.6, 0.2, 0.1, 0.1])
    h = tsallis_entropy(jnp.asarray([p], jnp.float32), q=1.0, eps=1e-5)
    expected = -np.sum((p + 1e-5) * np.log(p + 1e-5)) / np.log(4)
    np.testing.assert_allclose(h[0], expected, rtol=1e-6)


def test_bfloat16_logits_and_gradients():
    logits = jnp.asarray(_random_logits(7, (32, 6), 2.0), jnp.bfloat16)
    out = dynmole_routing(logits, DEFAULT)
    chex.assert_type([out.weights, out.probs, out.entropy, out.num_selected], [jnp.float32] * 3 + [jnp.int32])
    chex.assert_shape([out.weights, out.mask, out.entropy, out.broadcast], [(32, 6), (32, 6), (32,), (32,)])
    # Gradients reach the router through the selected probabilities and both losses (§2.6).
    grad = jax.jit(jax.grad(lambda z: dynmole_aux_loss(z, DEFAULT).total))(logits.astype(jnp.float32))
    chex.assert_tree_all_finite(grad)
    assert float(jnp.abs(grad).max()) > 0
    # A broadcast token's weights sum to 1 whatever the logits, so its gradient vanishes; a sparse one's not.
    z = jnp.array([[0.1, 0.0, -0.1, 0.05], [3.0, 0.0, -1.0, 0.5]])
    g = jax.jit(jax.grad(lambda x: jnp.sum(dynmole_routing(x, DEFAULT).weights)))(z)
    np.testing.assert_allclose(g[0], 0.0, atol=1e-6)
    assert float(jnp.abs(g[1]).max()) > 1e-3


class DynMoLEAuxLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_oracle_with_padding(self):
        num_layers, batch, seq, experts = 3, 2, 4, 6
        layers = [_random_logits(30 + i, (batch * seq, experts), 1.5 + i) for i in range(num_layers)]
        mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
        row_mask = np.tile(mask.reshape(-1), num_layers)
        rows = np.concatenate(layers)
        fn = self.variant(functools.partial(dynmole_aux_loss, config=DEFAULT))
        for attention_mask, oracle_mask in ((None, None), (jnp.asarray(mask), row_mask)):
            expected = _oracle_aux(rows, DEFAULT, oracle_mask)
            for inputs in ([jnp.asarray(z) for z in layers], jnp.stack(layers)):
                got = fn(inputs, attention_mask=attention_mask)
                np.testing.assert_allclose(got.entropy_loss, expected["entropy_loss"], rtol=1e-5)
                np.testing.assert_allclose(got.load_balance_loss, expected["load_balance_loss"], rtol=1e-5)
                np.testing.assert_allclose(got.expert_load, expected["f"], rtol=1e-5)
                np.testing.assert_allclose(got.expert_prob, expected["P"], rtol=1e-5)
                np.testing.assert_allclose(got.total, expected["total"], rtol=1e-5)

    def test_masking_rules(self):
        layers = [_random_logits(40 + i, (6, 4), 2.0) for i in range(2)]
        mask = np.array([[1, 1, 0], [1, 0, 0]])
        keep = mask.reshape(-1).astype(bool)
        masked = dynmole_aux_loss(layers, DEFAULT, attention_mask=jnp.asarray(mask))
        real_only = dynmole_aux_loss([z[keep] for z in layers], DEFAULT)
        unmasked = dynmole_aux_loss(layers, DEFAULT)
        # Load balance: padding excluded. Entropy: the reference averages over every row, padding included.
        np.testing.assert_allclose(masked.load_balance_loss, real_only.load_balance_loss, rtol=1e-5)
        np.testing.assert_allclose(masked.entropy_loss, unmasked.entropy_loss, rtol=1e-6)
        assert abs(float(masked.entropy_loss) - float(real_only.entropy_loss)) > 1e-4
        opt_in = dynmole_aux_loss(
            layers,
            dataclasses.replace(DEFAULT, mask_padding_in_entropy_loss=True),
            attention_mask=jnp.asarray(mask),
        )
        np.testing.assert_allclose(opt_in.entropy_loss, real_only.entropy_loss, rtol=1e-5)

    def test_uniform_broadcast_gives_unit_load_balance(self):
        # §3: every token broadcast with a uniform pooled mean -> L_lb = 1.
        out = dynmole_aux_loss(jnp.zeros((5, 6)), DEFAULT)
        np.testing.assert_allclose(out.load_balance_loss, 1.0, rtol=1e-6)

    def test_router_loss_off_and_coefficients(self):
        logits = jnp.asarray(_random_logits(50, (12, 6), 2.0))
        on = dynmole_aux_loss(logits, DEFAULT)
        off = dynmole_aux_loss(logits, DynMoLEConfig(router_loss=False))
        assert float(off.total) == 0.0 and float(on.total) > 0.0
        np.testing.assert_allclose(off.entropy_loss, on.entropy_loss)
        np.testing.assert_allclose(on.total, 0.01 * on.entropy_loss + 0.001 * on.load_balance_loss, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize(
    "changes, num_experts, key",
    [
        ({"keep_top_k": 5}, 4, "keep_top_k"),
        ({"keep_top_k": 0}, 4, "keep_top_k"),
        ({"keep_top_k": True}, 4, "keep_top_k"),
        ({"keep_top_k": 2.0}, 4, "keep_top_k"),
        ({"top_p": 0.0}, 4, "top_p"),
        ({"top_p": 1.5}, 4, "top_p"),
        ({"top_p": float("nan")}, 4, "top_p"),
        ({"entropy_threshold": 0.0}, 4, "entropy_threshold"),
        ({"entropy_threshold": -0.5}, 4, "entropy_threshold"),
        ({"entropy_threshold": "high"}, 4, "entropy_threshold"),
        ({"entropy_index": 0.0}, 4, "entropy_index"),
        ({"entropy_index": 2.5}, 4, "entropy_index"),
        ({"entropy_eps": 0.0}, 4, "entropy_eps"),
        ({"router_dyn_loss_coef": -0.01}, 4, "router_dyn_loss_coef"),
        ({"router_aux_loss_coef": -1e-3}, 4, "router_aux_loss_coef"),
        ({"router_loss": 1}, 4, "router_loss"),
        ({}, 1, "num_experts"),
    ],
)
def test_config_validation_errors(changes, num_experts, key):
    cfg = dataclasses.replace(DEFAULT, **changes)
    with pytest.raises(ValueError) as info:
        cfg.validate(num_experts)
    message = str(info.value)
    assert message.startswith(f"dynmole.{key}:") and "\n" not in message, message


def test_config_validation_accepts_edges_and_prefix():
    DEFAULT.validate(6)
    DynMoLEConfig(top_p=1.0, keep_top_k=4, entropy_threshold=1.5, entropy_index=2.0).validate(4)
    DynMoLEConfig(entropy_index=1.0, keep_top_k=2, router_loss=False).validate(2)
    with pytest.raises(ValueError, match=r"^perft\.router\.dynmole\.keep_top_k: .*num_experts=2"):
        DynMoLEConfig(keep_top_k=3).validate(2, prefix="perft.router.dynmole")


def test_routing_rejects_config_that_does_not_fit_the_router():
    with pytest.raises(ValueError, match="keep_top_k"):
        dynmole_routing(jnp.zeros((3, 2)), DynMoLEConfig(keep_top_k=3))
    with pytest.raises(ValueError, match="keep_top_k"):
        jax.jit(dynmole_aux_loss, static_argnames="config")(
            jnp.zeros((3, 2)), config=DynMoLEConfig(keep_top_k=3)
        )


def test_config_is_frozen_and_hashable():
    with pytest.raises(Exception):
        DEFAULT.top_p = 0.5  # type: ignore[misc]
    assert hash(DEFAULT) == hash(DynMoLEConfig())
