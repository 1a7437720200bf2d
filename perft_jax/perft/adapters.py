"""Adapter experts ("functional strategies", spec/PERFT.md §2) and the parameter type that marks them.

Every trainable PERFT weight is an :class:`AdapterParam`, an `nnx.Param` subclass: optimizers, gradient
splits, checkpoints and parameter counts filter on that type, so the frozen base never gets gradients
or optimizer state.

An :class:`AdapterBank` holds M adapter experts of one form with stacked weights. Always-on and
DynMoLE-gated banks run every adapter on every token, combined with per-token gates [T, M]. Top-k routed
banks (PERFT-R, PERFT-E) run only the chosen K of M per token (`routed`): rows sorted by adapter through the
base experts' routed pipeline (models/moe/experts.py `ROUTED_FFN`: the grouped block loop or the grouped-matmul
kernels; the adapters are groups too), so cost follows K, not M.

Shapes: T tokens, D model width, M adapter experts, R bottleneck (LoRA rank r or adapter width D_B).
Weights are stored (in, out), i.e. the reference PyTorch `nn.Linear` weights transposed.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from perft_jax.models.moe.experts import ROUTED_FFN
from perft_jax.perft.config import PerftConfig
from perft_jax.sharding import TRAINABLE

# As HF's ACT2FN, which the reference resolves `hidden_act` through: "gelu" is the exact (erf) form.
ACTIVATIONS = {"silu": jax.nn.silu, "relu": jax.nn.relu, "gelu": functools.partial(jax.nn.gelu, approximate=False),
               "identity": lambda x: x}


class AdapterParam(nnx.Param):
    """A trainable PERFT parameter (adapter matrices and adapter routers); everything else stays frozen."""

    placement = TRAINABLE  # on a mesh: replicated, or by its axes with mesh.shard_adapters (sharding.py)


def first_matrix_init(key, shape, dtype) -> jax.Array:
    """Reference init of the first matrix (PERFT `utils.py`): randn * sqrt(2 / out), out = r or D_B."""
    return (jax.random.normal(key, shape, jnp.float32) * jnp.sqrt(2.0 / shape[-1])).astype(dtype)


def second_matrix_init(key, shape, dtype, init: str) -> jax.Array:
    """randn * 1e-6 (the reference's near-zero start) or exact zeros (the model starts as the base)."""
    if init == "zero":
        return jnp.zeros(shape, dtype)
    return (jax.random.normal(key, shape, jnp.float32) * 1e-6).astype(dtype)


class AdapterBank(nnx.Module):
    """M adapter experts of one form: `__call__(x [T, D], gates [T, M] | None) -> [T, D]`."""

    def __init__(self, num: int, width: int, cfg: PerftConfig, rngs: nnx.Rngs,
                 param_dtype=jnp.float32, dtype=jnp.float32):
        r = cfg.bottleneck
        self.cfg = cfg
        if cfg.adapter == "lora":
            self.lora_A = AdapterParam(first_matrix_init(rngs.params(), (num, width, r), param_dtype),
                                       axes=("adapters", "embed", "adapter_rank"))
            self.lora_B = AdapterParam(second_matrix_init(rngs.params(), (num, r, width), param_dtype, cfg.init),
                                       axes=("adapters", "adapter_rank", "embed"))
        else:
            self.adapter_w1 = AdapterParam(first_matrix_init(rngs.params(), (num, width, r), param_dtype),
                                           axes=("adapters", "embed", "adapter_rank"))
            self.adapter_w2 = AdapterParam(second_matrix_init(rngs.params(), (num, r, width), param_dtype,
                                                              cfg.init),
                                           axes=("adapters", "adapter_rank", "embed"))
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.num = num
        self.dtype = dtype

    def _matrices(self) -> tuple[jax.Array, jax.Array]:
        lora = self.cfg.adapter == "lora"
        first, second = (self.lora_A, self.lora_B) if lora else (self.adapter_w1, self.adapter_w2)
        return first[...].astype(self.dtype), second[...].astype(self.dtype)

    def _hidden(self, x: jax.Array, project, dropout_key: jax.Array | None = None) -> jax.Array:
        """The bottleneck activations, `project` applying the first matrix; dropout where the reference has it.

        `dropout_key`: the dropout key drawn beforehand (None: dropout draws from its own stream)."""
        cfg = self.cfg
        drop = functools.partial(self.dropout, rngs=dropout_key)
        if cfg.adapter == "lora":
            return project(drop(x)) * (cfg.lora_alpha / cfg.bottleneck)  # LoRA: dropout on the input
        # Parallel adapter: dropout after W1, before the activation (reference Parallel_Adapter).
        return ACTIVATIONS[cfg.activation](drop(project(x)))

    def _dropout_key(self) -> jax.Array | None:
        """The next key of the dropout stream if dropout is active, drawn outside the routed pipeline: `auto`
        traces the pipeline inside `lax.platform_dependent`, where an nnx RNG stream cannot advance."""
        dropout = self.dropout
        if dropout.rate == 0.0 or dropout.deterministic or dropout.rngs is None:
            return None
        return dropout.rngs()

    def __call__(self, x: jax.Array, gates: jax.Array | None = None) -> jax.Array:
        """Every adapter on every token: x [T, D], gates [T, M] (None: all weighted 1) -> [T, D]."""
        x = x.astype(self.dtype)
        first, second = self._matrices()
        h = self._hidden(x, lambda v: jnp.einsum("td,mdr->mtr", v, first))  # [M, T, R]
        if gates is not None:
            h = h * gates.astype(self.dtype).T[:, :, None]  # gate before the second matmul: no [M, T, D]
        return jnp.einsum("mtr,mrd->td", h, second)

    def routed(self, x: jax.Array, weights: jax.Array, indices: jax.Array, dispatch: str = "grouped") -> jax.Array:
        """Only the chosen adapters: x [T, D], weights / indices [T, K] -> sum_k w_tk A_{i_tk}(x_t), [T, D].

        `dispatch` a key of models/moe/experts.py `ROUTED_FFN` ("grouped", "kernel", "auto": perft/attach.py
        picks the base experts' own, `experts.routed_pipeline`): the pairs sorted by adapter through that routed
        pipeline, equal to `self(x, dense gates)` (without dropout) at K / M of its FLOPs (plus block padding
        for "grouped"). "dense": every adapter on every token with the routing as dense gates;
        models on a device mesh use it (perft/attach.py picks it from the model's sharding): it splits over the
        batch with no communication, where sorting would gather every shard's tokens, and adapters are well
        under 1 % of a real model's FLOPs, so the extra M / K of them costs little there.
        """
        if dispatch == "dense":
            rows = jnp.arange(indices.shape[0])[:, None]
            return self(x, jnp.zeros((indices.shape[0], self.num), weights.dtype).at[rows, indices].set(weights))
        if dispatch not in ROUTED_FFN:
            raise ValueError(f"unknown routed dispatch {dispatch!r}; expected 'dense' or one of {sorted(ROUTED_FFN)}")
        first, second = self._matrices()
        hidden = functools.partial(self._hidden, dropout_key=self._dropout_key())
        return ROUTED_FFN[dispatch](x.astype(self.dtype), weights, indices, first, second, hidden)


class LoRA(nnx.Module):
    """HF-PEFT-style LoRA on one projection: x -> B A dropout(x) * alpha / r (the `qv_lora` baseline).

    Init as PEFT's default: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
    """

    def __init__(self, in_features: int, out_features: int, cfg: PerftConfig, rngs: nnx.Rngs,
                 axes: tuple[str, str], param_dtype=jnp.float32, dtype=jnp.float32):
        r = cfg.bottleneck
        bound = 1.0 / jnp.sqrt(in_features)
        self.lora_A = AdapterParam(jax.random.uniform(rngs.params(), (in_features, r), param_dtype, -bound, bound),
                                   axes=(axes[0], "adapter_rank"))
        self.lora_B = AdapterParam(jnp.zeros((r, out_features), param_dtype), axes=("adapter_rank", axes[1]))
        self.scale = cfg.lora_alpha / r
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.dropout(x.astype(self.dtype))
        return (x @ self.lora_A[...].astype(self.dtype)) @ self.lora_B[...].astype(self.dtype) * self.scale
