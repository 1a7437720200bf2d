"""Hugging Face directory -> perft-jax base checkpoint, streamed one parameter group at a time.

Host memory holds one group's small tensors plus one block of at most `BLOCK_BYTES` of an expert
stack: stacks are built and written block by block (checkpoint/base.py RowBlocks), and tensors are
read with pread, not memory-mapped (convert/source.py). Measured on a 3.8 GB OLMoE-shaped checkpoint:
benchmarks/converter.py, benchmarks/RESULTS.md.

Everything that can be checked is checked before anything is written: the config, every expected
tensor's presence, shape and dtype, and no unexpected tensors. The checkpoint is then built in a
temporary sibling directory and renamed into place at the end, so a failed or interrupted conversion
never leaves a directory that looks like a checkpoint (one left by a killed run is removed by the next, io.py).

Faults (issue 15): a tensor holding NaN / inf is refused (counted while streaming; `allow_nonfinite` converts and
reports them), and a full or read-only disk ends in one line naming `--out` and the space needed and free.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import pathlib
import shutil
import sys
from collections.abc import Iterator
from typing import Any, Callable

import ml_dtypes
import numpy as np
from tqdm import tqdm

from perft_jax.checkpoint import base as base_ckpt
from perft_jax.checkpoint import orbax_errors
from perft_jax.convert import hf_keys
from perft_jax.convert.source import FLOAT_DTYPES, TensorSource, open_hf_dir
from perft_jax.errors import UserError, disk_error_message
from perft_jax.hub import GENERATION_CONFIG, locate, model_patterns, tokenizer_files
from perft_jax.io import atomic_directory
from perft_jax.models import ModelConfig
from perft_jax.models.hf_config import read_hf_config_file

NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
BLOCK_BYTES = 64 * 1024**2  # expert-stack rows built and written at once (at least one expert)


def _source_dtype(raw_config: dict[str, Any]) -> str:
    name = str(raw_config.get("dtype") or raw_config.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in NUMPY_DTYPES else "float32"


def _check_tensors(source: TensorSource, plan, cfg: ModelConfig, where: str) -> None:
    """Fail on the first missing, mis-shaped, wrongly typed or unexpected tensor, naming it."""
    available = source.keys()
    expected: set[str] = set()
    missing: list[str] = []
    for _, maps in plan:
        for tmap in maps:
            for key, shape in zip(tmap.hf_keys, hf_keys.hf_shapes(tmap)):
                expected.add(key)
                if key not in available:
                    missing.append(key)
                    continue
                got_dtype = source.dtype(key)
                if got_dtype not in FLOAT_DTYPES:
                    raise UserError(f"{source.file_of(key)}: tensor {key} has dtype {got_dtype}, "
                                    "expected a floating-point type")
                got_shape = source.shape(key)
                if got_shape != shape:
                    raise UserError(f"{source.file_of(key)}: tensor {key} has shape {list(got_shape)}, "
                                    f"expected {list(shape)}")
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{where}: missing tensor {missing[0]}{more}")
    tolerated = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(k for k in available - expected - tolerated
                        if not k.endswith(hf_keys.IGNORED_HF_SUFFIXES))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise UserError(f"{source.file_of(unexpected[0])}: unexpected tensor {unexpected[0]}{more}")


class NonFinite:
    """NaN / inf values per source tensor, counted while the tensors stream through (no pass of its own over the
    weights: one float64 sum of each array as it is read, which any NaN or inf makes non-finite; counting by kind
    only then). Casting to a narrower `--dtype` can overflow finite values to inf: those count too.

    Unless `allow`, the first tensor holding any is refused with a one-line UserError naming it and its counts.
    """

    def __init__(self, source: TensorSource, allow: bool):
        self._source, self.allow = source, allow
        self.counts: dict[str, dict[str, int]] = {}  # key -> {"nan", "inf", "overflow"}

    def check(self, key: str, raw: np.ndarray, cast: np.ndarray) -> None:
        if math.isfinite(cast.sum(dtype=np.float64)):  # exact: float16/32 values cannot overflow a float64 sum
            return
        if not self.allow:  # count the whole tensor (only rows of it may be at hand), then refuse
            raw = self._source.get(key)
            cast = raw.astype(cast.dtype, copy=False)
            self.counts[key] = {}
        found = self.counts.setdefault(key, {})
        for kind, where in (("nan", np.isnan(raw)), ("inf", np.isinf(raw)),
                            ("overflow", np.isfinite(raw) & ~np.isfinite(cast))):
            found[kind] = found.get(kind, 0) + int(np.count_nonzero(where))
        if not self.allow:
            raise UserError(f"{self._source.file_of(key)}: tensor {key} holds {self.describe(key)} of "
                            f"{math.prod(self._source.shape(key))} values; refusing to convert non-finite weights "
                            "(pass --allow-nonfinite to convert them as they are)")

    def describe(self, key: str) -> str:
        found = self.counts[key]
        overflow = (f", {found['overflow']} finite values that overflow to inf in the stored dtype"
                    if found["overflow"] else "")
        return f"{found['nan']} NaN, {found['inf']} inf{overflow}"

    def summary(self) -> str:
        """One line: how many tensors and values, naming the first few tensors."""
        keys = sorted(self.counts)
        total = sum(sum(found.values()) for found in self.counts.values())
        named = "; ".join(f"{key} ({self.describe(key)})" for key in keys[:3])
        more = f"; and {len(keys) - 3} more tensors" if len(keys) > 3 else ""
        return f"converted {total} non-finite values in {len(keys)} tensors as they are: {named}{more}"


class _LazyTensors:
    """The HF tensors of one TensorMap, read from disk (and cast) only when indexed; each checked for NaN / inf."""

    def __init__(self, source: TensorSource, keys: tuple[str, ...], dtype, on_read: Callable[[], None],
                 nonfinite: NonFinite):
        self._source, self._keys, self._dtype, self._on_read = source, keys, dtype, on_read
        self._nonfinite = nonfinite

    def __len__(self):
        return len(self._keys)

    def _cast(self, key: str, raw: np.ndarray) -> np.ndarray:
        # numpy would warn on stderr about overflowing casts and inf - inf sums: NonFinite reports them instead
        with np.errstate(over="ignore", invalid="ignore"):
            array = raw.astype(self._dtype, copy=False)
            self._nonfinite.check(key, raw, array)
        return array

    def __getitem__(self, index: int) -> np.ndarray:
        array = self._cast(self._keys[index], self._source.get(self._keys[index]))
        self._on_read()
        return array

    def rows(self, index: int, start: int, stop: int) -> np.ndarray:
        array = self._cast(self._keys[index], self._source.get_rows(self._keys[index], start, stop))
        if stop == self._source.shape(self._keys[index])[0]:  # the tensor's last rows: count it as read
            self._on_read()
        return array


def _nest(flat: dict[tuple, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = value
    return tree


def _build_group(source: TensorSource, maps, dtype, progress: tqdm, nonfinite: NonFinite) -> dict:
    """One group's tree: small tensors read now, expert stacks as RowBlocks read while being written."""
    flat = {}
    for tmap in maps:
        tensors = _LazyTensors(source, tmap.hf_keys, dtype, lambda: progress.update(1), nonfinite)
        path = tmap.path[2:] if tmap.path[0] == "layers" else tmap.path
        if tmap.to_jax_rows is not None:
            row_bytes = math.prod(tmap.shape[1:]) * np.dtype(dtype).itemsize
            flat[path] = base_ckpt.RowBlocks(tmap.shape, dtype, functools.partial(tmap.to_jax_rows, tensors),
                                             rows_per_block=BLOCK_BYTES // row_bytes)
        else:
            flat[path] = np.ascontiguousarray(tmap.to_jax(tensors))
    return _nest(flat)


def check_output(out_dir: pathlib.Path, overwrite: bool) -> None:
    """Refuse to clobber a checkpoint (or other files) at `out_dir` unless `overwrite`."""
    out_dir = pathlib.Path(out_dir).absolute()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            what = "a checkpoint" if base_ckpt.is_base_checkpoint(out_dir) else "files"
            raise UserError(f"{out_dir}: already holds {what}; pass --overwrite to replace it")


@contextlib.contextmanager
def _writing(out_dir: pathlib.Path, needed: int) -> Iterator[None]:
    """A full or unwritable disk while writing the checkpoint (an OSError, or orbax's RESOURCE_EXHAUSTED and
    the like) is one line naming `out_dir` and the space needed and free; orbax's repeated error logs are
    dropped. The temporary directory is gone by then (atomic_directory), so "free" is what the disk really has."""
    with orbax_errors.HeldLogs() as held:
        try:
            yield
        except UserError:
            held.drop()  # e.g. a refused tensor: orbax logged the failed RowBlocks write too
            raise
        except Exception as e:
            found = orbax_errors.problem(e)
            if found is None or found.kind != "disk":
                raise
            held.drop()
            raise UserError(disk_error_message(out_dir, found.errno, needed)) from None


def _output_bytes(plan, dtype: str) -> int:
    itemsize = np.dtype(NUMPY_DTYPES[dtype]).itemsize
    return sum(math.prod(tmap.shape) * itemsize for _, maps in plan for tmap in maps)


def convert_hf_to_jax(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None,
                      allow_pickle: bool = False, overwrite: bool = False,
                      show_progress: bool = True, revision: str | None = None,
                      allow_nonfinite: bool = False) -> ModelConfig:
    """Convert an HF OLMoE / Mixtral directory into a perft-jax base checkpoint at `out_dir`.

    The tokenizer files and generation config beside the weights are copied into the checkpoint (the default
    `model.tokenizer`, and what `export_hf` ships back).

    Args:
      hf_dir: directory with `config.json` and safetensors weights (single file or sharded index), or a hub
        repo id (`allenai/OLMoE-1B-7B-0924`, resolved by perft_jax/hub.py: the local cache, else a download).
      out_dir: checkpoint directory to create.
      dtype: "float32" | "bfloat16" | "float16" for the stored parameters; default: the config's dtype.
      allow_pickle: also accept `pytorch_model*.bin` (pickle; loaded with `weights_only=True`).
      overwrite: replace an existing checkpoint at `out_dir`.
      revision: with a hub repo id: its branch, tag or commit (default: main).
      allow_nonfinite: convert tensors holding NaN / inf (counted, reported on stderr and in the manifest)
        instead of refusing the first one.
    Returns:
      The resolved ModelConfig written to the checkpoint.
    """
    out_dir = pathlib.Path(out_dir)
    check_output(out_dir, overwrite)  # first: before a hub download
    located = locate(hf_dir, revision=revision, allow_patterns=model_patterns(allow_pickle), what="--hf-dir")
    hf_dir = located.path
    cfg, arch, raw_config = read_hf_config_file(hf_dir / "config.json")
    dtype = dtype or _source_dtype(raw_config)
    if dtype not in NUMPY_DTYPES:
        raise UserError(f"--dtype: expected one of {sorted(NUMPY_DTYPES)}, got {dtype!r}")
    cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    source = open_hf_dir(hf_dir, allow_pickle=allow_pickle)
    try:
        fused = any(k.endswith(".experts.gate_up_proj") for k in source.keys())
        plan = hf_keys.group_plan(cfg, arch, fused)
        _check_tensors(source, plan, cfg, str(hf_dir))
        nonfinite = NonFinite(source, allow_nonfinite)
        needed = _output_bytes(plan, dtype)
        with _writing(out_dir, needed), atomic_directory(out_dir, needed) as tmp:
            total = sum(len(m.hf_keys) for _, maps in plan for m in maps)
            with tqdm(total=total, desc="converting", unit="tensor", disable=not show_progress) as progress:
                for group, maps in plan:
                    tree = _build_group(source, maps, NUMPY_DTYPES[dtype], progress, nonfinite)
                    base_ckpt.save_group(tmp, group, tree)
                    source.close()
                    base_ckpt.return_freed_memory()
            shutil.copy2(hf_dir / "config.json", tmp / "config.json")
            for path in [*tokenizer_files(hf_dir), hf_dir / GENERATION_CONFIG]:
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
            hub = {"hub": {"repo_id": located.repo_id, "commit": located.commit}} if located.repo_id else {}
            base_ckpt.write_manifest(tmp, cfg, {"source": {"hf_dir": str(hf_dir.absolute()), **hub,
                                                           "expert_layout": "fused" if fused else "per_expert",
                                                           "nonfinite": nonfinite.counts}})
    finally:
        source.close()
    if nonfinite.counts:
        print(f"warning: {hf_dir}: {nonfinite.summary()}", file=sys.stderr)
    return cfg
