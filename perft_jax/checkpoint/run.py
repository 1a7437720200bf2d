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
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from perft_jax.errors import UserError
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
        directory: where step directories go; empty: `<run dir>/checkpoints` (see `resolve_directory`).
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


class RunCheckpointer:
    """Saves and restores run checkpoints under one directory, keeping the newest `cfg.keep`.

    Use one per run; call `close()` (or use it as a context manager) so pending asynchronous writes finish.
    """

    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig):
        cfg.validate_config()
        self.cfg = cfg
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                               create=True, cleanup_tmp_directories=True)
        # Handlers named up front: a fresh manager (a resumed process) can then read metadata and partial items.
        handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
        handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, data_state: Mapping[str, Any],
             metadata: Mapping[str, Any], force: bool = False) -> bool:
        """Save after optimizer step `step` when it is a multiple of `every_steps`, or when `force`.

        Returns whether a save was started (False also when `step` is already saved). Asynchronous by default:
        the arrays are copied to host before this returns, so training may go on changing the model.
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
            json.dumps(meta), json.dumps(dict(data_state))
        except TypeError as e:
            raise UserError(f"run checkpoint metadata / data state is not JSON-serialisable: {e}") from None
        args = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
        args["data"] = ocp.args.JsonSave(dict(data_state))
        args["meta"] = ocp.args.JsonSave(meta)
        return bool(self._manager.save(step, args=ocp.args.Composite(**args), force=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, model: nnx.Module, optimizer: nnx.Optimizer, step: int | None = None) -> RestoredRun:
        """Load adapters, optimizer state and dropout RNG of `step` (default: the latest) into `model` and
        `optimizer` in place, onto the shardings of their current arrays.

        Raises:
            UserError: no such checkpoint, or one that does not match the model (variant, sizes, dtypes).
        """
        self._manager.wait_until_finished()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise UserError(f"{self.directory}: no run checkpoint to restore")
            step = steps[-1]
        elif step not in steps:
            raise UserError(f"{self.directory}: no run checkpoint for step {step} (saved steps: {steps})")
        where = self.directory / str(step)
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise UserError(f"{where}: not a perft-jax run checkpoint (format {FORMAT} version {VERSION})")
        states = {"adapters": nnx.state(model, AdapterParam), "optimizer": nnx.state(optimizer),
                  "rng": nnx.state(model, nnx.RngState)}
        live = {name: _storable(state) for name, state in states.items()}
        live = {name: tree for name, tree in live.items() if jax.tree.leaves(tree)}
        self._check_structure(step, where, meta["items"], live)
        args = {name: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
                for name, tree in live.items()}
        restored = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore(), **args))
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
            problem = _first_mismatch(name, _leaf_specs(saved_tree), _leaf_specs(tree))
            if problem:
                raise UserError(f"{where}: does not match the model: {problem}")

    def wait_until_finished(self) -> None:
        """Block until pending asynchronous saves are written and committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PreemptionHandler:
    """Turns SIGTERM / SIGINT into a flag the training loop polls (`should_stop()`), so it can save and exit 0.

    Use as a context manager (or `install()` / `uninstall()`); the previous handlers come back on exit. A
    second signal while the flag is set runs the previous handler (e.g. Ctrl-C twice still interrupts).
    Signal handlers can only be set from the main thread; elsewhere this installs nothing and never stops.
    """

    def __init__(self, callback: Callable[[int], None] | None = None,
                 signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.callback = callback
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def should_stop(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            previous = self._previous.get(signum, signal.SIG_DFL)
            self.uninstall()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.raise_signal(signum)
            return
        self.signum = signum
        if self.callback is not None:
            self.callback(signum)

    def install(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


def preemption_guard(callback: Callable[[int], None] | None = None) -> PreemptionHandler:
    """`with preemption_guard() as stop: ... if stop.should_stop(): save; break` (a `PreemptionHandler`)."""
    return PreemptionHandler(callback)


__all__ = ["CheckpointConfig", "PreemptionHandler", "RestoredRun", "RunCheckpointer", "preemption_guard"]
