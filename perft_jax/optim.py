"""The optimizer's config section and its optax transform: AdamW with warm-up, decay and gradient clipping.

Pure optax and data: nothing here knows of models or adapters (perft_jax/train/optim.py applies the transform to
the adapters only), so the config tree (perft_jax/config.py) can hold `OptimConfig` without importing training.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import optax

from perft_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with the PERFT paper's defaults: lr after warm-up, then `schedule` to 0 (spec/PERFT.md §7)."""

    learning_rate: float = 1e-5  # the peak, reached after the warm-up (the paper: 1e-5 / 2e-5)
    warmup_steps: int = 100  # linear warm-up from 0 over this many optimizer steps
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # after the warm-up: decay to 0 at total_steps, or not
    total_steps: int = 0  # optimizer steps of the run; the trainer fills it in from the data when 0
    b1: float = 0.9  # AdamW's first-moment decay
    b2: float = 0.999  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's denominator epsilon
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (on the adapters: only they train)
    grad_clip_norm: float = 1.0  # global-norm clipping; 0 disables

    def validate_config(self, prefix: str = "optim") -> "OptimConfig":
        def fail(key: str, expected: str) -> None:
            raise UserError(f"{prefix}.{key}: expected {expected}, got {getattr(self, key)!r}")

        if not self.learning_rate > 0:
            fail("learning_rate", "a positive number")
        if self.warmup_steps < 0:
            fail("warmup_steps", "an integer >= 0")
        if self.total_steps < 0:
            fail("total_steps", "an integer >= 0")
        for key in ("b1", "b2"):
            if not 0 <= getattr(self, key) < 1:
                fail(key, "a number in [0, 1)")
        if not self.eps > 0:
            fail("eps", "a positive number")
        if self.weight_decay < 0:
            fail("weight_decay", "a number >= 0")
        if self.grad_clip_norm < 0:
            fail("grad_clip_norm", "a number >= 0 (0 disables clipping)")
        return self


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then linear (HF `get_linear_schedule_with_warmup`) or cosine
    decay to 0 at `total_steps`, or constant."""
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
    else:
        after = optax.constant_schedule(cfg.learning_rate)
    if cfg.warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_transform(cfg: OptimConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
    if cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
    return adamw
