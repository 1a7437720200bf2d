"""One jitted optimizer step: forward, backward into the adapters only, AdamW update.

Gradients are taken with respect to the `AdapterParam` state alone (`nnx.DiffState(0, AdapterParam)`):
the frozen base needs activation gradients only, and no base-sized gradient tree is ever built.
"""
from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx

from perft_jax.models.config import ModelConfig
from perft_jax.models.decoder import MoeForCausalLM
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.losses import training_losses

Batch = dict[str, jax.Array]  # input_ids, labels, attention_mask: [B, T] int32


def loss_fn(model: MoeForCausalLM, batch: Batch, model_cfg: ModelConfig, perft_cfg: PerftConfig):
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    losses = training_losses(out, batch["labels"], batch["attention_mask"], model_cfg, perft_cfg)
    return losses["total"], losses


@nnx.jit(static_argnames=("model_cfg", "perft_cfg"))
def train_step(model: MoeForCausalLM, optimizer: nnx.Optimizer, batch: Batch, model_cfg: ModelConfig,
               perft_cfg: PerftConfig) -> dict[str, Any]:
    """Update the adapters in place; returns the loss terms and the global gradient norm."""
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, AdapterParam), has_aux=True)
    (_, losses), grads = grad_fn(model, batch, model_cfg, perft_cfg)
    optimizer.update(model, grads)
    return {**losses, "grad_norm": optax.tree.norm(grads)}


@nnx.jit(static_argnames=("model_cfg", "perft_cfg"))
def eval_step(model: MoeForCausalLM, batch: Batch, model_cfg: ModelConfig, perft_cfg: PerftConfig):
    return loss_fn(model, batch, model_cfg, perft_cfg)[1]
