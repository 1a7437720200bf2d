"""Parameter counts and the "activated parameter efficiency" of a PERFT setup (spec/PERFT.md §5).

Everything is read off the model *structure*: the base model is built and the adapters attached under
`nnx.eval_shape`, so every leaf is a `ShapeDtypeStruct` and the full-size OLMoE-1B-7B or Mixtral-8x7B can
be reported without weights or memory.

- Trainable parameters are the `AdapterParam` leaves (adapter matrices, PERFT-R routers); every other
  `nnx.Param` is frozen base model.
- Base activated per token: every non-expert parameter (embeddings, LM head once — a tied head is the
  embedding table, counted once —, attention, norms, routers) plus `num_experts_per_tok` of the
  `num_experts` experts of each layer.
- Activated trainable per token: the variant's `activated_per_layer` (perft/variants.py) times the layers
  (PERFT.md §5: S a; D M·a; R K·a + M·H; E k·a; the `qv_lora` baseline: all of it, every token passes it).
- activated efficiency = activated trainable / (base activated + activated trainable), the paper's x-axis.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
from flax import nnx

from perft_jax.models.config import ModelConfig
from perft_jax.models.decoder import init_model
from perft_jax.models.moe.experts import Experts
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.attach import attach_perft
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.variants import VARIANTS


@dataclasses.dataclass(frozen=True)
class EfficiencyReport:
    """Parameter counts of one (model, PERFT config) pair; see the module docstring for the definitions.

    Attributes:
      total_params: base + trainable parameters.
      trainable_params: adapter parameters (`AdapterParam` leaves), all layers.
      activated_params_per_token: base activated + activated trainable, per token.
      activated_trainable_params_per_token: trainable parameters a token passes through (DynMoLE: the K floor).
      activated_efficiency: activated trainable / activated (PERFT.md §5), a fraction in [0, 1).
      trainable_fraction: trainable / total.
      base_total: frozen base-model parameters.
      base_activated: base parameters per token (non-expert parameters + top-k experts per layer).
      variant / setup: the PERFT variant and a one-line description of its shape, for tables.
      dynamic_k: True for DynMoLE routing, where the number of adapters per token varies above K.
    """

    total_params: int
    trainable_params: int
    activated_params_per_token: int
    activated_trainable_params_per_token: int
    activated_efficiency: float
    trainable_fraction: float
    base_total: int
    base_activated: int
    variant: str = "none"
    setup: str = ""
    dynamic_k: bool = False


def _size(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=64)
def efficiency_report(model_cfg: ModelConfig, perft_cfg: PerftConfig) -> EfficiencyReport:
    """Count base, trainable and per-token activated parameters of `model_cfg` with `perft_cfg` attached.

    Runs `attach_perft` under `nnx.eval_shape` (no weights, no memory; a few seconds at full size), so the
    config checks of `attach_perft` apply and raise `UserError` on bad input. PERFT.md §5.

    Returns:
      EfficiencyReport with exact integer counts and the two ratios.
    """
    model = nnx.eval_shape(lambda: attach_perft(init_model(model_cfg), perft_cfg))
    adapter_state, base_state = nnx.state(model, AdapterParam, nnx.Param)
    trainable = _size(adapter_state)
    base_total = _size(base_state)
    k, n = model_cfg.num_experts_per_tok, model_cfg.num_experts
    variant = VARIANTS[perft_cfg.variant]
    activated_trainable = model_cfg.num_layers * variant.activated_per_layer(model_cfg, perft_cfg)
    expert_total = expert_active = 0
    for _path, module in nnx.iter_modules(model):
        if isinstance(module, Experts):
            for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)):
                size = math.prod(leaf.shape)
                expert_total += size
                expert_active += size // leaf.shape[0] * k  # stacked [E, ...]: k of the E experts run per token
    if expert_total and expert_total % n:
        raise AssertionError(f"expert parameters {expert_total} not divisible by num_experts={n}")
    base_activated = base_total - expert_total + expert_active
    activated = base_activated + activated_trainable
    total = base_total + trainable
    return EfficiencyReport(
        total_params=total,
        trainable_params=trainable,
        activated_params_per_token=activated,
        activated_trainable_params_per_token=activated_trainable,
        activated_efficiency=activated_trainable / activated,
        trainable_fraction=trainable / total,
        base_total=base_total,
        base_activated=base_activated,
        variant=perft_cfg.variant,
        setup=variant.shape(model_cfg, perft_cfg),
        dynamic_k=perft_cfg.variant == "perft_r" and perft_cfg.router == "dynmole",
    )


def human(n: float) -> str:
    """1_280_000_000 -> `1.28 B`, 6_291_456 -> `6.29 M`, 512 -> `512`."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g}"


def percent(fraction: float, digits: int = 4) -> str:
    """A fraction as a percentage with `digits` significant digits: 0.0034728 -> `0.3473 %`."""
    pct = 100.0 * fraction
    if pct == 0:
        return "0 %"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(pct))))
    return f"{pct:.{decimals}f} %"


def dynmole_note(report: EfficiencyReport) -> str | None:
    if not report.dynamic_k:
        return None
    return ("note: DynMoLE runs a variable number of adapters per token (top-p; all M when uncertain);\n"
            "      activated trainable counts the keep-top-k floor K, so it and the efficiency are lower bounds.")


def format_report(report: EfficiencyReport, title: str | None = None) -> str:
    """A small aligned table: human units, exact counts, ratios as percentages (PERFT.md §5)."""
    r = report
    rows = [
        ("base parameters (frozen)", r.base_total),
        ("trainable parameters", r.trainable_params),
        ("total parameters", r.total_params),
        ("trainable / total", r.trainable_fraction),
        ("base activated / token", r.base_activated),
        ("activated trainable / token", r.activated_trainable_params_per_token),
        ("activated / token", r.activated_params_per_token),
        ("activated efficiency", r.activated_efficiency),
    ]
    lines = [title] if title else []
    lines.append(f"perft: {r.variant} — {r.setup}")
    label_w = max(len(label) for label, _ in rows)
    for label, value in rows:
        if isinstance(value, float):
            lines.append(f"  {label:<{label_w}}  {percent(value):>10}")
        else:
            lines.append(f"  {label:<{label_w}}  {human(value):>10}  {value:>15,}")
    lines.append("  (activated efficiency = activated trainable / activated, per token, as in the PERFT paper)")
    note = dynmole_note(r)
    if note:
        lines.append(note)
    return "\n".join(lines)


def format_comparison(reports: list[EfficiencyReport], title: str | None = None) -> str:
    """One row per report: variant, setup, trainable, activated trainable, activated, ratios."""
    header = ("variant", "setup", "trainable", "act. trainable/tok", "activated/tok", "trainable %", "act. eff. %")
    rows = [(r.variant, r.setup, human(r.trainable_params), human(r.activated_trainable_params_per_token),
             human(r.activated_params_per_token), percent(r.trainable_fraction), percent(r.activated_efficiency))
            for r in reports]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        left = [f"{c:<{w}}" for c, w in zip(cells[:2], widths[:2])]
        right = [f"{c:>{w}}" for c, w in zip(cells[2:], widths[2:])]
        return "  ".join(left + right).rstrip()

    lines = [title] if title else []
    lines += [line(header), line(["-" * w for w in widths])] + [line(row) for row in rows]
    lines.append("(act. eff. = activated trainable / activated parameters per token, as in the PERFT paper)")
    lines += sorted({note for note in map(dynmole_note, reports) if note})
    return "\n".join(lines)
