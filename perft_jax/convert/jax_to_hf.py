"""perft-jax model -> Hugging Face directory (config.json, generation_config.json, safetensors in the per-expert
layout, and the tokenizer files of a given source).

The output loads with `transformers.AutoModelForCausalLM.from_pretrained` and gives the same logits; with a
tokenizer source, `AutoTokenizer.from_pretrained` loads the same tokenizer. Tensors are written shard by shard (at
most `max_shard_bytes` each, HF's `model-0000i-of-0000n` names plus an index when there is more than one), so
export never holds more than a shard on the host.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file
from transformers import AutoConfig, GenerationConfig

from perft_jax.convert import hf_keys
from perft_jax.convert.hf_to_jax import check_output
from perft_jax.errors import UserError
from perft_jax.hub import GENERATION_CONFIG, TOKENIZER_FILES, locate, tokenizer_files, tokenizer_patterns
from perft_jax.io import atomic_directory
from perft_jax.models import ARCHITECTURES
from perft_jax.models.decoder import MoeForCausalLM


def _all_maps(cfg, arch) -> list[hf_keys.TensorMap]:
    return [tmap for _, maps in hf_keys.group_plan(cfg, arch) for tmap in maps]


def _lookup(pure_state: dict, path: tuple):
    node = pure_state
    for key in path:
        node = node[key]
    return node


def _tokenizer_source(tokenizer: str | os.PathLike) -> list[pathlib.Path]:
    """The tokenizer files and generation config to ship from `tokenizer` (a directory or a hub repo id)."""
    source = locate(tokenizer, allow_patterns=tokenizer_patterns(), what="tokenizer").path
    if not source.is_dir():
        raise UserError(f"{source}: no such tokenizer directory (a converted checkpoint or an HF model folder)")
    files = tokenizer_files(source)
    if not files:
        raise UserError(f"{source}: holds no tokenizer files (any of {', '.join(TOKENIZER_FILES)})")
    generation = source / GENERATION_CONFIG
    return files + ([generation] if generation.is_file() else [])


def export_hf(model: MoeForCausalLM, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3,
              overwrite: bool = False, tokenizer: str | os.PathLike | None = None) -> pathlib.Path:
    """Write `model` as an HF model directory at `out_dir` (built in a temporary dir, then renamed).

    Args:
      model: the base to export (its adapters are not part of an HF model).
      out_dir: the directory to create.
      max_shard_bytes: the largest safetensors file.
      overwrite: replace an existing directory at `out_dir`.
      tokenizer: a directory (a converted checkpoint, which holds the tokenizer of the HF model it came from, or
        any HF model / tokenizer folder) or hub repo id whose tokenizer files and generation_config.json are
        copied into the export. None: none are (a model that never had one); `AutoTokenizer` then cannot load
        the export. Without a generation_config.json in the source, one is derived from the model's config
        (bos / eos / pad ids), as transformers' `save_pretrained` does.
    Raises:
      UserError: `out_dir` exists (without `overwrite`), or `tokenizer` holds no tokenizer files.
    """
    extra_files = _tokenizer_source(tokenizer) if tokenizer is not None else []
    cfg = model.config
    arch = ARCHITECTURES[cfg.model_type]
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    maps = _all_maps(cfg, arch)
    itemsize = np.dtype(cfg.jnp_param_dtype).itemsize
    # Plan shards from shapes alone, so file names can carry the shard count.
    shards: list[list[hf_keys.TensorMap]] = [[]]
    shard_bytes = 0
    for tmap in maps:
        size = int(np.prod(tmap.shape)) * itemsize
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(tmap)
        shard_bytes += size
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    check_output(pathlib.Path(out_dir), overwrite)
    with atomic_directory(out_dir) as tmp:
        weight_map = {}
        for name, shard in zip(names, shards):
            tensors = {}
            for tmap in shard:
                array = np.asarray(jax.device_get(_lookup(pure, tmap.path)))
                for key, hf_array in zip(tmap.hf_keys, tmap.to_hf(array)):
                    tensors[key] = np.ascontiguousarray(hf_array)
                    weight_map[key] = name
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            del tensors
        if len(shards) > 1:
            total = sum(int(np.prod(m.shape)) * itemsize for m in maps)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf_config = {"architectures": [arch.hf_class_name], **arch.config_to_hf(cfg), "dtype": cfg.param_dtype}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for path in extra_files:
            shutil.copy2(path, tmp / path.name)
        if not (tmp / GENERATION_CONFIG).is_file():  # what `save_pretrained` of the HF model would write
            GenerationConfig.from_model_config(AutoConfig.for_model(**hf_config)).save_pretrained(str(tmp))
    return pathlib.Path(out_dir)
