"""One jitted optimizer step: forward, backward into the adapters only, AdamW update.

Gradients are taken with respect to the `AdapterParam` state alone (`nnx.DiffState(0, AdapterParam)`):
the frozen base needs activation gradients only, and no base-sized gradient tree is ever built.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from perft_jax.models.config import ModelConfig
from perft_jax.models.decoder import MoeForCausalLM
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.losses import training_losses
from perft_jax.sharding import model_sharding
from perft_jax.train.router_stats import router_statistics

Batch = dict[str, jax.Array]  # input_ids, labels, attention_mask: [B, T] int32


def _pin_placement(model: MoeForCausalLM, tree):
    """Keep adapters and optimizer state where they were placed (perft/attach.py, train/optim.py): by the
    model's `LogicalSharding` (replicated, or split by their logical axes with `mesh.shard_adapters`), or
    replicated under a bare mesh (`jax.set_mesh`). Otherwise XLA may return them placed differently, which
    changes the next step's input shardings and compiles the step again."""
    logical = model_sharding(model)
    if logical is not None:
        return jax.lax.with_sharding_constraint(tree, logical.trainable_shardings(tree))
    if jax.sharding.get_abstract_mesh().empty:
        return tree
    return jax.lax.with_sharding_constraint(tree, jax.P())


def loss_fn(model: MoeForCausalLM, batch: Batch, model_cfg: ModelConfig, perft_cfg: PerftConfig):
    """-> (total loss, {loss terms..., "router": per-layer router statistics})."""
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    losses = training_losses(out, batch["labels"], batch["attention_mask"], model_cfg, perft_cfg)
    stats = router_statistics(out, batch["attention_mask"], perft_cfg, model_cfg)
    return losses["total"], {**losses, "router": stats}


@nnx.jit(static_argnames=("model_cfg", "perft_cfg"))
def train_step(model: MoeForCausalLM, optimizer: nnx.Optimizer, batch: Batch, model_cfg: ModelConfig,
               perft_cfg: PerftConfig) -> dict[str, Any]:
    """Update the adapters in place; returns the loss terms and the global gradient norm.

    `batch` arrays are [B, T], or [A, B, T] for gradient accumulation over A micro-batches: gradients
    and loss terms are averaged over the micro-batches (each micro-batch loss is a per-token mean).
    """
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, AdapterParam), has_aux=True)
    if batch["input_ids"].ndim == 2:
        (_, losses), grads = grad_fn(model, batch, model_cfg, perft_cfg)
    else:
        micro = batch["input_ids"].shape[0]
        grads, losses = None, None
        for i in range(micro):  # unrolled: A is small, and each micro-batch reuses one traced body
            (_, part), g = grad_fn(model, {k: v[i] for k, v in batch.items()}, model_cfg, perft_cfg)
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
            router = part.pop("router")
            losses = part if losses is None else jax.tree.map(jnp.add, losses, part)
            losses["router"] = router  # statistics of the last micro-batch: a sample, not a sum
        grads = jax.tree.map(lambda g: g / micro, grads)
        losses = {k: v if k in ("num_tokens", "router") else v / micro for k, v in losses.items()}
    optimizer.update(model, grads)
    nnx.update(model, _pin_placement(model, nnx.state(model, AdapterParam)))
    nnx.update(optimizer, _pin_placement(model, nnx.state(optimizer)))
    return {**losses, "grad_norm": optax.tree.norm(grads)}


@nnx.jit(static_argnames=("model_cfg", "perft_cfg"))
def eval_step(model: MoeForCausalLM, batch: Batch, model_cfg: ModelConfig, perft_cfg: PerftConfig):
    losses = loss_fn(model, batch, model_cfg, perft_cfg)[1]
    losses.pop("router")
    return losses
