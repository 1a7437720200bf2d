"""Read a Hugging Face model directory one tensor at a time.

`open_hf_dir(hf_dir)` returns a :class:`TensorSource` over `model.safetensors`, a sharded
`model.safetensors.index.json`, or (only with `allow_pickle=True`) PyTorch `.bin` files. Safetensors
are memory-mapped: asking for one tensor reads that tensor and nothing else, so a converter that
asks layer by layer holds about one layer in host memory. Reading safetensors needs no torch.
"""
from __future__ import annotations

import json
import pathlib
from typing import Iterator

import ml_dtypes  # noqa: F401  # registers numpy's bfloat16, which safe_open(framework="np") needs
import numpy as np
from safetensors import safe_open

from perft_jax.errors import UserError

FLOAT_DTYPES = {"F32", "BF16", "F16", "F64", "float32", "bfloat16", "float16", "float64"}


class TensorSource:
    """Tensor name -> (shape, dtype, lazily loaded numpy array) over one HF model directory."""

    def keys(self) -> set[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> str:
        raise NotImplementedError

    def file_of(self, key: str) -> str:
        raise NotImplementedError

    def get(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SafetensorsSource(TensorSource):
    def __init__(self, files_by_key: dict[str, pathlib.Path]):
        self._files_by_key = files_by_key
        self._handles: dict[pathlib.Path, object] = {}

    def _handle(self, path: pathlib.Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="np")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise UserError(f"{path}: cannot read safetensors file ({e})") from None
        return self._handles[path]

    def keys(self) -> set[str]:
        return set(self._files_by_key)

    def file_of(self, key: str) -> str:
        return str(self._files_by_key[key])

    def _slice(self, key: str):
        return self._handle(self._files_by_key[key]).get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return str(self._slice(key).get_dtype())

    def get(self, key: str) -> np.ndarray:
        return self._handle(self._files_by_key[key]).get_tensor(key)

    def close(self) -> None:
        self._handles.clear()


class TorchBinSource(TensorSource):
    """Legacy `pytorch_model*.bin` files, loaded with `torch.load(weights_only=True, mmap=True)`."""

    def __init__(self, files_by_key: dict[str, pathlib.Path]):
        self._files_by_key = files_by_key
        self._loaded: dict[pathlib.Path, dict] = {}

    def _state(self, path: pathlib.Path) -> dict:
        if path not in self._loaded:
            try:
                import torch
            except ImportError:
                raise UserError(f"{path}: reading .bin weights needs torch (pip install torch)") from None
            try:
                self._loaded = {path: torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)}
            except Exception as e:
                raise UserError(f"{path}: cannot read PyTorch weights ({e})") from None
        return self._loaded[path]

    def keys(self) -> set[str]:
        return set(self._files_by_key)

    def file_of(self, key: str) -> str:
        return str(self._files_by_key[key])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state(self._files_by_key[key])[key].shape)

    def dtype(self, key: str) -> str:
        return str(self._state(self._files_by_key[key])[key].dtype).removeprefix("torch.")

    def get(self, key: str) -> np.ndarray:
        import torch

        tensor = self._state(self._files_by_key[key])[key]
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    def close(self) -> None:
        self._loaded = {}


def _index_files(index_path: pathlib.Path) -> dict[str, pathlib.Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{index_path}: not a valid weight index ({e.__class__.__name__}: {e})") from None
    files = {key: index_path.parent / name for key, name in weight_map.items()}
    for path in sorted(set(files.values())):
        if not path.is_file():
            raise UserError(f"{index_path}: shard {path.name} listed in weight_map is missing")
    return files


def _safetensors_keys(path: pathlib.Path) -> Iterator[str]:
    try:
        with safe_open(str(path), framework="np") as f:
            yield from f.keys()
    except Exception as e:
        raise UserError(f"{path}: cannot read safetensors file ({e})") from None


def open_hf_dir(hf_dir: pathlib.Path, allow_pickle: bool = False) -> TensorSource:
    """Open the weights of an HF model directory, preferring safetensors; refuse pickles by default."""
    hf_dir = pathlib.Path(hf_dir)
    single = hf_dir / "model.safetensors"
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return SafetensorsSource(_index_files(index))
    if single.is_file():
        return SafetensorsSource({key: single for key in _safetensors_keys(single)})
    bin_index = hf_dir / "pytorch_model.bin.index.json"
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if bin_index.is_file() or bins:
        culprit = bin_index if bin_index.is_file() else bins[0]
        if not allow_pickle:
            raise UserError(f"{culprit}: pickle-based PyTorch weights are refused (they can run code); "
                            "convert them to safetensors, or pass --allow-pickle if you trust the file")
        if bin_index.is_file():
            return TorchBinSource(_index_files(bin_index))
        source = TorchBinSource({})
        for path in bins:
            for key in source._state(path):
                source._files_by_key[key] = path
        return source
    raise UserError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model*.bin found")
