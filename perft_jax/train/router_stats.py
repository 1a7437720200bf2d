"""Per-layer router statistics for logging: expert load and routing entropy, base and adapter routers.

PERFT's claim is about *how* adapter experts get used (PERFT, arXiv 2411.08212 §4: collapsed vs. balanced
routers), so a run logs, per MoE layer and over real (unpadded) tokens only:

- ``adapter/load`` [L, M]: fraction of tokens whose selection includes each adapter expert. Top-K router:
  the top-K selection mask (rows sum to K). DynMoLE: the selected-set mask after top-p, the keep-top-k
  floor and broadcasting (rows sum to the mean number of selected adapters).
- ``adapter/entropy`` [L]: mean normalised entropy of the adapter router's softmax. Top-K router: Shannon
  (``tsallis_entropy`` with q = 1, ~0 eps). DynMoLE: the Tsallis entropy with the run's q and eps, i.e.
  exactly the quantity compared against ``entropy_threshold`` (spec/DYNMOLE.md §1), so the log explains
  the broadcast rate.
- ``adapter/broadcast_frac`` and ``adapter/num_selected`` [L] (DynMoLE only): fraction of tokens routed to
  all M adapters, and the mean number of adapters selected per token (the compute budget, DYNMOLE.md §8).
- ``base/load`` [L, E] and ``base/entropy`` [L]: the same for the frozen base routers (top-k selection,
  Shannon entropy), to see whether adapters shift the base model's routing through the hidden states.
- ``tokens`` []: the number of real tokens the means are over (the accumulator's weight).

Adapter keys are present only when the model has a routed (PERFT-R) branch. ``router_statistics`` is pure
and jit-able (configs static); :class:`RouterStatsAccumulator` averages it on the host across steps.

Axis letters: L layers, B batch, T tokens, E base experts, M adapter experts.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from perft_jax.models.config import ModelConfig
from perft_jax.models.decoder import MoeLMOutput
from perft_jax.models.moe.routing import topk_routing
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.dynmole import dynmole_routing, tsallis_entropy

# Shannon entropy via tsallis_entropy(q=1): eps only keeps log(0) finite for underflowed probabilities,
# small enough not to bias the value visibly (DynMoLE's 1e-5 would put a uniform router at 0.9997).
SHANNON_EPS = 1e-12
WEIGHT_KEY = "tokens"


def _masked_layer_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over (B, T) of x [L, B, T, ...] where mask [B, T] is 1; -> [L, ...]. 0 when no token is real."""
    m = mask.reshape(mask.shape + (1,) * (x.ndim - 3)).astype(jnp.float32)  # [B, T, 1...]
    total = jnp.sum(x.astype(jnp.float32) * m[None], axis=(1, 2))
    return total / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def _selection_mask(indices: jax.Array, num: int) -> jax.Array:
    """Top-K indices [..., K] -> 0/1 float mask [..., num] (the K indices are distinct)."""
    return jnp.sum(jax.nn.one_hot(indices, num, dtype=jnp.float32), axis=-2)


def _shannon(probs: jax.Array) -> jax.Array:
    """Normalised Shannon entropy [...] of probs [..., N]; 0 for a single expert (nothing to choose)."""
    if probs.shape[-1] < 2:
        return jnp.zeros(probs.shape[:-1], jnp.float32)
    return tsallis_entropy(probs, q=1.0, eps=SHANNON_EPS)


