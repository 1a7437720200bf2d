"""The one config tree of a perft-jax run, loaded from YAML with `key=value` overrides.

    model:      which frozen base (a converted checkpoint, or an HF architecture config for random init)
    perft:      PerftConfig — variant, adapter form, routing           (perft_jax/perft/config.py)
    data:       DataConfig — files, tokenisation, batching              (perft_jax/data/config.py)
    optim:      OptimConfig — AdamW, schedule, clipping                 (perft_jax/optim.py)
    train:      TrainConfig — steps, accumulation, validation, logging  (below; W&B: perft_jax/wandb_logger.py)
    checkpoint: CheckpointConfig — run checkpoints                      (perft_jax/checkpoint/run.py)
    eval:       EvalConfig — benchmarks, generation                     (below)
    mesh:       MeshConfig — device mesh, logical axis rules, multi-host (perft_jax/sharding.py)

Every section is a frozen dataclass; unknown keys and bad values are one-line errors naming the dotted
key (perft_jax/config_parsing.py). The resolved tree is saved as JSON with every run.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Literal

from perft_jax.checkpoint.run import CheckpointConfig
from perft_jax.config_parsing import apply_overrides, from_dict, load_yaml, to_dict
from perft_jax.data.config import DataConfig
from perft_jax.errors import UserError
from perft_jax.hub import is_repo_id
from perft_jax.models.config import ATTENTION_IMPLS, MOE_BACKENDS
from perft_jax.optim import OptimConfig
from perft_jax.perft.config import PerftConfig
from perft_jax.sharding import MeshConfig
from perft_jax.wandb_logger import WandbConfig


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The frozen base. Exactly one of `checkpoint` (converted with convert_weights.py) or `hf_config`
    (an HF config.json: a randomly initialised base of that architecture, for tests and benchmarks)."""

    checkpoint: str = ""  # the converted base (a folder written by perft-convert / convert_weights.py)
    hf_config: str = ""  # instead of `checkpoint`: an HF config.json, for a randomly initialised base of that shape
    tokenizer: str = ""  # a folder, tokenizer file or hub repo id; default: the checkpoint (the converter copies it)
    dtype: Literal["float32", "bfloat16"] | None = None  # base compute + storage dtype; default: as stored
    param_dtype: Literal["float32", "bfloat16"] | None = None  # base storage dtype, when it differs from `dtype`
    adapter_dtype: Literal["float32", "bfloat16"] = "float32"  # adapters stay float32 under a bf16 base
    moe_backend: Literal[MOE_BACKENDS] | None = None  # MoE dispatch; default: as stored (auto: per platform)
    attention_impl: Literal[ATTENTION_IMPLS] | None = None  # default: as stored (auto: per platform)
    capacity_factor: float | None = None  # per-expert buffer size of the `capacity` backend; default: as stored
    init_seed: int = 0  # with hf_config: the base's random init
    remat: bool = False  # recompute each decoder layer's activations in the backward pass (memory for compute)

    def validate_config(self, prefix: str = "model") -> "ModelSection":
        if bool(self.checkpoint) == bool(self.hf_config):
            raise UserError(f"{prefix}: set exactly one of {prefix}.checkpoint (a converted base) or "
                            f"{prefix}.hf_config (an architecture for a random base)")
        return self


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/default"  # the run folder: config.json, metrics, checkpoints, adapters, eval.json
    seed: int = 0  # adapter init and dropout
    epochs: float = 3.0  # passes over the training rows (fractions allowed), unless `max_steps` is set
    max_steps: int = 0  # optimizer steps; 0: derived from `epochs`
    grad_accum_steps: int = 1  # micro-batches (of data.batch_size rows) per optimizer step
    eval_every_steps: int = 80  # validation loss every this many steps (the paper: 80); 0 disables
    keep_best: bool = True  # keep the adapters of the lowest validation loss in <output_dir>/best_adapters
    log_every_steps: int = 10  # training metrics (loss, router statistics, tokens/s) every this many steps
    progress_bar: bool = True  # a tqdm bar with loss and tokens/s
    tensorboard: bool = True  # also write the metrics as TensorBoard events to <output_dir>/tensorboard
    wandb: WandbConfig = WandbConfig()

    def validate_config(self, prefix: str = "train") -> "TrainConfig":
        def fail(key: str, expected: str) -> None:
            raise UserError(f"{prefix}.{key}: expected {expected}, got {getattr(self, key)!r}")

        if not self.output_dir:
            fail("output_dir", "a directory path")
        if self.epochs <= 0 and self.max_steps <= 0:
            fail("epochs", "a positive number (or set train.max_steps)")
        for key in ("max_steps", "eval_every_steps"):
            if getattr(self, key) < 0:
                fail(key, "an integer >= 0")
        for key in ("grad_accum_steps", "log_every_steps"):
            if getattr(self, key) < 1:
                fail(key, "a positive integer")
        return self


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Generation-based evaluation on LLM-Adapters benchmarks (shared/data/llm_adapters/README.md §3-5)."""

    adapters: str = ""  # mode=eval: an adapter directory (save_adapters / the run's best adapters); empty: the base
    benchmarks: tuple[str, ...] = ()  # e.g. [boolq,piqa]: folder names under `data_dir` (commonsense and math sets)
    data_dir: str = ""  # holds <benchmark>/test.json; or a hub dataset repo id laid out the same way
    batch_size: int = 16  # prompts generated together
    max_examples: int = 0  # per benchmark; 0 = all rows
    num_beams: int = 1  # 4 reproduces the reference evaluation (beam search)
    max_new_tokens: int = 0  # 0: 4 for commonsense, 256 for math (the paper's settings)

    def validate_config(self, prefix: str = "eval") -> "EvalConfig":
        if self.batch_size < 1:
            raise UserError(f"{prefix}.batch_size: expected a positive integer, got {self.batch_size!r}")
        if self.num_beams < 1:
            raise UserError(f"{prefix}.num_beams: expected a positive integer, got {self.num_beams!r}")
        if self.benchmarks and not self.data_dir:
            raise UserError(f"{prefix}.data_dir: needed to evaluate {list(self.benchmarks)}")
        return self


@dataclasses.dataclass(frozen=True)
class Config:
    mode: Literal["train", "eval"] = "train"  # train the adapters, or evaluate `eval.adapters` on `eval.benchmarks`
    model: ModelSection = ModelSection()
    perft: PerftConfig = PerftConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2, sort_keys=True)


def _resolve_paths(data: dict, base_dir: pathlib.Path) -> dict:
    """Relative file paths in a config file are relative to that file (then to the working directory); a hub name
    (perft_jax/hub.py: no such path either way, shaped `namespace/name`) stays as written."""
    def resolve(value: str) -> str:
        if not value or pathlib.Path(value).is_absolute():
            return value
        beside = base_dir / value
        kept = pathlib.Path(value).exists() or is_repo_id(value)
        return str(beside) if beside.exists() or not kept else value

    model = data.get("model")
    if isinstance(model, dict):
        for key in ("checkpoint", "hf_config", "tokenizer"):
            if isinstance(model.get(key), str):
                model[key] = resolve(model[key])
    section = data.get("data")
    files = section.get("train_files") if isinstance(section, dict) else None
    if isinstance(files, str):  # one file alone (config_parsing reads it as a one-element list)
        section["train_files"] = resolve(files)
    elif isinstance(files, list):
        section["train_files"] = [resolve(p) if isinstance(p, str) else p for p in files]
    section = data.get("eval")
    if isinstance(section, dict):
        for key in ("data_dir", "adapters"):
            if isinstance(section.get(key), str):
                section[key] = resolve(section[key])
    return data


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def read_config_data(path: str | pathlib.Path, _seen: tuple = ()) -> dict:
    """A YAML config as plain data, with its `include:` files merged underneath (in order, recursively)
    and relative paths resolved against the file that names them."""
    path = pathlib.Path(path).absolute()
    if path in _seen:
        raise UserError(f"{path}: include cycle ({' -> '.join(str(p) for p in _seen + (path,))})")
    data = _resolve_paths(load_yaml(path), path.parent)
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise UserError(f"{path}: include: expected a file name or a list of file names, got {includes!r}")
    merged: dict = {}
    for name in includes:
        included = path.parent / name
        if not included.is_file():
            raise UserError(f"{path}: include: no such file {name!r}")
        merged = _merge(merged, read_config_data(included, _seen + (path,)))
    return _merge(merged, data)


def load_config(path: str | pathlib.Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or none: all defaults), apply `key=value` overrides, validate every section.

    Data only: nothing outside the YAML files is read. `build.load_run_config` also checks the config against
    the base it names."""
    data = read_config_data(path) if path is not None else {}
    return from_dict(Config, apply_overrides(data, list(overrides)), "")
