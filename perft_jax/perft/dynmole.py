"""DynMoLE hybrid routing as a PERFT-R router option (Li et al., arXiv 2504.00661; spec/DYNMOLE.md §1-3, §8).

Normalised Tsallis entropy of the router distribution; exclusive top-p with a keep-top-k floor; broadcast
(soft routing over all M experts) when the entropy exceeds a threshold; no renormalisation; plus the
auxiliary losses (pooled Tsallis-entropy loss and a soft, padding-masked load-balance loss).

Axis letters: T tokens, M adapter experts, R pooled router rows (layers x tokens). All math in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from perft_jax.errors import UserError
from perft_jax.models.moe.routing import RouterLogits, as_layers, pool_router_rows


@dataclasses.dataclass(frozen=True)
class DynMoLEConfig:
    """DynMoLE hybrid-routing settings, with the reference code's defaults (DYNMOLE.md §2, §8).

    Frozen and hashable, so it can be a static argument of ``jax.jit``. The number of adapter experts M is
    not stored here: it is the router's width, checked by ``validate(num_experts)``.

    Attributes:
        top_p: exclusive top-p mass; sorted experts are kept while the cumulative probability is <= top_p.
        keep_top_k: the keep-top-k floor (k_min); must equal `perft.top_k` (PERFT-R's K maps to it). Spec:
            DYNMOLE.md §8, decision 1.
        entropy_threshold: broadcast to all M experts when the normalised entropy is strictly greater;
            a value >= 1.0 disables broadcasting (reference commit 2f428d3).
        entropy_index: Tsallis q in (0, 2]; 1.0 is Shannon entropy.
        entropy_eps: added to every probability before the entropy (not renormalised).
        router_dyn_loss_coef: coefficient beta of the Tsallis-entropy loss.
        router_aux_loss_coef: coefficient alpha of the soft load-balance loss.
        router_loss: when False the combined auxiliary loss is 0 (components are still returned for logging).
        mask_padding_in_entropy_loss: the reference averages the entropy over all rows, padding included
            (False, faithful); True averages over real tokens only. Spec: DYNMOLE.md §8, decision 6.
    """

    top_p: float = 0.75
    keep_top_k: int = 2
    entropy_threshold: float = 0.9
    entropy_index: float = 1.1
    entropy_eps: float = 1e-5
    router_dyn_loss_coef: float = 0.01
    router_aux_loss_coef: float = 0.001
    router_loss: bool = True
    mask_padding_in_entropy_loss: bool = False

    @property
    def broadcast_enabled(self) -> bool:
        """Whether the entropy switch is on (reference: ``entropy_index > 0 and entropy_threshold < 1.0``)."""
        return self.entropy_index > 0.0 and self.entropy_threshold < 1.0

    def validate(self, num_experts: int, prefix: str = "dynmole") -> "DynMoLEConfig":
        """Checks every field against the reference ranges (``DynMoleConfig.check``) and M.

        Args:
            num_experts: M, the number of adapter experts the router scores.
            prefix: dotted path of this config in the caller's config tree, used in error messages.

        Returns:
            self, so calls can be chained.

        Raises:
            UserError (a ValueError): one line naming the key, the expected range and the bad value.
        """

        def fail(key: str, expected: str, value: object) -> None:
            raise UserError(f"{prefix}.{key}: expected {expected}, got {value!r}")

        def is_real(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 2:
            # The normalised entropy divides by S_q^max, which is 0 for a single expert.
            fail("num_experts", "int >= 2", num_experts)
        if not (is_real(self.top_p) and 0.0 < self.top_p <= 1.0):
            fail("top_p", "float in (0, 1]", self.top_p)
        if (
            not isinstance(self.keep_top_k, int)
            or isinstance(self.keep_top_k, bool)
            or not (1 <= self.keep_top_k <= num_experts)
        ):
            fail("keep_top_k", f"int in [1, num_experts={num_experts}]", self.keep_top_k)
        if not (is_real(self.entropy_threshold) and self.entropy_threshold > 0.0):
            fail(
                "entropy_threshold",
                "float in (0, 1), or >= 1 to disable broadcasting",
                self.entropy_threshold,
            )
        if not (is_real(self.entropy_index) and 0.0 < self.entropy_index <= 2.0):
            fail("entropy_index", "float in (0, 2] (Tsallis q; 1 = Shannon)", self.entropy_index)
        if not (is_real(self.entropy_eps) and self.entropy_eps > 0.0):
            fail("entropy_eps", "float > 0", self.entropy_eps)
        for key in ("router_dyn_loss_coef", "router_aux_loss_coef"):
            value = getattr(self, key)
            if not (is_real(value) and value >= 0.0):
                fail(key, "float >= 0", value)
        for key in ("router_loss", "mask_padding_in_entropy_loss"):
            if not isinstance(getattr(self, key), bool):
                fail(key, "bool", getattr(self, key))
        return self


def tsallis_entropy(probs: jax.Array, q: float = 1.1, eps: float = 1e-5, normalize: bool = True) -> jax.Array:
    """Tsallis entropy of each router distribution, normalised by its uniform-distribution maximum.

    DynMoLE measures routing uncertainty with it (DYNMOLE.md §1):
    S_q(p) = (1 - sum_i (p_i + eps)^q) / (q - 1) (Shannon entropy for q = 1), divided by
    S_q^max = (1 - M^(1-q)) / (q - 1) (ln M for q = 1), so that one threshold means the same for every M.
    eps is added without renormalising, as in the reference, so a uniform distribution scores slightly
    below 1 (0.9997 at M = 6).

    Args:
        probs: [T, M] probabilities (any leading shape); computed in float32.
        q: static Tsallis index (the reference special-cases q == 1).
        eps: static offset added to every probability.
        normalize: divide by S_q^max (the value DynMoLE's routing and loss use).

    Returns:
        [T] float32 entropy, in about [0, 1] when normalised.
    """
    num_experts = probs.shape[-1]
    p = probs.astype(jnp.float32) + eps  # DYNMOLE.md §1: eps on every entry, NOT renormalised
    if q == 1.0:
        entropy = -jnp.sum(p * jnp.log(p), axis=-1)
        max_entropy = math.log(num_experts)
    else:
        entropy = (1.0 - jnp.sum(jnp.power(p, q), axis=-1)) / (q - 1.0)
        max_entropy = (1.0 - num_experts ** (1.0 - q)) / (q - 1.0)
    if not normalize:
        return entropy
    if num_experts < 2:
        raise UserError(f"tsallis_entropy: normalisation needs at least 2 experts, got {num_experts}")
    return entropy / jnp.float32(max_entropy)


class DynMoLERouting(NamedTuple):
    """Output of DynMoLE hybrid routing for one router; every field is float32/int32/bool.

    Attributes:
        weights: [T, M] gate weights p * mask; zeros for unselected experts, not renormalised.
        mask: [T, M] bool selected-expert mask (all True for broadcast tokens).
        probs: [T, M] router softmax over all M experts.
        entropy: [T] normalised Tsallis entropy H_t that drove the switch.
        num_selected: [T] int32 number of experts used (keep_top_k .. M); mean it for the budget report.
        broadcast: [T] bool, True where H_t > entropy_threshold (soft routing over all M experts).
    """

    weights: jax.Array
    mask: jax.Array
    probs: jax.Array
    entropy: jax.Array
    num_selected: jax.Array
    broadcast: jax.Array


def dynmole_routing_from_probs(probs: jax.Array, config: DynMoLEConfig) -> DynMoLERouting:
    """DynMoLE hybrid routing of router probabilities (reference ``_dynamic_routing``, DYNMOLE.md §2).

    Per token: keep sorted experts while the inclusive cumulative probability is <= top_p (the expert that
    crosses top_p is dropped, unlike classic nucleus routing), always keep the top ``keep_top_k``, and keep
    all M when the normalised Tsallis entropy is > entropy_threshold. The weights are the raw softmax
    probabilities of the kept experts: renormalising would be a different method (DYNMOLE.md §7.3).

    Args:
        probs: [T, M] router probabilities (any leading shape); computed in float32.
        config: static DynMoLE settings; validated against M at trace time.

    Returns:
        DynMoLERouting with [T, M] weights/mask/probs and [T] entropy/num_selected/broadcast.
    """
    num_experts = probs.shape[-1]
    config.validate(num_experts)
    probs = probs.astype(jnp.float32)  # [T, M]
    # §2.1: sort descending; lax.top_k keeps the lower index first on ties ("broken by sort order", §7.4).
    sorted_probs, order = jax.lax.top_k(probs, num_experts)  # [T, M], [T, M]
    cumulative = jnp.cumsum(sorted_probs, axis=-1)  # [T, M] inclusive c_j
    keep_sorted = cumulative <= config.top_p  # §2.1 exclusive: the crossing expert is NOT kept
    keep_sorted = keep_sorted | (jnp.arange(num_experts) < config.keep_top_k)  # §2.2 keep-top-k floor
    # §2.3 scatter back to expert order: the expert at sorted position j is order[j], so its rank is
    # argsort(order) and mask[i] = keep_sorted[rank[i]].
    rank = jnp.argsort(order, axis=-1)  # [T, M]
    mask = jnp.take_along_axis(keep_sorted, rank, axis=-1)  # [T, M]
    # §1: entropy of the full softmax (not of the masked distribution), per token, per router.
    entropy = tsallis_entropy(probs, config.entropy_index, config.entropy_eps)  # [T]
    if config.broadcast_enabled:
        broadcast = entropy > config.entropy_threshold  # §2.4 strict ">"
        mask = mask | broadcast[..., None]
    else:
        broadcast = jnp.zeros(entropy.shape, dtype=bool)
    # §2.5-2.6: raw probabilities, no renormalisation; the boolean mask carries no gradient.
    weights = probs * mask.astype(jnp.float32)  # [T, M]
    num_selected = jnp.sum(mask, axis=-1, dtype=jnp.int32)  # [T]
    return DynMoLERouting(weights, mask, probs, entropy, num_selected, broadcast)


def dynmole_routing(router_logits: jax.Array, config: DynMoLEConfig) -> DynMoLERouting:
    """DynMoLE-R gate of a PERFT-R adapter router from its logits (DYNMOLE.md §8).

    The softmax runs in float32 over the M adapter experts; each router (one per MoE layer in PERFT-R)
    makes its own per-token broadcast decision, there is no cross-layer coupling.

    Args:
        router_logits: [T, M] logits of one adapter router, any dtype (any leading shape).
        config: static DynMoLE settings (bind with functools.partial or ``static_argnames`` under jit).

    Returns:
        DynMoLERouting; multiply ``weights`` [T, M] into the M dense adapter outputs.
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [T, M]
    return dynmole_routing_from_probs(probs, config)


class DynMoLEAuxLoss(NamedTuple):
    """DynMoLE auxiliary losses over all adapter routers of all layers (DYNMOLE.md §3).

    Attributes:
        total: [] router_dyn_loss_coef * entropy_loss + router_aux_loss_coef * load_balance_loss
            (0 when ``router_loss`` is False).
        entropy_loss: [] mean normalised Tsallis entropy over the pooled rows (also the logged indicator).
        load_balance_loss: [] M * sum_i f_i * P_i.
        expert_load: [M] f, the mean (masked) routing weight per expert, not a token fraction.
        expert_prob: [M] P, the mean (masked) router probability per expert.
    """

    total: jax.Array
    entropy_loss: jax.Array
    load_balance_loss: jax.Array
    expert_load: jax.Array
    expert_prob: jax.Array


def dynmole_aux_loss(
    router_logits_per_layer: RouterLogits,
    config: DynMoLEConfig,
    attention_mask: jax.Array | None = None,
) -> DynMoLEAuxLoss:
    """DynMoLE's Tsallis-entropy loss plus its soft load-balance loss (reference ``DynMoleRouterLoss``).

    Computed once per forward pass on the pooled rows of every layer's adapter router, so both terms are
    means over (layer, token) and do not grow with depth (DYNMOLE.md §3, §7.7). The routing is recomputed
    from the logits with the same rule as ``dynmole_routing``. The load term f uses the routing *weights*
    (differentiable), not Switch's one-hot token fraction (§7.6).

    Args:
        router_logits_per_layer: a sequence over layers of [B*T, M] (or [B, T, M]) logits, or one stacked
            [L, B*T, M] array; any dtype.
        config: static DynMoLE settings.
        attention_mask: optional [B, T] mask (1 = real token), tiled over layers. It masks the load-balance
            averages; the entropy mean includes padding unless ``config.mask_padding_in_entropy_loss``.

    Returns:
        DynMoLEAuxLoss with float32 scalars and [M] per-expert statistics.
    """
    num_experts = as_layers(router_logits_per_layer)[0].shape[-1]
    config.validate(num_experts)
    rows, row_mask = pool_router_rows(router_logits_per_layer, num_experts, attention_mask)  # [R, M]
    routing = dynmole_routing(rows, config)
    if row_mask is None:
        entropy_loss = jnp.mean(routing.entropy)
        expert_load = jnp.mean(routing.weights, axis=0)  # [M]
        expert_prob = jnp.mean(routing.probs, axis=0)  # [M]
    else:
        # Reference: sum(m * x) / (sum(m) + 1e-8) for both factors of the load-balance loss.
        denom = jnp.sum(row_mask) + 1e-8
        expert_load = jnp.sum(routing.weights * row_mask[:, None], axis=0) / denom
        expert_prob = jnp.sum(routing.probs * row_mask[:, None], axis=0) / denom
        if config.mask_padding_in_entropy_loss:
            entropy_loss = jnp.sum(routing.entropy * row_mask) / denom
        else:
            entropy_loss = jnp.mean(routing.entropy)  # §3/§7.5: reference mean over ALL rows, no mask
    load_balance_loss = num_experts * jnp.sum(expert_load * expert_prob)
    if config.router_loss:
        total = config.router_dyn_loss_coef * entropy_loss + config.router_aux_loss_coef * load_balance_loss
    else:
        total = jnp.zeros((), jnp.float32)
    return DynMoLEAuxLoss(total, entropy_loss, load_balance_loss, expert_load, expert_prob)
