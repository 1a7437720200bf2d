"""The converted base-model checkpoint: written once by the converter, restored read-only by `load_model`.

Layout of a checkpoint directory:

    perft_model.json   format tag, the resolved ModelConfig, the list of parameter groups
    config.json        the source Hugging Face config, kept for export and for tokenizer loading
    tokenizer files    copied from the source directory when present
    params/<group>/    one orbax checkpoint per group: `embed`, `layer_000` ... `layer_N`, `head`

Groups let the converter write a layer as soon as it is built, and let `load_model` restore group by
group straight onto each parameter's target sharding.

The converter saves host (numpy) arrays, never jax.Arrays, without orbax's defensive copy, and stacked
expert arrays as :class:`RowBlocks`: built and written a block of experts at a time into a zarr array
chunked one expert per chunk, so host memory holds one block, not the stack (issue 6: peak RSS within
2x the largest tensor + 1 GB). On disk these are ordinary orbax arrays: any target restores them.
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import math
import pathlib
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils  # pinned orbax

from perft_jax.checkpoint import orbax_errors
from perft_jax.errors import UserError, disk_error_message
from perft_jax.models.config import ModelConfig

FORMAT = "perft-jax-base-checkpoint"
VERSION = 1
MANIFEST = "perft_model.json"
_READ_BLOCK_BYTES = 256 * 1024**2  # host memory a restore holds beside the arrays it has placed


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


class RowBlocks:
    """A host array that is never materialised whole: `make(start, stop)` builds rows [start, stop) of
    its first axis, and the checkpoint writer asks for `rows_per_block` rows at a time."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, make: Callable[[int, int], np.ndarray],
                 rows_per_block: int):
        self.shape, self.dtype, self._make = tuple(shape), np.dtype(dtype), make
        self.rows_per_block = max(1, int(rows_per_block))
        self.error: BaseException | None = None  # set by the writer, raised by save_group

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def blocks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        for start in range(0, self.shape[0], self.rows_per_block):
            stop = min(start + self.rows_per_block, self.shape[0])
            block = self._make(start, stop)
            if block.shape != (stop - start,) + self.shape[1:] or block.dtype != self.dtype:
                raise ValueError(f"block [{start}:{stop}] has shape {block.shape} {block.dtype}, expected "
                                 f"{(stop - start,) + self.shape[1:]} {self.dtype}")
            yield start, stop, block
            del block  # the writer is done with it: drop it before building the next


