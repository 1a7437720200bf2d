"""The PERFT training objective (spec/PERFT.md §4): LM loss + base-router and adapter-router aux losses.

    total = LM + coef_base * LB(base routers) + [coef_adapter * LB(adapter routers) | DynMoLE aux]

Each router loss pools all layers' tokens into one table before averaging, with padding excluded
(HF `load_balancing_loss_func`). The frozen base routers get no gradient, but their loss still
back-propagates into the adapters of earlier layers through the hidden states. Every term is returned
separately for logging.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from perft_jax.labels import IGNORE_INDEX
from perft_jax.models.config import ModelConfig
from perft_jax.models.decoder import MoeLMOutput
from perft_jax.models.moe.routing import load_balancing_loss
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.variants import VARIANTS


def lm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy. logits [B, T, V], labels [B, T] (-100 = ignored) -> (loss, #tokens)."""
    # Shift the labels, not the logits: slicing [B, T-1, V] logits copies them, and its gradient pads them back.
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    logits = logits.astype(jnp.float32)
    valid = targets != IGNORE_INDEX
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, per_token, 0.0)) / jnp.maximum(count, 1), count


def training_losses(out: MoeLMOutput, labels: jax.Array, attention_mask: jax.Array | None,
                    model_cfg: ModelConfig, perft_cfg: PerftConfig) -> dict[str, jax.Array]:
    """All loss terms; `total` is what is differentiated."""
    lm, num_tokens = lm_loss(out.logits, labels)
    losses = {"lm": lm, "num_tokens": num_tokens}
    total = lm
    if perft_cfg.base_router_aux_loss:
        base = load_balancing_loss(out.router_logits, model_cfg.num_experts, model_cfg.num_experts_per_tok,
                                   attention_mask)
        losses["base_router_aux"] = base
        total = total + model_cfg.router_aux_loss_coef * base
    if out.adapter_router_logits is not None:
        terms, weighted = VARIANTS[perft_cfg.variant].router_losses(out.adapter_router_logits, perft_cfg,
                                                                     attention_mask)
        losses.update(terms)
        total = total + weighted
    losses["total"] = total
    return losses
