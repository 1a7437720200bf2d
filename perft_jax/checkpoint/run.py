"""The run checkpoint: everything a PERFT run changes, and nothing it does not, so a run can resume bit-exactly.

A step directory `<directory>/<step>/` holds five orbax items:

    adapters/   `nnx.state(model, AdapterParam)`: the trained weights
    optimizer/  `nnx.state(optimizer)`: the optimizer's own variables (`step` and the optax `opt_state`,
                i.e. AdamW moments for the adapters only); in flax 0.12 the optimizer no longer holds the model
    rng/        `nnx.state(model, nnx.RngState)`: dropout key and counter per stream; without it a resumed run
                draws other dropout masks than an uninterrupted one (keys are stored as raw key data)
    data/       the data iterator's position (`BatchIterator.state()`), JSON
    meta/       format tag, step, the items present, and the caller's metadata (resolved config, base path), JSON

The frozen base is never copied: the metadata names its path, and the run checkpoint stays MB-scale (about three
times the adapter bytes), which is what makes frequent asynchronous saves cheap (spec/ENGINEERING.md §7).

Restoring loads into a freshly built, identically configured model and optimizer, in place and onto the
shardings of their live arrays. A checkpoint of another variant or shape is refused before orbax reads it, with a
one-line `UserError` naming the directory and the first key that differs.

Faults (issue 15): a damaged newest step (truncated, corrupt or missing files) is reported in one line, set aside
as `<step>.damaged-<n>` and the newest older step that restores is used; a full or read-only disk ends in one line
naming the step and the space needed and free, with orbax's unfinished `<step>.orbax-checkpoint-tmp*` removed
(checkpoint/orbax_errors.py sorts orbax's errors and holds back its repeated error logs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from perft_jax.checkpoint import orbax_errors
from perft_jax.checkpoint.preemption import PreemptionHandler, preemption_guard
from perft_jax.errors import UserError, disk_error_message, disk_errors
from perft_jax.io import set_aside
from perft_jax.perft.adapters import AdapterParam

FORMAT = "perft-jax-run-checkpoint"
VERSION = 1
ARRAY_ITEMS = ("adapters", "optimizer", "rng")
JSON_ITEMS = ("data", "meta")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """The `checkpoint` config section.

    Attributes:
        directory: where step directories go; empty: `<train.output_dir>/checkpoints`.
        every_steps: save after every this many optimizer steps (and always on preemption / at the end).
        keep: how many of the newest checkpoints to keep; older ones are deleted.
        async_save: write in a background thread; `save` returns once the arrays are copied to host.
    """

    directory: str = ""
    every_steps: int = 100
    keep: int = 3
    async_save: bool = True

    def validate_config(self, prefix: str = "checkpoint") -> CheckpointConfig:
        def fail(key: str, expected: str) -> None:
            raise UserError(f"{prefix}.{key}: expected {expected}, got {getattr(self, key)!r}")

        if not isinstance(self.directory, str):
            fail("directory", "a folder path (empty: <run dir>/checkpoints)")
        for key in ("every_steps", "keep"):
            value = getattr(self, key)
            if not _is_int(value) or value <= 0:
                fail(key, "a positive integer")
        if not isinstance(self.async_save, bool):
            fail("async_save", "true or false")
        return self

    def resolve_directory(self, run_dir: str | pathlib.Path) -> pathlib.Path:
        """The checkpoint folder: `directory` when set, else `<run_dir>/checkpoints`."""
        return pathlib.Path(self.directory) if self.directory else pathlib.Path(run_dir) / "checkpoints"


class RestoredRun(NamedTuple):
    """What `RunCheckpointer.restore` hands back besides the arrays it loaded in place."""

    step: int
    data_state: dict[str, Any]
    metadata: dict[str, Any]


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _storable(state: nnx.State) -> dict:
    """A pure dict of arrays orbax can write: typed PRNG keys become their uint32 key data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, nnx.to_pure_dict(state))


