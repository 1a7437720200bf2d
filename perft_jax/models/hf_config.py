"""Read a Hugging Face `config.json` into a :class:`ModelConfig` (no weights involved)."""
from __future__ import annotations

import os
import pathlib
from typing import Any

import transformers

from perft_jax.errors import UserError
from perft_jax.io import read_json_object
from perft_jax.models.architecture import Architecture
from perft_jax.models.config import ModelConfig
from perft_jax.models.mixtral import MIXTRAL
from perft_jax.models.olmoe import OLMOE

ARCHITECTURES: dict[str, Architecture] = {arch.model_type: arch for arch in (OLMOE, MIXTRAL)}


def read_hf_config_file(path: str | os.PathLike) -> tuple[ModelConfig, Architecture, dict[str, Any]]:
    """Parse `config.json` with transformers' own config class (its defaults and legacy keys included)."""
    path = pathlib.Path(path)
    raw = read_json_object(path, "model config")
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(f"{path}: unknown model_type {model_type!r} (supported: {', '.join(ARCHITECTURES)})")
    arch = ARCHITECTURES[model_type]
    try:
        hf_config = transformers.AutoConfig.for_model(**raw)
    except Exception as e:  # transformers validates values with assorted exception types
        raise UserError(f"{path}: invalid {model_type} config ({e.__class__.__name__}: {e})") from None
    return arch.config_from_hf(hf_config, str(path)), arch, raw
