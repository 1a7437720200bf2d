"""The converted base-model checkpoint: written once by the converter, restored read-only by `load_model`.

Layout of a checkpoint directory:

    perft_model.json   format tag, the resolved ModelConfig, the list of parameter groups
    config.json        the source Hugging Face config, kept for export and for tokenizer loading
    tokenizer files    copied from the source directory when present
    params/<group>/    one orbax checkpoint per group: `embed`, `layer_000` ... `layer_N`, `head`

Groups let the converter write a layer as soon as it is built (host memory holds about one layer),
and let `load_model` restore group by group straight onto each parameter's target sharding.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from perft_jax.errors import UserError
from perft_jax.models.config import ModelConfig

FORMAT = "perft-jax-base-checkpoint"
VERSION = 1
MANIFEST = "perft_model.json"


def group_names(cfg: ModelConfig) -> list[str]:
    return ["embed"] + [f"layer_{i:03d}" for i in range(cfg.num_layers)] + ["head"]


def group_subtree(pure_state: dict, group: str) -> dict:
    """The part of a pure-dict model state a group holds (a dict with string keys, as orbax wants)."""
    if group == "embed":
        return {"embed": pure_state["embed"]}
    if group == "head":
        return {key: pure_state[key] for key in ("final_norm", "lm_head") if key in pure_state}
    return pure_state["layers"][int(group.removeprefix("layer_"))]


def set_group_subtree(pure_state: dict, group: str, subtree: dict) -> None:
    if group.startswith("layer_"):
        pure_state["layers"][int(group.removeprefix("layer_"))] = subtree
    else:
        pure_state.update(subtree)


def is_base_checkpoint(path: pathlib.Path) -> bool:
    return (pathlib.Path(path) / MANIFEST).is_file()


def write_manifest(ckpt_dir: pathlib.Path, cfg: ModelConfig, extra: dict[str, Any] | None = None) -> None:
    manifest = {"format": FORMAT, "version": VERSION, "model": json.loads(cfg.to_json()),
                "groups": group_names(cfg), **(extra or {})}
    (pathlib.Path(ckpt_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(ckpt_dir: pathlib.Path) -> tuple[ModelConfig, dict[str, Any]]:
    path = pathlib.Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{ckpt_dir}: not a perft-jax base checkpoint (no {MANIFEST}); "
                        "create one with `python convert_weights.py --hf-dir ... --out ...`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{path}: unsupported checkpoint format {manifest.get('format')!r} "
                        f"version {manifest.get('version')!r}")
    return ModelConfig.from_dict(manifest["model"], source=str(path)), manifest


def save_group(ckpt_dir: pathlib.Path, group: str, subtree: dict) -> None:
    """Write one group synchronously (the caller frees its arrays right after)."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(pathlib.Path(ckpt_dir).absolute() / "params" / group, subtree)
    checkpointer.wait_until_finished()
    checkpointer.close()


def restore_groups(ckpt_dir: pathlib.Path, groups: list[str], abstract_state: dict) -> dict:
    """Restore every group into the shapes/dtypes/shardings of `abstract_state` (a pure dict of
    `jax.ShapeDtypeStruct` with `.sharding`); orbax casts to the target dtype on the way in."""
    restored = jax.tree.map(lambda x: x, abstract_state)  # a mutable copy of the nesting
    checkpointer = ocp.StandardCheckpointer()
    root = pathlib.Path(ckpt_dir).absolute() / "params"
    for group in groups:
        target = group_subtree(abstract_state, group)
        try:
            subtree = checkpointer.restore(root / group, target)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"{root / group}: cannot restore parameter group ({e})") from None
        set_group_subtree(restored, group, subtree)
    checkpointer.close()
    return restored