def _like_live(old: Any, new: jax.Array) -> Any:
    """`new` placed like the live leaf `old`: a key again when `old` is one, and uncommitted when `old` is.

    Orbax returns committed arrays. A freshly built model's arrays are uncommitted (default device), and jit
    caches executables per committedness: mixing the two would recompile the train step twice after a resume.
    """
    if isinstance(old, jax.Array) and not old.committed:
        new = jax.device_put(np.asarray(new))
    return jax.random.wrap_key_data(new, impl=jax.random.key_impl(old)) if _is_key(old) else new


def _load_into(state: nnx.State, restored: dict) -> None:
    """Put restored values into `state` (in place), placed like the values they replace."""
    nnx.replace_by_pure_dict(state, jax.tree.map(_like_live, nnx.to_pure_dict(state), restored))


def _key_name(path: tuple) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                k = getattr(k, attr)
                break
        parts.append(str(k))
    return ".".join(parts)


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{dotted key: (shape, dtype)}, in tree order; works for arrays, ShapeDtypeStructs and orbax metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_key_name(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves}


def _first_mismatch(item: str, saved: dict, live: dict) -> str | None:
    for key, (shape, dtype) in live.items():
        if key not in saved:
            return f"{item} key {key!r} is in the model but not in the checkpoint"
        if saved[key] != (shape, dtype):
            return (f"{item} key {key!r} is {saved[key][1]}{list(saved[key][0])} in the checkpoint but "
                    f"{dtype}{list(shape)} in the model")
    for key in saved:
        if key not in live:
            return f"{item} key {key!r} is in the checkpoint but not in the model"
    return None


class _Damaged(Exception):
    """A run checkpoint step that cannot be read back (truncated, corrupt or missing files); `str()`: the detail."""


def _disk_bytes(path: pathlib.Path) -> int:
    """Space the files under `path` take on disk (allocated blocks)."""
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def _report(line: str) -> None:
    if jax.process_index() == 0:
        print(line, file=sys.stderr)


