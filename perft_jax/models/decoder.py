"""The MoE decoder LM shared by OLMoE and Mixtral: embed -> N x (attention, MoE) -> norm -> LM head.

`MoeForCausalLM(input_ids, attention_mask=None)` returns an :class:`MoeLMOutput` whose `logits` equal
the HF PyTorch model's (HF's default positions `arange(T)` are used even for padded rows, so the
padded positions of a left-padded batch see the same rotary phases as in HF).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from perft_jax.models.config import ModelConfig
from perft_jax.models.layers import Attention, Embed, Linear, RMSNorm, causal_mask, rope_tables
from perft_jax.moe.block import SparseMoeBlock


@flax.struct.dataclass
class MoeLMOutput:
    logits: jax.Array  # [B, T, V]
    router_logits: jax.Array  # [L, B, T, E], the base routers' logits of every layer
    dropped_tokens: jax.Array  # [L] int32, (token, expert) pairs dropped by a capacity backend
    adapter_router_logits: jax.Array | None = None  # [L, B, T, M] PERFT-R routers' logits, if attached


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.attn = Attention(cfg, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.moe = SparseMoeBlock(cfg, rngs)

    def __call__(self, x, cos, sin, mask):
        x = x + self.attn(self.input_norm(x), cos, sin, mask)
        moe_out, aux = self.moe(self.post_attn_norm(x))
        return x + moe_out, aux


class MoeForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = Embed(cfg, rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg, rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None) -> MoeLMOutput:
        """input_ids [B, T] int; attention_mask [B, T] (1 = token, 0 = padding); position_ids [B, T]."""
        cfg = self.config
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
        x = self.embed(input_ids)
        cos, sin = rope_tables(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        mask = causal_mask(attention_mask, b, t, cfg.sliding_window)
        auxes = []
        for layer in self.layers:
            x, aux = layer(x, cos, sin, mask)
            auxes.append(aux)
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        adapter_logits = [a.adapter_router_logits for a in auxes if a.adapter_router_logits is not None]
        return MoeLMOutput(logits=logits, router_logits=jnp.stack([a.router_logits for a in auxes]),
                           dropped_tokens=jnp.stack([a.dropped for a in auxes]),
                           adapter_router_logits=jnp.stack(adapter_logits) if adapter_logits else None)



