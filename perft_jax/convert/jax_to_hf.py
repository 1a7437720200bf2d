"""perft-jax model -> Hugging Face directory (config.json + safetensors in the per-expert layout).

The output loads with `transformers.AutoModelForCausalLM.from_pretrained` and gives the same logits.
Tensors are written shard by shard (at most `max_shard_bytes` each, HF's `model-0000i-of-0000n`
names plus an index when there is more than one), so export never holds more than a shard on the host.
"""
from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from perft_jax.convert import hf_keys
from perft_jax.convert.hf_to_jax import check_output
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


def export_hf(model: MoeForCausalLM, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3,
              overwrite: bool = False) -> pathlib.Path:
    """Write `model` as an HF model directory at `out_dir` (built in a temporary dir, then renamed)."""
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
    return pathlib.Path(out_dir)
