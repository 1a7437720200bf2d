"""Top-K routing and the load-balancing loss, shared by the frozen base router and PERFT-R's adapter router.

Implements, as pure jit-able JAX functions:

- PERFT-R top-K gating (PERFT, arXiv 2411.08212, spec/PERFT.md §3): softmax in float32 over the M adapter
  experts, top-K, renormalise the K weights iff the base model does (HF OLMoE ``norm_topk_prob``, Mixtral
  always).
- The Switch/Mixtral load-balancing loss exactly as HF transformers' ``load_balancing_loss_func``
  (spec/PERFT.md §4): all layers' rows pooled, padding excluded from both averages.

DynMoLE's hybrid routing, which builds on these, is in perft_jax/perft/dynmole.py.

Axis letters: T tokens (any leading shape is allowed where noted), M adapter experts, K top-k,
R pooled router rows (layers x tokens), E experts of a generic router. All math runs in float32 whatever
the input dtype; casting the gate weights back to the compute dtype is the caller's job (PERFT.md §3).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp

from perft_jax.errors import UserError

RouterLogits = Union[jax.Array, Sequence[jax.Array]]


def topk_routing(
    router_logits: jax.Array, k: int, renormalize: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-K gate of a PERFT-R adapter router (or of a frozen OLMoE/Mixtral router).

    The softmax runs over all M experts *before* the top-K (HF ``OlmoeTopKRouter``/``MixtralTopKRouter``), so
    without renormalisation the K weights sum to less than 1; PERFT.md §3/§8.2 require renormalising exactly
    when the base model does, which is why ``renormalize`` is an explicit argument and not a default.

    Args:
        router_logits: [T, M] router logits, any dtype (any leading shape instead of T is accepted).
        k: number of experts per token, a static int in [1, M].
        renormalize: static bool; divide the K weights by their sum (Mixtral; OLMoE iff ``norm_topk_prob``).

    Returns:
        weights: [T, K] float32 gate weights, in descending order of probability.
        indices: [T, K] int32 expert indices (ties go to the lower index).
        probs: [T, M] float32 softmax over all M experts (for aux losses and logging).
    """
    num_experts = router_logits.shape[-1]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_experts:
        raise UserError(f"top_k: expected int in [1, num_experts={num_experts}], got {k!r}")
    # HF: softmax(router_logits, dtype=torch.float) -> fp32 whatever the compute dtype (PERFT.md §1).
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [T, M]
    weights, indices = jax.lax.top_k(probs, k)  # [T, K]
    if renormalize:
        # HF OLMoE/Mixtral: router_top_value /= router_top_value.sum(dim=-1, keepdim=True).
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, indices.astype(jnp.int32), probs


def as_layers(router_logits_per_layer: RouterLogits) -> list[jax.Array]:
    """Returns the per-layer logits as a list (one entry for a single or stacked array)."""
    if isinstance(router_logits_per_layer, (list, tuple)):
        if not router_logits_per_layer:
            raise UserError("router_logits_per_layer: expected at least one layer, got an empty sequence")
        return [jnp.asarray(z) for z in router_logits_per_layer]
    return [jnp.asarray(router_logits_per_layer)]


def pool_router_rows(
    router_logits_per_layer: RouterLogits, num_experts: int, attention_mask: jax.Array | None
) -> tuple[jax.Array, jax.Array | None]:
    """Concatenates all layers' router logits into one [R, E] fp32 table and tiles the padding mask to it.

    Both HF (PERFT.md §4) and DynMoLE (DYNMOLE.md §3, MoE-PEFT issue #6) pool the rows of every layer before
    averaging, so the losses are means over (layer, token) rather than per-layer sums. Rows are layer-major,
    each layer holding B*T rows in the order of ``attention_mask.reshape(-1)``.

    Returns:
        rows: [R, E] float32 logits.
        row_mask: [R] float32 (1 = real token), or None without an attention mask.
    """
    layers = as_layers(router_logits_per_layer)
    for z in layers:
        if z.ndim < 2 or z.shape[-1] != num_experts:
            raise UserError(
                "router_logits_per_layer: expected [..., num_experts="
                f"{num_experts}] arrays, got shape {z.shape}"
            )
    rows = jnp.concatenate([z.reshape(-1, num_experts).astype(jnp.float32) for z in layers], axis=0)
    if attention_mask is None:
        return rows, None
    flat_mask = jnp.asarray(attention_mask).reshape(-1).astype(jnp.float32)  # [B*T]
    tokens = flat_mask.shape[0]
    per_layer_rows = [math.prod(z.shape[:-1]) for z in layers]
    if len(layers) > 1 and any(n != tokens for n in per_layer_rows):
        raise UserError(
            f"attention_mask: each layer needs B*T={tokens} router rows to match the mask, "
            f"got {per_layer_rows}"
        )
    if rows.shape[0] % tokens:
        raise UserError(
            f"attention_mask: {rows.shape[0]} router rows are not a whole number of B*T={tokens} token blocks"
        )
    # The same [B*T] mask applies to every layer's block of rows (HF flat_mask; DynMoLE expand over layers).
    return rows, jnp.tile(flat_mask, rows.shape[0] // tokens)  # [R]


def load_balancing_loss(
    router_logits_per_layer: RouterLogits,
    num_experts: int,
    top_k: int,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """Switch/Mixtral load-balancing loss, equal to HF transformers' ``load_balancing_loss_func``.

    Used for both the frozen base router and the PERFT-R adapter router (PERFT.md §4). f_e is the fraction
    of (token, slot) top-K assignments that go to expert e (so sum_e f_e = K), P_e the mean router
    probability; loss = E * sum_e f_e * P_e, which is K for a perfectly balanced router.

    Args:
        router_logits_per_layer: a sequence over layers of [B*T, E] (or [B, T, E]) logits, or one stacked
            [L, B*T, E] array; any dtype.
        num_experts: E, a static int equal to the logits' last axis.
        top_k: K, a static int.
        attention_mask: optional [B, T] mask (1 = real token). Padding rows are excluded from both averages.

    Returns:
        [] float32 loss.
    """
    rows, row_mask = pool_router_rows(router_logits_per_layer, num_experts, attention_mask)  # [R, E]
    _, indices, probs = topk_routing(rows, top_k, renormalize=False)  # [R, K], [R, E]
    # Each of the K distinct slots counts once (HF histc / scatter_add over selected_experts).
    assignments = jnp.sum(jax.nn.one_hot(indices, num_experts, dtype=jnp.float32), axis=1)  # [R, E]
    if row_mask is None:
        tokens_per_expert = jnp.mean(assignments, axis=0)  # [E]
        router_prob_per_expert = jnp.mean(probs, axis=0)  # [E]
    else:
        # HF divides by the plain mask sum (no epsilon), identically for both factors.
        total_rows = jnp.sum(row_mask)
        tokens_per_expert = jnp.sum(assignments * row_mask[:, None], axis=0) / total_rows
        router_prob_per_expert = jnp.sum(probs * row_mask[:, None], axis=0) / total_rows
    return num_experts * jnp.sum(tokens_per_expert * router_prob_per_expert)