class RunCheckpointer:
    """Saves and restores run checkpoints under one directory, keeping the newest `cfg.keep`.

    Use one per run; call `close()` (or use it as a context manager) so pending asynchronous writes finish.
    Faults of the outside world end in one line: an unwritable directory (checked here, before any save) or a
    full disk while saving is a `UserError` naming the step and the space needed and free, and the unfinished
    step is removed; unfinished steps of an earlier, interrupted save are removed here, and a damaged newest step
    is set aside by `restore` (which then resumes from the newest one that restores).
    """

    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig):
        cfg.validate_config()
        self.cfg = cfg
        self.directory = pathlib.Path(directory).absolute()
        with disk_errors(self.directory):
            self.directory.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.directory).close()  # writable? (leaves nothing: an unnamed file)
        self._bytes: int | None = None  # of the latest save, for a disk-full message
        self._held = orbax_errors.HeldLogs()  # installed while a save may still fail
        self._remove_unfinished(report=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                               create=True, cleanup_tmp_directories=True)
        # Handlers named up front: a fresh manager (a resumed process) can then read metadata and partial items.
        handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
        handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def _remove_unfinished(self, report: bool) -> list[str]:
        """Remove orbax's temporary step directories (`<step>.orbax-checkpoint-tmp*`), saying so when `report`
        (those of an earlier, interrupted run); their names. orbax's own `cleanup_tmp_directories` does the same,
        but in the background and silently."""
        names = ocp.path.step.tmp_checkpoints(self.directory)
        if jax.process_index() == 0:
            for name in names:
                shutil.rmtree(self.directory / name, ignore_errors=True)
                if report:
                    _report(f"note: removed the unfinished run checkpoint {self.directory / name} (an interrupted "
                            "save)")
        return names

    def _needed(self) -> int | None:
        """About the space a save needs: on disk, a step takes more than its bytes (metadata files, file system
        blocks), so the newest finished step says it best."""
        finished = [p for p in self.directory.iterdir() if p.name.isdigit()]
        return _disk_bytes(max(finished, key=lambda p: int(p.name))) if finished else self._bytes

    @contextlib.contextmanager
    def _saving(self, finished: bool) -> Iterator[None]:
        """Around orbax calls that start or finish a save: a full or unwritable disk becomes one line, and the
        unfinished step is removed. orbax's error logs are held from a save until every save has `finished`."""
        self._held.install()
        try:
            yield
        except Exception as e:
            found = orbax_errors.problem(e)
            if found is None or found.kind != "disk":
                self._held.emit()
                self._held.uninstall()
                raise
            try:  # the first failing thread raised; the others may still be writing the unfinished step
                self._manager.close()
            except Exception:  # noqa: BLE001  # the same failure, reported by another thread
                pass
            self._held.drop()
            self._held.uninstall()
            names = self._remove_unfinished(report=False)  # the error says why
            step = names[0].split(".")[0] if names else ""
            raise UserError(disk_error_message(self.directory / step, found.errno, self._needed())) from None
        if finished:
            self._held.emit()
            self._held.uninstall()

    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, data_state: Mapping[str, Any],
             metadata: Mapping[str, Any], force: bool = False) -> bool:
        """Save after optimizer step `step` when it is a multiple of `every_steps`, or when `force`.

        Returns whether a save was started (False also when `step` is already saved). Asynchronous by default:
        the arrays are copied to host before this returns, so training may go on changing the model.

        Raises:
            UserError: the disk is full or not writable (this save, or the asynchronous one before it).
        """
        if not (force or step % self.cfg.every_steps == 0) or step in self._manager.all_steps():
            return False
        trees = {"adapters": nnx.state(model, AdapterParam), "optimizer": nnx.state(optimizer),
                 "rng": nnx.state(model, nnx.RngState)}
        arrays = {name: _storable(state) for name, state in trees.items()}
        arrays = {name: tree for name, tree in arrays.items() if jax.tree.leaves(tree)}  # orbax refuses empty items
        meta = {"format": FORMAT, "version": VERSION, "step": int(step), "items": sorted(arrays),
                "metadata": dict(metadata)}
        try:
            text = json.dumps(meta) + json.dumps(dict(data_state))
        except TypeError as e:
            raise UserError(f"run checkpoint metadata / data state is not JSON-serialisable: {e}") from None
        self._bytes = sum(x.nbytes for x in jax.tree.leaves(arrays)) + len(text)
        args = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
        args["data"] = ocp.args.JsonSave(dict(data_state))
        args["meta"] = ocp.args.JsonSave(meta)
        with self._saving(finished=False):
            return bool(self._manager.save(step, args=ocp.args.Composite(**args), force=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, model: nnx.Module, optimizer: nnx.Optimizer, step: int | None = None) -> RestoredRun:
        """Load adapters, optimizer state and dropout RNG of `step` (default: the latest that restores) into `model`
        and `optimizer` in place, onto the shardings of their current arrays.

        Without `step`, a damaged newest step (a node dying mid-write, a flaky file system) is reported in one line
        and set aside as `<step>.damaged-<n>` (kept for inspection, no longer a step), and the next older one is
        tried; nothing is moved when none restores.

        Raises:
            UserError: no checkpoint, none that restores, or one that does not match the model (variant, sizes,
                dtypes; older steps are not tried then, they would not match either).
        """
        self.wait_until_finished()
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise UserError(f"{self.directory}: no run checkpoint for step {step} (saved steps: {steps})")
            try:
                return self._restore_step(model, optimizer, step)
            except _Damaged as e:
                raise UserError(f"{self.directory / str(step)}: damaged run checkpoint ({e})") from None
        if not steps:
            raise UserError(f"{self.directory}: no run checkpoint to restore")
        damaged: dict[int, str] = {}
        for candidate in reversed(steps):
            try:
                restored = self._restore_step(model, optimizer, candidate)
            except _Damaged as e:
                damaged[candidate] = str(e)
                continue
            self._set_aside(damaged, candidate)
            return restored
        raise UserError(f"{self.directory}: none of the run checkpoints {steps} restores (step {steps[-1]}: "
                        f"{damaged[steps[-1]]}); nothing was moved: move the directory away to start afresh")

    def _set_aside(self, damaged: dict[int, str], resumed: int) -> None:
        if not damaged:
            return
        if jax.process_index() == 0:
            for step, detail in sorted(damaged.items(), reverse=True):
                aside = set_aside(self.directory / str(step))
                _report(f"warning: {self.directory / str(step)}: damaged run checkpoint ({detail}); moved to "
                        f"{aside.name} for inspection, resuming from step {resumed}")
        if jax.process_count() > 1:  # every process sees the steps as process 0 left them
            multihost_utils.sync_global_devices("perft_jax run checkpoint set aside")
        self._manager.reload()

    def _restore_step(self, model: nnx.Module, optimizer: nnx.Optimizer, step: int) -> RestoredRun:
        where = self.directory / str(step)
        states = {"adapters": nnx.state(model, AdapterParam), "optimizer": nnx.state(optimizer),
                  "rng": nnx.state(model, nnx.RngState)}
        live = {name: _storable(state) for name, state in states.items()}
        live = {name: tree for name, tree in live.items() if jax.tree.leaves(tree)}
        held = orbax_errors.HeldLogs().install()
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise UserError(f"{where}: not a perft-jax run checkpoint (format {FORMAT} version {VERSION})")
            self._check_structure(step, where, meta["items"], live)
            args = {name: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
                    for name, tree in live.items()}
            restored = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore(), **args))
        except (UserError, _Damaged):
            raise
        except Exception as e:
            found = orbax_errors.problem(e)
            if found is None:
                raise
            held.drop()
            if found.kind == "disk":  # e.g. no permission to read: no damage, and older steps would fail alike
                raise UserError(disk_error_message(where, found.errno) or f"{where}: {found.detail}") from None
            raise _Damaged(found.detail) from None
        finally:
            held.emit()
            held.uninstall()
        for name, tree in live.items():
            _load_into(states[name], restored[name])
        nnx.update(model, states["adapters"])
        nnx.update(optimizer, states["optimizer"])
        if "rng" in live:
            nnx.update(model, states["rng"])
        return RestoredRun(int(step), dict(restored["data"] or {}), dict(meta.get("metadata") or {}))

    def _check_structure(self, step: int, where: pathlib.Path, saved_items: list[str], live: dict) -> None:
        for name in ARRAY_ITEMS:
            if (name in saved_items) != (name in live):
                side = "checkpoint" if name in saved_items else "model"
                raise UserError(f"{where}: does not match the model: item {name!r} exists only in the {side}")
        metadata = self._manager.item_metadata(step)
        for name, tree in live.items():
            saved_tree = metadata[name]
            saved_tree = getattr(saved_tree, "tree", saved_tree)  # orbax wraps it in a TreeMetadata
            saved = _leaf_specs(saved_tree)
            if not saved:  # the item was saved with arrays (meta lists it): its metadata file is gone
                raise _Damaged(f"{name}/_METADATA is missing or empty")
            problem = _first_mismatch(name, saved, _leaf_specs(tree))
            if problem:
                raise UserError(f"{where}: does not match the model: {problem}")

    def wait_until_finished(self) -> None:
        """Block until pending asynchronous saves are written and committed."""
        with self._saving(finished=True):
            self._manager.wait_until_finished()

    def close(self) -> None:
        self.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["CheckpointConfig", "PreemptionHandler", "RestoredRun", "RunCheckpointer", "preemption_guard"]
