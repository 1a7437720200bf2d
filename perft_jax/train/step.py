"""One jitted optimizer step: forward, backward into the adapters only, AdamW update.

The model is split three ways before it enters a compiled step (spec/ENGINEERING.md §3, Flax's "tree mode"):

    trainable = adapters + their dropout RNG state   (what a step changes; donated, returned)
    optimizer = the optax state of the adapters       (donated, returned)
    frozen    = everything else: the pretrained base  (an input only)

Only `trainable`, the optimizer state and the metrics leave the step, and the first two are donated, so XLA writes
them in place. The frozen base is read, never returned: a step that returned the whole model (as `nnx.jit` does)
would write a fresh copy of every base weight each step and hold the base twice (issue 11: OLMoE-1B-7B asked for
27.7 GB on top of its 13.8 GB base). Gradients are taken with respect to the adapters alone, so no base-sized
gradient tree is ever built. `tests/train/test_step_memory.py` holds this on XLA's own memory analysis.
"""
from __future__ import annotations

import functools
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

# What a train step changes on the model; the rest of its state is the frozen base.
TRAINABLE = nnx.Any(AdapterParam, nnx.RngState)


def _pin_placement(model: MoeForCausalLM, tree):
    """Keep adapters and optimizer state where they were placed (perft/attach.py, train/optim.py): by the
    model's `LogicalSharding` (replicated, or split by their logical axes with `mesh.shard_adapters`); a model
    without one lives on one device and needs nothing. Otherwise XLA may return them placed differently, which
    changes the next step's input shardings and compiles the step again (and defeats the donation)."""
    logical = model_sharding(model)
    return tree if logical is None else jax.lax.with_sharding_constraint(tree, logical.trainable_shardings(tree))


def loss_fn(model: MoeForCausalLM, batch: Batch, model_cfg: ModelConfig, perft_cfg: PerftConfig):
    """-> (total loss, {loss terms..., "router": per-layer router statistics})."""
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    losses = training_losses(out, batch["labels"], batch["attention_mask"], model_cfg, perft_cfg)
    stats = router_statistics(out, batch["attention_mask"], perft_cfg, model_cfg)
    return losses["total"], {**losses, "router": stats}


def split_model(model: MoeForCausalLM) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable state, frozen state) of `model`: what a compiled step takes as separate inputs."""
    return nnx.split(model, TRAINABLE, ...)


@functools.partial(jax.jit, static_argnames=("graphdef", "opt_graphdef", "model_cfg", "perft_cfg"),
                   donate_argnames=("trainable", "opt_state"))
def train_step_fn(graphdef: nnx.GraphDef, opt_graphdef: nnx.GraphDef, trainable: nnx.State, frozen: nnx.State,
                  opt_state: nnx.State, batch: Batch, model_cfg: ModelConfig, perft_cfg: PerftConfig):
    """The pure step: -> (trainable state, optimizer state, metrics). `trainable` and `opt_state` are donated."""
    model = nnx.merge(graphdef, trainable, frozen)
    optimizer = nnx.merge(opt_graphdef, opt_state)
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
    new_trainable = _pin_placement(model, nnx.state(model, TRAINABLE))
    new_opt_state = _pin_placement(model, nnx.state(optimizer))
    return new_trainable, new_opt_state, {**losses, "grad_norm": optax.tree.norm(grads)}


def train_step(model: MoeForCausalLM, optimizer: nnx.Optimizer, batch: Batch, model_cfg: ModelConfig,
               perft_cfg: PerftConfig) -> dict[str, Any]:
    """Update the adapters (and the optimizer) in place; returns the loss terms and the global gradient norm.

    `batch` arrays are [B, T], or [A, B, T] for gradient accumulation over A micro-batches: gradients
    and loss terms are averaged over the micro-batches (each micro-batch loss is a per-token mean).
    The adapter and optimizer arrays the model held before the call are donated to it (deleted after).
    """
    graphdef, trainable, frozen = split_model(model)
    opt_graphdef, opt_state = nnx.split(optimizer)
    trainable, opt_state, metrics = train_step_fn(graphdef, opt_graphdef, trainable, frozen, opt_state, batch,
                                                  model_cfg, perft_cfg)
    nnx.update(model, trainable)
    nnx.update(optimizer, opt_state)
    return metrics


@functools.partial(jax.jit, static_argnames=("graphdef", "model_cfg", "perft_cfg"))
def eval_step_fn(graphdef: nnx.GraphDef, state: nnx.State, batch: Batch, model_cfg: ModelConfig,
                 perft_cfg: PerftConfig) -> dict[str, jax.Array]:
    """The pure validation step: loss terms only; the model's state is an input, never an output."""
    losses = loss_fn(nnx.merge(graphdef, state), batch, model_cfg, perft_cfg)[1]
    losses.pop("router")
    return losses


def eval_step(model: MoeForCausalLM, batch: Batch, model_cfg: ModelConfig, perft_cfg: PerftConfig):
    """Validation losses of `batch`, in evaluation mode (adapter dropout off, as HF's `model.eval()`); the
    caller's model, its RNG state included, is left as it was."""
    view = nnx.view(model, only=nnx.Dropout, deterministic=True, raise_if_not_found=False)
    graphdef, state = nnx.split(view)
    return eval_step_fn(graphdef, state, batch, model_cfg, perft_cfg)
