"""PERFT-R's adapter routing in PyTorch: top-K gating and DynMoLE's hybrid routing.

The same rules as perft_jax's (models/moe/routing.py `topk_routing`, perft/dynmole.py `dynmole_routing`), all in
float32 whatever the logits' dtype:

- top-K: softmax over the M adapters, top-K of the probabilities, renormalised iff the base model renormalises
  (spec/PERFT.md §3);
- DynMoLE (arXiv 2504.00661, spec/DYNMOLE.md §2, §8): sorted experts kept while the inclusive cumulative
  probability is <= top_p (the crossing one dropped), at least the top keep_top_k, all M when the normalised
  Tsallis entropy is strictly above the threshold; weights are the raw probabilities of the kept experts.

The auxiliary router losses are training-only and not computed here: inference needs none of them.
"""
from __future__ import annotations

import math

import torch

from perft_jax.perft.dynmole import DynMoLEConfig


def topk_routing(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, M] -> (weights [T, K] float32, descending; indices [T, K])."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def tsallis_entropy(probs: torch.Tensor, q: float, eps: float) -> torch.Tensor:
    """[T, M] probabilities -> [T] Tsallis entropy of (p + eps), not renormalised, divided by its maximum over M
    experts (Shannon entropy / ln M for q = 1), DYNMOLE.md §1."""
    num = probs.shape[-1]
    p = probs.float() + eps
    if q == 1.0:
        entropy, max_entropy = -(p * p.log()).sum(dim=-1), math.log(num)
    else:
        entropy = (1.0 - p.pow(q).sum(dim=-1)) / (q - 1.0)
        max_entropy = (1.0 - num ** (1.0 - q)) / (q - 1.0)
    return entropy / torch.tensor(max_entropy, dtype=torch.float32, device=probs.device)


def dynmole_gates(logits: torch.Tensor, config: DynMoLEConfig) -> torch.Tensor:
    """logits [T, M] -> DynMoLE gate weights [T, M] float32: p on the kept experts, 0 elsewhere."""
    probs = torch.softmax(logits.float(), dim=-1)
    num = probs.shape[-1]
    # Descending, ties to the lower index (stable), as jax.lax.top_k sorts in perft_jax.
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep_sorted = sorted_probs.cumsum(dim=-1) <= config.top_p  # exclusive top-p (DYNMOLE.md §7.4)
    keep_sorted |= torch.arange(num, device=probs.device) < config.keep_top_k  # the keep-top-k floor
    mask = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # back to expert order
    if config.broadcast_enabled:
        entropy = tsallis_entropy(probs, config.entropy_index, config.entropy_eps)
        mask |= (entropy > config.entropy_threshold)[:, None]  # strict ">" (DYNMOLE.md §2.4)
    return probs * mask  # no renormalisation (DYNMOLE.md §7.3)