class _HostArrayHandler(ocp.type_handlers.NumpyHandler):
    """orbax's numpy handler, minus its defensive deep copy (the converter never mutates what it saves),
    writing a RowBlocks one block at a time. Its on-disk type is the plain "np.ndarray"."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)
        self._one_block_at_a_time = None

    async def _open_and_write(self, value, tspec: dict[str, Any], ts_context: ts.Context):
        if not isinstance(value, RowBlocks):
            return await super()._open_and_write(value, tspec, ts_context)
        # orbax writes a group's arrays concurrently; RowBlocks take turns, so one block exists at a time.
        self._one_block_at_a_time = self._one_block_at_a_time or asyncio.Lock()
        async with self._one_block_at_a_time:
            t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
            try:
                for start, stop, block in value.blocks():
                    # Whole chunks only (the array is chunked one row per chunk, see save_group): no
                    # read-modify-write, and the write completes before the next block is built.
                    await t[start:stop].write(block, can_reference_source_data_indefinitely=True)
                    del block  # before the generator builds the next one
            except Exception as e:  # noqa: BLE001  # orbax would log it with a traceback; save_group re-raises
                value.error = e


def save_group(ckpt_dir: pathlib.Path, group: str, subtree: dict) -> None:
    """Write one group (numpy arrays and RowBlocks) synchronously; nothing of it is kept afterwards."""
    handler = _HostArrayHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (RowBlocks, handler), (np.ndarray, handler),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
    # One zarr chunk per row of a RowBlocks, so each block write covers whole chunks.
    save_args = jax.tree.map(
        lambda x: ocp.SaveArgs(shard_axes=(0,)) if isinstance(x, RowBlocks) else ocp.SaveArgs(), subtree)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    try:
        checkpointer.save(pathlib.Path(ckpt_dir).absolute() / "params" / group,
                          args=ocp.args.PyTreeSave(subtree, save_args=save_args))
    except Exception:
        _raise_block_error(subtree)  # orbax then finds the array incomplete; the block's error is the cause
        raise
    finally:
        checkpointer.close()
    _raise_block_error(subtree)


def _raise_block_error(subtree: dict) -> None:
    """Re-raise the error of a RowBlocks that could not be built (e.g. an unreadable tensor). The group
    is then incomplete; the converter discards the whole output directory."""
    for leaf in jax.tree.leaves(subtree):
        if isinstance(leaf, RowBlocks) and leaf.error is not None:
            raise leaf.error


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op). glibc keeps the freed
    per-tensor and per-chunk buffers of a group in per-thread arenas: without this, resident memory
    crept up by about 0.15 GiB over 4 OLMoE layers in the converter and by about 0.4 GiB per layer
    in `load_model` (benchmarks/RESULTS.md, converter)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def restore_groups(ckpt_dir: pathlib.Path, groups: list[str], abstract_state: dict) -> dict:
    """Restore every group into the shapes/dtypes/shardings of `abstract_state` (a pure dict of
    `jax.ShapeDtypeStruct` with `.sharding`); orbax casts to the target dtype on the way in.

    Onto one device, each array is read block by block into one host buffer that the device array then uses
    in place (`_AlignedReadHandler`, `device_put(may_alias=True)`): the base is held once, and beside it at most
    one block. orbax's own `jax.Array` restore (kept for sharded targets, where each process reads only its own
    shards) reads an array to host memory and copies it to the device: on the CPU host that held up to 3 GiB
    beside a Mixtral-8x7B-width base, one expert stack twice (issue 11, benchmarks/real.py).
    """
    restored = jax.tree.map(lambda x: x, abstract_state)  # a mutable copy of the nesting
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, _AlignedReadHandler()), (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    root = pathlib.Path(ckpt_dir).absolute() / "params"
    for group in groups:
        target = group_subtree(abstract_state, group)
        on_host = all(isinstance(x.sharding, jax.sharding.SingleDeviceSharding) for x in jax.tree.leaves(target))
        restore_args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype) if on_host
                                    else ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), target)
        with orbax_errors.HeldLogs() as held:
            try:
                subtree = checkpointer.restore(root / group, args=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args))
            except Exception as e:
                found = orbax_errors.problem(e)
                if found is None and isinstance(e, ValueError):  # e.g. orbax: the tree does not match the manifest
                    raise UserError(f"{root / group}: cannot restore parameter group ({e})") from None
                if found is None:
                    raise
                held.drop()
                raise UserError(_damaged_group_message(pathlib.Path(ckpt_dir), group, found)) from None
        if on_host:  # zero-copy: the device arrays take over the aligned host buffers
            subtree = jax.tree.map(lambda a, x: jax.device_put(a, x.sharding, may_alias=True), subtree, target)
        set_group_subtree(restored, group, subtree)
        return_freed_memory()
    checkpointer.close()
    return restored


def _damaged_group_message(ckpt_dir: pathlib.Path, group: str, found: orbax_errors.Problem) -> str:
    """One line for a parameter group that cannot be read (issue 15: a truncated file), with the command that
    rebuilds the checkpoint from its recorded source."""
    if found.kind == "disk":
        return disk_error_message(ckpt_dir / "params" / group, found.errno) or f"{ckpt_dir}: {found.detail}"
    try:
        source = json.loads((ckpt_dir / MANIFEST).read_text())["source"]["hf_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        source = "<the Hugging Face directory>"
    return (f"{ckpt_dir}: parameter group {group} is damaged ({found.detail}); re-convert the checkpoint: "
            f"python convert_weights.py --hf-dir {source} --out {ckpt_dir} --overwrite")


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an `alignment`-byte boundary: XLA:CPU adopts such a buffer
    without copying it (numpy's own allocations start 16 bytes past one, and are copied)."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


class _AlignedReadHandler(ocp.type_handlers.NumpyHandler):
    """orbax's numpy restore, reading each array into an aligned buffer (`_aligned_empty`) `_READ_BLOCK_BYTES`
    of rows at a time, one array after another; orbax's own reads a group's arrays whole and concurrently."""

    async def deserialize(self, infos, args=None):
        args = args or [ocp.RestoreArgs()] * len(infos)
        out = []
        for info, arg in zip(infos, args):
            await info.await_path_creation()
            spec = ts_utils.build_array_read_spec(info, use_ocdbt=info.is_ocdbt_checkpoint,
                                                  metadata_key=self._metadata_key, target_dtype=arg.dtype)
            t = await ts.open(ts.Spec(spec.json), open=True, context=info.ts_context)
            array = _aligned_empty(tuple(t.shape), t.dtype.numpy_dtype)
            if array.ndim == 0:
                array[...] = await t.read()
            else:
                n = array.shape[0]
                rows = max(1, _READ_BLOCK_BYTES // max(1, array.nbytes // max(n, 1)))
                for start in range(0, n, rows):
                    stop = min(start + rows, n)
                    array[start:stop] = await t[start:stop].read()
            out.append(array)
        return out


