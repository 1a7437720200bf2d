"""Device meshes and logical-axis sharding: the `mesh` config section and the placement of model states.

Every parameter names its axes logically (`axes=("exp", "embed_moe", "mlp_moe")`, see models/layers.py);
a table of rules (MaxText's `logical_axis_rules`) maps each logical name to zero or more mesh axes:

    mesh axes   data (pure data parallelism), fsdp (data parallelism with sharded weights),
                expert (expert parallelism; also shards the batch), tensor (sharded matmul widths)

`LogicalSharding(mesh, rules)` turns logical names into `PartitionSpec`s / `NamedSharding`s and places whole
model states (`state_shardings`). Trainable variables (a variable type whose class says `placement =
TRAINABLE`: PERFT's `AdapterParam`) and their optimizer state are tiny and stay replicated whatever their
logical names say, unless `mesh.shard_adapters` is set: then they follow the rules like the base (e.g.
`adapters: expert` splits the adapter experts over `expert`). This module knows nothing else of adapters.
`shard_model` records the `LogicalSharding` on the model (`model_sharding`), so adapters attached later
(perft/attach.py `place_like_base`), the optimizer state and the train step place them the same way.

Why our own `axes` metadata and not Flax NNX's `sharding_names` + `nnx.get_abstract_model(init, mesh)`: NNX maps
names to mesh axes one to one, while placement here needs what it cannot say. Trainable variables are placed by
their type (replicated unless `shard_adapters`), not by their names; mesh axes of size 1 drop out of a spec,
so one rule table serves every mesh shape; a dimension that does not divide over its axes, or two names on one
mesh axis, is a one-line error naming the parameter (XLA's own error names neither). The restore path needs
exactly this (abstract state -> `NamedSharding` per variable, build.py), and it already works without a mesh
context. No activation sharding constraints are set inside the decoder: the batch enters placed by
`batch_sharding` and XLA's sharding propagation carries it through the layers; the
expert dispatch under `shard_map` states its own specs (models/moe/ep.py).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from perft_jax.distributed import DistributedConfig
from perft_jax.errors import UserError

# The `placement` class attribute of variable types placed as trainable state (`trainable_sharding`).
TRAINABLE = "trainable"

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical name -> mesh axes (a name, a list of names, or null = replicated). Names used by the models
# (models/layers.py, models/moe/, perft/) plus the activation names used by the train step and models/moe/ep.py.
DEFAULT_RULES: dict[str, Any] = {
    # The batch is split over every axis but `tensor`: devices of one expert group hold different rows
    # and the ring dispatch (models/moe/ep.py) gathers them (MaxText shards activation_batch over expert too).
    "activation_batch": ["data", "fsdp", "expert"],
    "vocab": "tensor",
    "embed": "fsdp",  # FSDP: dense weights split along the model width, gathered by XLA right before use
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "exp": "expert",
    "embed_moe": "fsdp",
    "mlp_moe": "tensor",
    "exp_router": None,
    "adapters": None,
    "adapter_rank": None,
}


def _as_axes(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The `mesh` config section: axis sizes (-1 = the devices left), rules, dispatch, multi-host start.

    The axis sizes' product must equal the device count, and at most one may be -1 ("the rest").

    Attributes:
        data: the data-parallel axis size (rows of the batch split over it); -1: the devices left.
        fsdp: the FSDP axis size: data parallelism with the base weights split along the model width.
        expert: the expert-parallel axis size: each device holds E / n of every layer's experts.
        tensor: the tensor-parallel axis size: attention heads and the vocabulary split over it.
        expert_dispatch: "ring": experts run under `jax.shard_map` (models/moe/ep.py) with tokens all-gathered over
            `expert` and outputs reduce-scattered back; "ragged_a2a": under `jax.shard_map`, each (token,
            choice) pair is sent to the device holding its expert with `jax.lax.ragged_all_to_all` and back
            (GPU/TPU only: XLA:CPU lacks the op); "gspmd": the model's own backend, partitioned by XLA.
        shard_adapters: false: adapters and their optimizer state replicated; true: placed by the rules of their
            logical axes (`adapters`, `adapter_rank`, `embed`, ...), like the base weights.
        logical_axis_rules: entries replace the default table's (`DEFAULT_RULES`) of the same logical name.
        distributed: `jax.distributed.initialize` settings (perft_jax/distributed.py).
    """

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    expert_dispatch: Literal["ring", "ragged_a2a", "gspmd"] = "ring"
    shard_adapters: bool = False
    logical_axis_rules: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self):
        # A mapping given in a config file updates the defaults, so a user writes only what differs.
        if isinstance(self.logical_axis_rules, Mapping):
            object.__setattr__(self, "logical_axis_rules", {**DEFAULT_RULES, **self.logical_axis_rules})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in MESH_AXES)

    def rules(self) -> dict[str, tuple[str, ...]]:
        """The validated table, each value a tuple of mesh axes (empty: replicated)."""
        return normalize_rules(self.logical_axis_rules, "mesh.logical_axis_rules")

    def validate_config(self, prefix: str = "mesh") -> MeshConfig:
        for axis in MESH_AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or isinstance(size, bool) or not (size == -1 or size >= 1):
                raise UserError(f"{prefix}.{axis}: expected a positive integer or -1 (the rest), got {size!r}")
        if self.shape.count(-1) > 1:
            rest = [a for a in MESH_AXES if getattr(self, a) == -1]
            raise UserError(f"{prefix}.{rest[1]}: at most one mesh axis may be -1, got {', '.join(rest)}")
        normalize_rules(self.logical_axis_rules, f"{prefix}.logical_axis_rules")
        return self


