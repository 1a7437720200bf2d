"""Read a Hugging Face model directory one tensor at a time.

`open_hf_dir(hf_dir)` returns a :class:`TensorSource` over `model.safetensors`, a sharded
`model.safetensors.index.json`, or (only with `allow_pickle=True`) PyTorch `.bin` files.

Safetensors files are read with `pread` into fresh arrays, not memory-mapped: a mapping's touched
pages count as the process's resident memory until it is unmapped, which made a converter reading
layer by layer hold a whole shard (measured: 0.97 GiB of file pages at a 1 GB shard; issue 6).
The format is a little-endian u64 header length, a JSON header of {name: {dtype, shape,
data_offsets}}, then the raw bytes (https://huggingface.co/docs/safetensors). Reading needs no torch.
"""
from __future__ import annotations

import json
import math
import os
import pathlib

import ml_dtypes
import numpy as np

from perft_jax.errors import UserError

FLOAT_DTYPES = {"F32", "BF16", "F16", "F64", "float32", "bfloat16", "float16", "float64"}
# safetensors dtype codes -> numpy (little-endian, as the format stores them).
SAFETENSORS_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
                      "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
                      "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
MAX_HEADER_BYTES = 100 * 1024**2  # the reference implementation's limit


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

    def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor's first axis (a source may read only those)."""
        return np.array(self.get(key)[start:stop])

    def close(self) -> None:
        pass


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """np.empty aligned to `align` bytes (numpy gives 16): XLA on the CPU then uses the array in place
    instead of copying it (convert/hf_keys.py transposes through XLA)."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class _SafetensorsFile:
    """One safetensors file: its parsed header, and reads of single tensors (or rows of one) by offset."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._fd: int | None = None
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
                    raise ValueError(f"header length {n} does not fit a {size}-byte file")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            self.data_start = 8 + n
            self.entries = {}
            for key, entry in header.items():
                begin, end = entry["data_offsets"]
                shape = tuple(int(d) for d in entry["shape"])
                dtype = str(entry["dtype"])
                itemsize = SAFETENSORS_DTYPES[dtype].itemsize if dtype in SAFETENSORS_DTYPES else None
                if not 0 <= begin <= end <= size - self.data_start or (
                        itemsize is not None and end - begin != int(np.prod(shape)) * itemsize):
                    raise ValueError(f"tensor {key}: data_offsets {[begin, end]} do not match its shape {list(shape)}")
                self.entries[key] = (dtype, shape, begin)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path}: cannot read safetensors file ({e.__class__.__name__}: {e})") from None

    def read(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor `key` (or rows [start, stop) of its first axis) as a new array; only those bytes are read."""
        dtype_name, shape, begin = self.entries[key]
        if dtype_name not in SAFETENSORS_DTYPES:
            raise UserError(f"{self.path}: tensor {key} has unsupported dtype {dtype_name}")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        if rows is not None:
            row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            begin += rows[0] * row_bytes
            shape = (rows[1] - rows[0],) + shape[1:]
        out = _aligned_empty(shape, dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        done = 0
        while done < len(view):  # one pread returns at most ~2 GiB on Linux
            got = os.preadv(self._fd, [view[done:]], self.data_start + begin + done)
            if got == 0:
                raise UserError(f"{self.path}: truncated safetensors file (tensor {key})")
            done += got
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SafetensorsSource(TensorSource):
    def __init__(self, files_by_key: dict[str, pathlib.Path]):
        self._files_by_key = files_by_key
        self._files: dict[pathlib.Path, _SafetensorsFile] = {}

    def _file(self, key: str) -> _SafetensorsFile:
        path = self._files_by_key[key]
        if path not in self._files:
            self._files[path] = _SafetensorsFile(path)
        if key not in self._files[path].entries:
            raise UserError(f"{path}: tensor {key} is listed in the weight index but not in the file")
        return self._files[path]

    def keys(self) -> set[str]:
        return set(self._files_by_key)

    def file_of(self, key: str) -> str:
        return str(self._files_by_key[key])

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file(key).entries[key][1]

    def dtype(self, key: str) -> str:
        return self._file(key).entries[key][0]

    def get(self, key: str) -> np.ndarray:
        return self._file(key).read(key)

    def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        return self._file(key).read(key, (start, stop))

    def close(self) -> None:
        for f in self._files.values():
            f.close()


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


def open_hf_dir(hf_dir: pathlib.Path, allow_pickle: bool = False) -> TensorSource:
    """Open the weights of an HF model directory, preferring safetensors; refuse pickles by default."""
    hf_dir = pathlib.Path(hf_dir)
    single = hf_dir / "model.safetensors"
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return SafetensorsSource(_index_files(index))
    if single.is_file():
        return SafetensorsSource({key: single for key in _SafetensorsFile(single).entries})
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
