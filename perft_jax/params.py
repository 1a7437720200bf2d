"""Print the parameter budget of a PERFT config: `python -m perft_jax.params --config FILE [key=value ...]`.

The config is YAML with a `model:` section naming the base model's architecture, either

    model:
      hf_config: ../hf/olmoe-1b-7b.json     # an HF config.json (relative: to the YAML's folder, then cwd)
    # or
      checkpoint: ckpts/olmoe               # a converted base checkpoint (reads its perft_model.json)

and a `perft:` section (perft_jax.perft.config.PerftConfig). The sections a training config adds (`data`,
`optim`, `train`, `checkpoint`, `mesh`, `eval`, `run`) are ignored here; any other top-level key is an
error. `key=value` overrides use dotted paths (`perft.bottleneck=16`). `--all-variants` compares S, D, R, E
and qv_lora at the config's bottleneck / M / K. Counts follow spec/PERFT.md §5 (perft/efficiency.py).

Bad input ends with a one-line `error: ...` naming the key or file, and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
from typing import Any

from perft_jax.config_parsing import apply_overrides, from_dict, load_yaml
from perft_jax.errors import UserError
from perft_jax.models.config import ModelConfig
from perft_jax.perft.config import PerftConfig

SECTIONS = ("model", "perft")
LATER_SECTIONS = ("data", "optim", "train", "checkpoint", "mesh", "eval", "run")  # the training config's
MODEL_KEYS = ("hf_config", "checkpoint")
VARIANTS = ("perft_s", "perft_d", "perft_r", "perft_e", "qv_lora")


def _resolve(value: Any, key: str, base_dir: pathlib.Path, want_dir: bool) -> pathlib.Path:
    """A path from the config: absolute, else relative to the YAML's folder, then to the current dir."""
    if not isinstance(value, str) or not value:
        raise UserError(f"{key}: expected a path, got {value!r}")
    path = pathlib.Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [base_dir / path, pathlib.Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_dir() if want_dir else candidate.is_file():
            return pathlib.Path(os.path.normpath(candidate))
    kind = "directory" if want_dir else "file"
    raise UserError(f"{key}: no such {kind} {value!r} (looked in {', '.join(str(c) for c in candidates)})")


def load_model_config(section: Any, base_dir: pathlib.Path) -> tuple[ModelConfig, str]:
    """The `model:` section -> (ModelConfig, the source path for the table title)."""
    if not isinstance(section, dict):
        raise UserError(f"model: expected a mapping with one of {', '.join(MODEL_KEYS)}, got {section!r}")
    for key in section:
        if key not in MODEL_KEYS:
            raise UserError(f"model.{key}: unknown key (known: {', '.join(MODEL_KEYS)})")
    if len(section) != 1:
        raise UserError(f"model: expected exactly one of {', '.join(MODEL_KEYS)}, got {sorted(section) or 'none'}")
    if "hf_config" in section:
        from perft_jax.models.hf_config import read_hf_config_file

        path = _resolve(section["hf_config"], "model.hf_config", base_dir, want_dir=False)
        cfg, _arch, _raw = read_hf_config_file(path)
        return cfg, str(path)
    from perft_jax.checkpoint.base import read_manifest

    path = _resolve(section["checkpoint"], "model.checkpoint", base_dir, want_dir=True)
    cfg, _manifest = read_manifest(path)
    return cfg, str(path)


def load_config(path: str | pathlib.Path, overrides: list[str] = ()) -> tuple[ModelConfig, PerftConfig, str]:
    """Read the YAML, apply overrides, check the sections; returns (model config, PERFT config, model source)."""
    path = pathlib.Path(path)
    data = apply_overrides(load_yaml(path), list(overrides))
    for key in data:
        if key not in SECTIONS + LATER_SECTIONS:
            raise UserError(f"{key}: unknown top-level section (known: {', '.join(SECTIONS + LATER_SECTIONS)})")
    if "model" not in data:
        raise UserError(f"model: missing section (give model.hf_config or model.checkpoint) in {path}")
    model_cfg, source = load_model_config(data["model"], path.parent)
    perft_cfg = from_dict(PerftConfig, data.get("perft"), "perft")
    perft_cfg.check_model(model_cfg.num_experts, model_cfg.num_experts_per_tok)
    return model_cfg, perft_cfg, source


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
    from perft_jax.perft.efficiency import efficiency_report, format_comparison, format_report

    model_cfg, perft_cfg, source = load_config(args.config, args.overrides)
    title = model_title(model_cfg, source)
    if args.all_variants:
        reports = [efficiency_report(model_cfg, cfg) for cfg in variant_configs(perft_cfg)]
        return format_comparison(reports, title)
    return format_report(efficiency_report(model_cfg, perft_cfg), title)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perft_jax.params", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, type=pathlib.Path, help="YAML with model: and perft: sections")
    p.add_argument("--all-variants", action="store_true",
                   help="one row per variant (S, D, R, E, qv_lora) at the config's bottleneck / M / K")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. perft.top_k=4")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        print(run(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