def normalize_rules(rules: Any, prefix: str = "logical_axis_rules") -> dict[str, tuple[str, ...]]:
    """Check a rules table (name -> mesh axis | list of mesh axes | None) and return name -> tuple of axes."""
    if not isinstance(rules, Mapping):
        raise UserError(f"{prefix}: expected a mapping of logical axis name to mesh axis, got {rules!r}")
    table = {}
    for name, value in rules.items():
        ok = value is None or isinstance(value, str) or (
            isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
        if not isinstance(name, str) or not ok:
            raise UserError(f"{prefix}.{name}: expected a mesh axis, a list of mesh axes or null, got {value!r}")
        axes = _as_axes(value)
        for axis in axes:
            if axis not in MESH_AXES:
                raise UserError(f"{prefix}.{name}: unknown mesh axis {axis!r} (known: {', '.join(MESH_AXES)})")
        if len(set(axes)) != len(axes):
            raise UserError(f"{prefix}.{name}: mesh axis listed twice in {list(axes)}")
        table[name] = axes
    return table


def resolve_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Mesh sizes with -1 filled in; a one-line error naming the `mesh` keys when they do not fit."""
    cfg.validate_config()
    fixed = math.prod(s for s in cfg.shape if s != -1)
    sizes = ", ".join(f"{a}={getattr(cfg, a)}" for a in MESH_AXES)
    if -1 in cfg.shape:
        if num_devices % fixed:
            raise UserError(f"mesh: {sizes} does not divide the {num_devices} devices")
        return tuple(num_devices // fixed if s == -1 else s for s in cfg.shape)
    if fixed != num_devices:
        raise UserError(f"mesh: {sizes} needs {fixed} devices, found {num_devices}")
    return cfg.shape


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The (data, fsdp, expert, tensor) mesh over `devices` (default: all, across processes).

    Axes are `AxisType.Auto` (classic GSPMD: XLA propagates shardings and inserts collectives);
    `jax.make_mesh` defaults to Explicit axes since 0.7 (spec/ENGINEERING.md §2).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


@dataclasses.dataclass(frozen=True)
class LogicalSharding:
    """A mesh and its rules: logical axis names -> `PartitionSpec` / `NamedSharding`.

    Hashable (the rules are stored as a sorted tuple), so it can sit in a module's static attributes.
    `shard_adapters`: whether adapters (and their optimizer state) follow the rules or stay replicated.
    """

    mesh: jax.sharding.Mesh
    rules: tuple[tuple[str, tuple[str, ...]], ...]
    shard_adapters: bool = False

    @classmethod
    def create(cls, mesh: jax.sharding.Mesh, rules: Mapping[str, Any] | None = None,
               shard_adapters: bool = False) -> LogicalSharding:
        """`rules` default to `DEFAULT_RULES`; a rule naming an axis the mesh lacks is a one-line error."""
        table = normalize_rules(DEFAULT_RULES if rules is None else rules)
        for name, axes in table.items():
            for axis in axes:
                if axis not in mesh.axis_names:
                    raise UserError(f"logical_axis_rules.{name}: unknown mesh axis {axis!r} "
                                    f"(mesh axes: {', '.join(mesh.axis_names)})")
        return cls(mesh, tuple(sorted(table.items())), bool(shard_adapters))

    def mesh_axes(self, name: str | None) -> tuple[str, ...]:
        """Mesh axes of one logical name; names without a rule (and None) are replicated."""
        return dict(self.rules).get(name, ()) if name is not None else ()

    def spec(self, names: Sequence[str | None], shape: Sequence[int] | None = None,
             what: str = "array") -> PartitionSpec:
        """PartitionSpec of an array whose dimensions have logical `names`.

        With `shape`, each dimension must divide evenly over its mesh axes (XLA's placement requires it);
        mesh axes of size 1 are dropped from the spec, so a rule costs nothing on a mesh that lacks it.
        """
        used: dict[str, str] = {}
        entries = []
        for dim, name in enumerate(names):
            axes = tuple(a for a in self.mesh_axes(name) if self.mesh.shape[a] > 1)
            for axis in axes:
                if axis in used:
                    raise UserError(f"{what}: logical axes {used[axis]!r} and {name!r} both map to mesh axis "
                                    f"{axis!r}; change one of their logical_axis_rules")
                used[axis] = name
            size = math.prod(self.mesh.shape[a] for a in axes)
            if shape is not None and shape[dim] % size:
                raise UserError(f"{what}: dimension {dim} ({name}, size {shape[dim]}) does not divide over mesh "
                                f"axes {list(axes)} of {size} devices; change the mesh or logical_axis_rules.{name}")
            entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        while entries and entries[-1] is None:
            entries.pop()
        return PartitionSpec(*entries)

    def named_sharding(self, names: Sequence[str | None], shape: Sequence[int] | None = None,
                       what: str = "array") -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape, what))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def batch_sharding(self, shape: Sequence[int], batch_dim: int = 0) -> NamedSharding:
        """Inputs [B, T] (or [A, B, T] with `batch_dim=1`): rows over the `activation_batch` axes."""
        names = [None] * len(shape)
        names[batch_dim] = "activation_batch"
        return self.named_sharding(names, shape, what="data.batch_size")

    def variable_sharding(self, path: tuple, var: nnx.Variable) -> NamedSharding:
        """Where one model variable lives: by its `axes` metadata; untagged variables replicated, trainable
        ones (`placement = TRAINABLE`) as `trainable_sharding` says."""
        if getattr(type(var), "placement", None) == TRAINABLE:
            return self.trainable_sharding(path, var)
        return self._by_axes(path, var)

    def trainable_sharding(self, path: tuple, var: nnx.Variable) -> NamedSharding:
        """Where an adapter, or an optimizer-state variable (it carries its adapter's `axes`), lives:
        replicated, or by its logical axes when `shard_adapters` is set. Scalars (step counts) replicated."""
        return self._by_axes(path, var) if self.shard_adapters else self.replicated

    def _by_axes(self, path: tuple, var: nnx.Variable) -> NamedSharding:
        axes = var.get_metadata().get("axes")
        if axes is None or not hasattr(var, "shape"):
            return self.replicated
        where = ".".join(str(p) for p in path)
        if len(axes) != len(var.shape):
            raise UserError(f"{where}: axes {axes} do not match its shape {tuple(var.shape)}")
        return self.named_sharding(axes, var.shape, where)

    def state_shardings(self, state: nnx.State) -> nnx.State:
        """An `nnx.State` of `NamedSharding`s, one per variable of `state` (values or ShapeDtypeStructs)."""
        return _map_variables(state, self.variable_sharding)

    def trainable_shardings(self, state: nnx.State) -> nnx.State:
        """Like `state_shardings`, for adapter or optimizer state: every variable by `trainable_sharding`."""
        return _map_variables(state, self.trainable_sharding)


def _map_variables(state: nnx.State, fn) -> nnx.State:
    """`state` with each variable's value replaced by `fn(path, variable)`."""
    return nnx.from_flat_state([(path, var.replace(fn(path, var))) for path, var in nnx.to_flat_state(state)])


def run_sharding(cfg: MeshConfig) -> LogicalSharding | None:
    """The mesh of a run over all devices (all processes), or None when there is a single device: then
    nothing is placed explicitly and single-device runs stay exactly as they were."""
    mesh = build_mesh(cfg)
    if mesh.size == 1:
        return None
    return LogicalSharding.create(mesh, cfg.rules(), cfg.shard_adapters)


def shard_model(model: nnx.Module, sharding: LogicalSharding) -> nnx.Module:
    """Move every variable of `model` onto its rule-given sharding, in place (also returned), and record
    `sharding` on the model (`model_sharding`)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, sharding.state_shardings(state)))  # device to device, no host copy
    remember_sharding(model, sharding)
    return model


def remember_sharding(model: nnx.Module, sharding: LogicalSharding) -> None:
    """Record where `model` lives, so that adapters attached later, the optimizer state, the train step and
    generation place their arrays the same way. A static attribute: part of the graph definition."""
    model.logical_sharding = sharding


def model_sharding(model: nnx.Module) -> LogicalSharding | None:
    """The `LogicalSharding` a model was placed with (`shard_model`, `load_model(mesh=...)`), or None."""
    return getattr(model, "logical_sharding", None)
