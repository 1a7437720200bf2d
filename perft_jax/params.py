"""Print the parameter budget of a PERFT config: `perft-params --config FILE [key=value ...]`.

The config is a run config (perft_jax/config.py): its `model:` section names the base's architecture,

    model:
      hf_config: ../hf/olmoe-1b-7b.json     # an HF config.json (relative: to the YAML's folder, then cwd)
    # or
      checkpoint: ckpts/olmoe               # a converted base checkpoint (reads its perft_model.json)

and its `perft:` section the adapters; the other sections are validated and otherwise unused here.
`key=value` overrides use dotted paths (`perft.bottleneck=16`). `--all-variants` compares S, D, R, E
and qv_lora at the config's bottleneck / M / K. Counts follow the PERFT paper's definitions (arXiv 2411.08212):
total, trainable and activated (per token) parameters, and the activated parameter efficiency.
`--plan DEVICE` (h100-80gb, h200-141gb, v5e-16gb, v5p-95gb, or a byte count such as 24e9 / 24GiB) prints the
per-device memory of a training run at the config's batch, sequence length and mesh, whether it fits, and the
smallest mesh that does (perft_jax/plan.py; `--devices N` resolves a `-1` mesh axis). A training config whose
checkpoint is not converted yet plans with `model.checkpoint= model.hf_config=configs/hf/<arch>.json`.

Bad input ends with a one-line `error: ...` naming the key or file, and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from typing import Any

from perft_jax.build import load_run_config, resolve_model_config
from perft_jax.config import Config
from perft_jax.config_help import KEY_SYNTAX, format_config_keys
from perft_jax.errors import UserError, run_cli
from perft_jax.models.config import ModelConfig
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.efficiency import efficiency_report, format_comparison, format_report
from perft_jax.perft.variants import VARIANTS as ALL_VARIANTS
from perft_jax.plan import format_plan, make_plan, parse_device

# Every variant that adds adapters, in the registry's order (perft/variants.py).
VARIANTS = tuple(name for name in ALL_VARIANTS if name != "none")


def load_config(path: str | pathlib.Path, overrides: list[str] = ()) -> tuple[ModelConfig, PerftConfig, str]:
    """Read a run config (perft_jax/config.py; training configs work as they are) with its overrides;
    returns (model config, PERFT config, where the model config came from)."""
    cfg = load_run_config(path, overrides)
    return resolve_model_config(cfg.model), cfg.perft, cfg.model.checkpoint or cfg.model.hf_config


def variant_configs(cfg: PerftConfig) -> list[PerftConfig]:
    """The config as each of S, D, R, E and qv_lora, keeping its bottleneck, M and K.

    The qv_lora row is LoRA with r = the bottleneck and, unless the config already uses LoRA adapters,
    alpha = 2r (the paper's baseline setting, PERFT.md §3); alpha does not change any count.
    """
    out = []
    for variant in VARIANTS:
        changes: dict[str, Any] = {"variant": variant}
        if variant == "qv_lora" and cfg.adapter != "lora":
            changes.update(adapter="lora", lora_alpha=2.0 * cfg.bottleneck)
        out.append(dataclasses.replace(cfg, **changes).validate_config())
    return out


def model_title(cfg: ModelConfig, source: str) -> str:
    return (f"model: {cfg.model_type} ({source}): {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_experts} experts, top-{cfg.num_experts_per_tok}")


def run(args: argparse.Namespace) -> str:
    if args.plan is not None:
        return run_plan(args)
    if args.devices is not None:
        raise UserError("--devices: only with --plan")
    model_cfg, perft_cfg, source = load_config(args.config, args.overrides)
    title = model_title(model_cfg, source)
    if args.all_variants:
        reports = [efficiency_report(model_cfg, cfg) for cfg in variant_configs(perft_cfg)]
        return format_comparison(reports, title)
    return format_report(efficiency_report(model_cfg, perft_cfg), title)


def run_plan(args: argparse.Namespace) -> str:
    device = parse_device(args.plan, "--plan")  # checked before the config is read or anything compiles
    if args.devices is not None and args.devices < 1:
        raise UserError(f"--devices: expected a positive integer, got {args.devices}")
    if args.all_variants:
        raise UserError("--plan: plans one config; drop --all-variants")
    cfg = load_run_config(args.config, args.overrides)
    model_cfg = resolve_model_config(cfg.model)
    title = f"{model_title(model_cfg, cfg.model.checkpoint or cfg.model.hf_config)}\nperft: {cfg.perft.variant}"
    return format_plan(make_plan(cfg, model_cfg, device, args.devices), title)


# What `run` and `run_plan` read of the run config (the other sections are validated only).
READ_SECTIONS = ("model.", "perft.", "mesh.", "data.batch_size", "data.cutoff_len")


def _parser() -> argparse.ArgumentParser:
    description = __doc__.split("\n\nBad input")[0]
    epilog = (f"{KEY_SYNTAX}\n\nconfig keys read here (the other sections of a run config are validated only; "
              f"perft-train --help lists them all):\n{format_config_keys(Config, only=READ_SECTIONS)}")
    p = argparse.ArgumentParser(prog="perft-params", description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=pathlib.Path, help="YAML with model: and perft: sections")
    p.add_argument("--all-variants", action="store_true",
                   help="one row per variant (S, D, R, E, qv_lora) at the config's bottleneck / M / K")
    p.add_argument("--plan", metavar="DEVICE",
                   help="per-device memory plan on h100-80gb, h200-141gb, v5e-16gb, v5p-95gb or a byte count")
    p.add_argument("--devices", type=int, metavar="N", help="with --plan: the device count for a -1 mesh axis")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. perft.top_k=4")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(lambda: print(run(args)))


if __name__ == "__main__":
    sys.exit(main())
