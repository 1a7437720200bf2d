"""perft_jax.pytorch computes what perft_jax computes: every variant, adapter form, routing and gate-weight form.

Per case, adapters attached in perft_jax get random weights large enough to move the logits (and, for DynMoLE,
to route some tokens sparsely and broadcast others), are saved with `save_adapters`, loaded into the HF torch
model with `load_perft_adapters`, and then: float32 logits on a left-padded batch agree within rel L2 1e-5, and HF
greedy `generate` equals perft_jax's `generate` token for token (KV-cache decoding, one token at a time: once per
variant and routing, `GENERATE`, which keeps the file's runtime down).
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny_models import hf_logits, rel_l2, token_batch

from perft_jax import save_adapters
from perft_jax.eval.generate import generate
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.attach import attach_perft
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.dynmole import DynMoLEConfig
from perft_jax.pytorch import load_perft_adapters
from perft_jax.pytorch.routing import dynmole_gates

pytestmark = pytest.mark.torch

TOL = 1e-5
LORA = dict(adapter="lora", bottleneck=3, lora_alpha=6.0)


def parallel(activation: str) -> dict:
    return dict(adapter="parallel_adapter", bottleneck=5, activation=activation)


ROUTED = dict(variant="perft_r", num_adapters=4, top_k=2)
DYNMOLE = dict(ROUTED, router="dynmole", dynmole=DynMoLEConfig(keep_top_k=2))
RANK = dict(ROUTED, adapter_gate_weights="base_router_rank")
# Dropout > 0 in some cases: eval mode must switch it off on both sides.
CASES = {
    "perft_s-lora": PerftConfig(variant="perft_s", **LORA, dropout=0.1),
    "perft_s-parallel-silu": PerftConfig(variant="perft_s", **parallel("silu")),
    "perft_d-lora": PerftConfig(variant="perft_d", num_adapters=3, **LORA),
    "perft_d-parallel-relu": PerftConfig(variant="perft_d", num_adapters=3, **parallel("relu"), dropout=0.2),
    "perft_r-topk-lora": PerftConfig(**ROUTED, **LORA),
    "perft_r-topk-parallel-gelu": PerftConfig(**ROUTED, **parallel("gelu")),
    "perft_r-rank-lora": PerftConfig(**RANK, **LORA),
    "perft_r-rank-parallel-identity": PerftConfig(**RANK, **parallel("identity")),
    "perft_r-dynmole-lora": PerftConfig(**DYNMOLE, **LORA, dropout=0.1),
    "perft_r-dynmole-parallel-silu": PerftConfig(**DYNMOLE, **parallel("silu")),
    "perft_e-lora": PerftConfig(variant="perft_e", **LORA),
    "perft_e-parallel-gelu": PerftConfig(variant="perft_e", **parallel("gelu")),
    "qv_lora": PerftConfig(variant="qv_lora", adapter="lora", bottleneck=4, lora_alpha=8.0, dropout=0.1),
}
GENERATE = {"perft_s-lora", "perft_d-parallel-relu", "perft_r-topk-parallel-gelu", "perft_r-rank-lora",
            "perft_r-dynmole-lora", "perft_e-parallel-gelu", "qv_lora"}
PROMPTS = [np.random.default_rng(0).integers(3, 256, n).tolist() for n in (5, 11, 8)]
NEW_TOKENS = 8


@nnx.jit
def jax_logits(model, ids, mask):
    return model(ids, attention_mask=mask).logits


def randomize_adapters(model, seed: int, scale: float = 0.3) -> None:
    """Replace the near-zero init by weights that move the logits visibly (numpy: no per-shape XLA compiles)."""
    leaves, treedef = jax.tree.flatten(nnx.state(model, AdapterParam))
    rng = np.random.default_rng(seed)
    nnx.update(model, jax.tree.unflatten(treedef, [jnp.asarray(rng.standard_normal(x.shape) * scale, x.dtype)
                                                   for x in leaves]))


def hf_greedy(model, prompts, eos_id: int) -> list[list[int]]:
    """HF greedy `generate` on a left-padded batch: the new tokens up to and including the first EOS."""
    t = max(map(len, prompts))
    ids = torch.tensor([[1] * (t - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, pad_token_id=1, eos_token_id=eos_id, do_sample=False,
                             max_new_tokens=NEW_TOKENS)[:, t:].tolist()
    return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in out]


def dynmole_selection_sizes(torch_model, ids, mask) -> set[int]:
    """How many adapters DynMoLE selects per token, over all layers (read off the adapter routers' logits)."""
    logits = []
    hooks = [block.shared_routing_adapter_gate.register_forward_hook(lambda m, a, out: logits.append(out))
             for block in (layer.mlp for layer in torch_model.model.layers)]
    hf_logits(torch_model, ids, mask)
    for hook in hooks:
        hook.remove()
    cfg = torch_model.perft_config.dynmole
    return {int(n) for z in logits for n in (dynmole_gates(z, cfg) > 0).sum(-1)}


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_runtime_matches_perft_jax(tiny_bases, tmp_path, arch, case):
    hf_base, _, jax_base = tiny_bases(arch)
    cfg = CASES[case]
    model = attach_perft(nnx.clone(jax_base), cfg, seed=1)
    randomize_adapters(model, seed=sorted(CASES).index(case))
    model.eval()  # dropout off, as the HF model (from_pretrained / build_hf_model) is in eval mode
    ids, mask = token_batch(model.config.vocab_size)
    ours = np.asarray(jax_logits(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert rel_l2(ours, hf_logits(hf_base, ids, mask), mask) > 1e-2  # the adapters matter

    torch_model = load_perft_adapters(copy.deepcopy(hf_base), save_adapters(model, tmp_path / "adapters"))
    assert torch_model.perft_config == cfg
    error = rel_l2(hf_logits(torch_model, ids, mask), ours, mask)
    assert error <= TOL, f"{arch} {case}: logits rel L2 {error:.3g}"
    if cfg.router == "dynmole" and cfg.variant == "perft_r":  # both DynMoLE regimes are exercised
        sizes = dynmole_selection_sizes(torch_model, ids, mask)
        assert cfg.num_adapters in sizes and min(sizes) < cfg.num_adapters, sizes

    if case in GENERATE:
        want = generate(model, PROMPTS, NEW_TOKENS, eos_id=2, pad_id=1)
        assert hf_greedy(torch_model, PROMPTS, eos_id=2) == want