def topk_router_stats(logits: jax.Array, k: int, mask: jax.Array, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """(load [L, N], entropy [L]) of a top-k router with logits [L, B, T, N] over real tokens mask [B, T]."""
    _, indices, probs = topk_routing(logits, k, renormalize)  # [L, B, T, k], [L, B, T, N]
    load = _masked_layer_mean(_selection_mask(indices, logits.shape[-1]), mask)  # [L, N]
    return load, _masked_layer_mean(_shannon(probs), mask)  # [L]


def router_statistics(out: MoeLMOutput, attention_mask: jax.Array | None, perft_cfg: PerftConfig,
                      model_cfg: ModelConfig) -> dict[str, jax.Array]:
    """Per-layer load and entropy of the base and adapter routers over the real tokens of one batch.

    Jit-able with ``perft_cfg`` and ``model_cfg`` static; cheap next to the forward pass (it re-runs the
    routers' top-k / DynMoLE selection on the logits the model already returned).

    Args:
        out: the model output; ``router_logits`` [L, B, T, E], ``adapter_router_logits`` [L, B, T, M] or None.
        attention_mask: [B, T] (1 = real token, 0 = padding), or None when every position is real.
        perft_cfg: selects the adapter router kind (``topk`` or ``dynmole``), K and the DynMoLE settings.
        model_cfg: the base routers' top-k and ``norm_topk_prob``.

    Returns:
        float32 arrays keyed as in the module docstring: ``base/load`` [L, E], ``base/entropy`` [L],
        ``tokens`` [], and when a routed adapter branch exists ``adapter/load`` [L, M], ``adapter/entropy``
        [L], plus ``adapter/broadcast_frac`` and ``adapter/num_selected`` [L] for DynMoLE.
    """
    _, b, t, _ = out.router_logits.shape
    mask = jnp.ones((b, t), jnp.float32) if attention_mask is None else attention_mask.astype(jnp.float32)
    stats = {WEIGHT_KEY: jnp.sum(mask)}
    stats["base/load"], stats["base/entropy"] = topk_router_stats(
        out.router_logits, model_cfg.num_experts_per_tok, mask, model_cfg.norm_topk_prob)
    logits = out.adapter_router_logits
    if logits is None:
        return stats
    if perft_cfg.router == "dynmole":
        routing = dynmole_routing(logits, perft_cfg.dynmole)  # DYNMOLE.md §2, the gate RoutedAdapters uses
        stats["adapter/load"] = _masked_layer_mean(routing.mask, mask)  # [L, M]
        stats["adapter/entropy"] = _masked_layer_mean(routing.entropy, mask)  # Tsallis q of the run
        stats["adapter/broadcast_frac"] = _masked_layer_mean(routing.broadcast, mask)
        stats["adapter/num_selected"] = _masked_layer_mean(routing.num_selected, mask)
    else:
        stats["adapter/load"], stats["adapter/entropy"] = topk_router_stats(
            logits, perft_cfg.top_k, mask, model_cfg.norm_topk_prob)
    return stats


class RouterStatsAccumulator:
    """Token-weighted running mean of ``router_statistics`` outputs on the host (numpy float64).

    Each update is weighted by its ``tokens`` count, so the mean over steps equals the statistic over all
    real tokens seen (a heavily padded batch does not count as much as a full one). Updates without
    ``tokens`` get weight 1. Arrays are pulled to the host with ``jax.device_get``; on multi-host runs pass
    fully replicated (or process-local) statistics.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything (call after each logging interval)."""
        self._sums: dict[str, np.ndarray] = {}
        self.weight = 0.0  # total real tokens over the updates
        self.count = 0  # number of updates (steps) since the last reset

    def update(self, stats: dict[str, jax.Array | np.ndarray]) -> None:
        """Adds one step's statistics; every step must carry the same keys and shapes."""
        host = jax.device_get(stats)
        w = float(host.get(WEIGHT_KEY, 1.0))
        if self.count and set(host) - {WEIGHT_KEY} != set(self._sums):
            raise ValueError(f"router stats keys changed between steps: {sorted(host)} vs {sorted(self._sums)}")
        for key, value in host.items():
            if key == WEIGHT_KEY:
                continue
            value = np.asarray(value, np.float64) * w
            self._sums[key] = value if key not in self._sums else self._sums[key] + value
        self.weight += w
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        """Weighted means per key (float64 arrays) plus ``tokens``, the total weight; {} before any update."""
        if not self.count:
            return {}
        denom = self.weight if self.weight > 0 else 1.0
        means = {key: total / denom for key, total in self._sums.items()}
        means[WEIGHT_KEY] = np.asarray(self.weight)
        return means


def router_stats_scalars(stats: dict[str, np.ndarray], prefix: str = "router") -> dict[str, float]:
    """Flattens statistics to loggable scalars: per-layer entropy, broadcast rate, selected count, imbalance.

    A [L, N] load matrix becomes one imbalance scalar per layer, max_n load / mean_n load (1 = perfectly
    balanced, N/K = collapsed onto K experts); the full matrices go to the heatmap and array summaries.
    """
    scalars: dict[str, float] = {}
    for key, value in stats.items():
        value = np.asarray(value, np.float64)
        name = f"{prefix}/{key}"
        if value.ndim == 0:
            scalars[name] = float(value)
        elif value.ndim == 1:
            scalars.update({f"{name}/layer_{i:02d}": float(v) for i, v in enumerate(value)})
        elif value.ndim == 2:
            imbalance = value.max(axis=1) / np.maximum(value.mean(axis=1), 1e-12)
            scalars.update({f"{name}_imbalance/layer_{i:02d}": float(v) for i, v in enumerate(imbalance)})
    return scalars
