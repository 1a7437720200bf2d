"""A memory planner: per-device bytes of a PERFT training run, and the smallest mesh on which it fits.

    python -m perft_jax.params --config FILE --plan h200-141gb [--devices N] [key=value ...]

Per device, for the config's `data.batch_size` rows of `data.cutoff_len` tokens and its `mesh` section:

- base parameters, adapters and optimizer state: exact, from the shapes (`nnx.eval_shape`, no weights) split
  by the sharding rules (perft_jax/sharding.py: experts over `expert`, dense widths over `fsdp`, ...), on an
  `AbstractMesh` (no devices needed). Adapters and their optimizer state are replicated unless
  `mesh.shard_adapters`.
- fsdp weight gather: an estimate, the largest layer's weights gathered over `fsdp` (what XLA holds while it
  uses them; zero without fsdp).
- activations: XLA's memory analysis (`temp_size_in_bytes`) of the compiled train step (train/step.py) on
  abstract arrays, at real width with 1 and 2 layers, 1 row of min(cutoff_len, 512) tokens, remat off and on.
  Per layer = temp(2) - temp(1), fixed = temp(1) - per layer, extrapolated to the model's depth and scaled
  linearly with the tokens per device. The compile is XLA:CPU's (a proxy for the accelerator's: kernels,
  fusion and the attention implementation differ) with the `grouped` backend when the config says
  auto/kernel/ragged (their CPU lowerings are not what a GPU/TPU runs). Collective buffers (the ring dispatch
  gathers the tokens of an expert group) are not included. Linear scaling, measured at OLMoE-1B-7B width, PERFT-R:
  1 layer x 256 tokens: 1 row 112.4 MiB, 2 rows 219.8 (2 x 112.4 = 224.8, +2 %), 4 rows 434.6 (+3 %); 2 layers:
  198.4, 385.7 (+3 %), 760.2 (+4 %); 1 row x 512 tokens 219.8 (+2 %): scaling 1 row up overestimates by <= 4 %.
  A step that fails to compile is reported as "not measured" rather than ending the plan.
- fits: total <= capacity less a 10 % headroom (XLA's runtime, fragmentation, the CUDA context).

Capacities (`DEVICES`): GPUs at the vendor's decimal gigabytes (H100 80 GB = 80e9 B; nvidia-smi reports 81559 MiB
= 85.5e9 B, so this is conservative), TPUs at Google's GiB of HBM per chip (v5e 16 GiB, v5p 95 GiB). A byte
count also works: `24e9`, `24GB`, `24GiB`, `512MiB`.

The smallest mesh: device counts 1, 2, 4, ..., 64; at each count the (data, fsdp, expert, tensor) shapes whose
`expert` divides the experts, whose data x fsdp x expert divides the batch, and whose parameters divide over the
rules; among those that fit, the one with the largest `expert`, then `fsdp`, then the smallest `tensor`.
Activations are not divided by `tensor` (an upper bound).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from perft_jax.config import Config
from perft_jax.errors import UserError
from perft_jax.models.config import ModelConfig
from perft_jax.models.decoder import MoeForCausalLM
from perft_jax.optim import OptimConfig
from perft_jax.perft.attach import attach_perft
from perft_jax.perft.config import PerftConfig
from perft_jax.sharding import MESH_AXES, LogicalSharding, normalize_rules

GB, GiB = 10**9, 2**30
HEADROOM = 0.10
DEVICE_COUNTS = (1, 2, 4, 8, 16, 32, 64)
MAX_PROBE_SEQ = 512
DEVICES: dict[str, tuple[int, str]] = {
    "h100-80gb": (80 * GB, "NVIDIA H100 80 GB"),
    "h200-141gb": (141 * GB, "NVIDIA H200 141 GB"),
    "v5e-16gb": (16 * GiB, "TPU v5e, 16 GiB HBM per chip"),
    "v5p-95gb": (95 * GiB, "TPU v5p, 95 GiB HBM per chip"),
}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": GB, "tb": 10**12, "k": 10**3, "m": 10**6, "g": GB,
          "t": 10**12, "kib": 2**10, "mib": 2**20, "gib": GiB, "tib": 2**40}


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    capacity: int  # bytes

    @property
    def usable(self) -> int:
        return int(self.capacity * (1 - HEADROOM))


def parse_device(text: str, flag: str = "--plan") -> Device:
    """A name of `DEVICES` or a byte count (`24e9`, `24GB`, `24GiB`); a one-line UserError naming `flag`."""
    key = str(text).strip().lower()
    if key in DEVICES:
        return Device(key, DEVICES[key][0])
    m = re.fullmatch(r"(\d+(?:\.\d*)?(?:e\d+)?)\s*([a-z]*)", key)
    if m and m.group(2) in _UNITS:
        capacity = int(float(m.group(1)) * _UNITS[m.group(2)])
        if capacity > 0:
            return Device(key, capacity)
    raise UserError(f"{flag}: expected one of {', '.join(DEVICES)} or a byte count such as 24e9, 24GB or "
                    f"24GiB, got {text!r}")


# ---- shapes -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Leaf:
    path: tuple
    shape: tuple[int, ...]
    nbytes: int
    axes: tuple | None  # logical axis names (`axes` metadata), None: replicated


@dataclasses.dataclass(frozen=True)
class StateShapes:
    base: tuple[Leaf, ...]  # the frozen state of the train step
    adapters: tuple[Leaf, ...]  # adapters + their dropout RNG state
    optimizer: tuple[Leaf, ...]


def _leaves(state: nnx.State) -> tuple[Leaf, ...]:
    out = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        shape = tuple(getattr(value, "shape", ()))
        itemsize = value.dtype.itemsize
        axes = var.get_metadata().get("axes")
        out.append(Leaf(tuple(path), shape, math.prod(shape) * itemsize, None if axes is None else tuple(axes)))
    return tuple(out)


def _abstract_step_state(model_cfg: ModelConfig, perft_cfg: PerftConfig, optim_cfg: OptimConfig,
                         adapter_dtype: str):
    from perft_jax.train.optim import make_optimizer
    from perft_jax.train.step import split_model

    def build():
        model = MoeForCausalLM(model_cfg, nnx.Rngs(0))
        if perft_cfg.variant != "none":
            attach_perft(model, perft_cfg, param_dtype=jnp.dtype(adapter_dtype))
        return model, make_optimizer(model, optim_cfg)

    model, optimizer = nnx.eval_shape(build)
    graphdef, trainable, frozen = split_model(model)
    opt_graphdef, opt_state = nnx.split(optimizer)
    return graphdef, opt_graphdef, trainable, frozen, opt_state


def state_shapes(model_cfg: ModelConfig, perft_cfg: PerftConfig, optim_cfg: OptimConfig = OptimConfig(),
                 adapter_dtype: str = "float32") -> StateShapes:
    _, _, trainable, frozen, opt_state = _abstract_step_state(model_cfg, perft_cfg, optim_cfg, adapter_dtype)
    return StateShapes(_leaves(frozen), _leaves(trainable), _leaves(opt_state))


def abstract_mesh(shape: tuple[int, ...]) -> AbstractMesh:
    return AbstractMesh(tuple(shape), MESH_AXES)


def shard_bytes(leaves, logical: LogicalSharding, by_rules: bool = True, drop: tuple[str, ...] = ()) -> int:
    """Bytes one device holds of `leaves` split by their logical axes (`by_rules=False`: replicated);
    `drop`: mesh axes treated as size 1 (the gathered size). A dimension that does not divide: UserError."""
    total = 0
    for leaf in leaves:
        if not by_rules or leaf.axes is None or len(leaf.axes) != len(leaf.shape):
            total += leaf.nbytes
            continue
        spec = logical.spec(leaf.axes, leaf.shape, ".".join(map(str, leaf.path)))
        axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
        total += leaf.nbytes // math.prod(logical.mesh.shape[a] for a in axes if a not in drop)
    return total


def fsdp_gather_bytes(base, logical: LogicalSharding) -> int:
    """The largest layer's (or embedding's / head's) extra bytes when its weights are gathered over fsdp."""
    if logical.mesh.shape["fsdp"] == 1:
        return 0
    groups: dict[tuple, list[Leaf]] = {}
    for leaf in base:
        groups.setdefault(leaf.path[:2] if leaf.path[0] == "layers" else leaf.path[:1], []).append(leaf)
    return max(shard_bytes(g, logical, drop=("fsdp",)) - shard_bytes(g, logical) for g in groups.values())


# ---- activations --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Activations:
    """XLA temporaries of the train step at `probe_rows` x `probe_seq` tokens: fixed + per layer (bytes);
    `error`: why the compile failed (then the sizes are 0)."""

    fixed: int
    per_layer: int
    probe_rows: int
    probe_seq: int
    backend: str
    error: str = ""

    def at(self, num_layers: int, rows: float, seq: int) -> int:
        return int((self.fixed + num_layers * self.per_layer) * rows / self.probe_rows * seq / self.probe_seq)


def probe_backend(model_cfg: ModelConfig) -> str:
    return model_cfg.moe_backend if model_cfg.moe_backend in ("dense", "capacity", "grouped") else "grouped"


def step_temp_bytes(model_cfg: ModelConfig, perft_cfg: PerftConfig, optim_cfg: OptimConfig, adapter_dtype: str,
                    rows: int, seq: int) -> int:
    """`temp_size_in_bytes` of the compiled train step at [rows, seq] (abstract arrays: nothing allocated)."""
    from perft_jax.train.step import train_step_fn

    graphdef, opt_graphdef, trainable, frozen, opt_state = _abstract_step_state(
        model_cfg, perft_cfg, optim_cfg, adapter_dtype)
    tokens = {k: jax.ShapeDtypeStruct((rows, seq), jnp.int32) for k in ("input_ids", "labels", "attention_mask")}
    lowered = train_step_fn.lower(graphdef, opt_graphdef, trainable, frozen, opt_state, tokens, model_cfg, perft_cfg)
    return lowered.compile().memory_analysis().temp_size_in_bytes


def measure_activations(model_cfg: ModelConfig, perft_cfg: PerftConfig, optim_cfg: OptimConfig,
                        adapter_dtype: str, seq: int, remat: bool, rows: int = 1) -> Activations:
    """Compile 1 and 2 layers at [rows, min(seq, MAX_PROBE_SEQ)] and split the temporaries into fixed + per layer."""
    probe_seq = min(seq, MAX_PROBE_SEQ)
    backend = probe_backend(model_cfg)
    temps = []
    try:
        for layers in (1, 2):
            cfg = model_cfg.replace(num_layers=layers, moe_backend=backend, remat=remat)
            temps.append(step_temp_bytes(cfg, perft_cfg, optim_cfg, adapter_dtype, rows, probe_seq))
    except Exception as e:  # noqa: BLE001 -- reported in the plan, not a reason to print nothing
        return Activations(0, 0, rows, probe_seq, backend, f"{type(e).__name__} {str(e)[:80]}".strip())
    per_layer = max(temps[1] - temps[0], 0)
    return Activations(temps[0] - per_layer, per_layer, rows, probe_seq, backend)


# ---- per-device plan ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DeviceBytes:
    mesh: tuple[int, ...]
    rows: float  # batch rows per device
    base: int
    adapters: int
    optimizer: int
    gather: int
    activations: dict[bool, int | None]  # remat -> bytes (None: not measured)

    def total(self, remat: bool) -> int | None:
        act = self.activations[remat]
        return None if act is None else self.base + self.adapters + self.optimizer + self.gather + act


def device_bytes(shapes: StateShapes, acts: dict[bool, Activations], mesh: tuple[int, ...], rules,
                 shard_adapters: bool, batch: int, seq: int, num_layers: int) -> DeviceBytes:
    """Bytes per device on `mesh` (data, fsdp, expert, tensor); UserError when a parameter or the batch does
    not divide over it."""
    logical = LogicalSharding.create(abstract_mesh(mesh), rules, shard_adapters)
    split = math.prod(mesh[:3])  # activation_batch: data x fsdp x expert
    if batch % split:
        raise UserError(f"data.batch_size: {batch} rows do not split over data x fsdp x expert = {split} devices")
    rows = batch / split
    return DeviceBytes(
        mesh, rows, shard_bytes(shapes.base, logical), shard_bytes(shapes.adapters, logical, shard_adapters),
        shard_bytes(shapes.optimizer, logical, shard_adapters), fsdp_gather_bytes(shapes.base, logical),
        {remat: None if a.error else a.at(num_layers, rows, seq) for remat, a in acts.items()})


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_meshes(n: int, num_experts: int, batch: int) -> list[tuple[int, int, int, int]]:
    """(data, fsdp, expert, tensor) of n devices, `expert` dividing the experts and data x fsdp x expert the
    batch, in order of preference: largest expert, then fsdp, then smallest tensor."""
    out = []
    for e in _divisors(n):
        if num_experts % e:
            continue
        for f in _divisors(n // e):
            for t in _divisors(n // (e * f)):
                d = n // (e * f * t)
                if batch % (d * f * e) == 0:
                    out.append((d, f, e, t))
    return sorted(out, key=lambda s: (-s[2], -s[1], s[3]))


def smallest_fit(fits: Callable[[tuple], DeviceBytes | None], num_experts: int, batch: int):
    """(mesh, bytes) of the first candidate mesh that fits, smallest device count first; None if none up to 64."""
    for n in DEVICE_COUNTS:
        for mesh in candidate_meshes(n, num_experts, batch):
            found = fits(mesh)
            if found is not None:
                return found
    return None


@dataclasses.dataclass(frozen=True)
class Plan:
    device: Device
    model_cfg: ModelConfig
    batch: int
    seq: int
    remat: bool  # the config's setting
    config_mesh: DeviceBytes | None
    config_mesh_error: str
    smallest: dict[bool, DeviceBytes | None]
    acts: dict[bool, Activations]


def make_plan(cfg: Config, model_cfg: ModelConfig, device: Device, num_devices: int | None = None,
              acts: dict[bool, Activations] | None = None) -> Plan:
    """The plan of run config `cfg` (its base `model_cfg` resolved) on `device`s; `num_devices` resolves a -1 mesh
    axis (default: the product of the fixed axes). `acts` skips the compiles (tests)."""
    batch, seq = cfg.data.batch_size, cfg.data.cutoff_len
    shapes = state_shapes(model_cfg, cfg.perft, cfg.optim, cfg.model.adapter_dtype)
    if acts is None:
        acts = {r: measure_activations(model_cfg, cfg.perft, cfg.optim, cfg.model.adapter_dtype, seq, r)
                for r in (False, True)}
    rules = normalize_rules(cfg.mesh.logical_axis_rules, "mesh.logical_axis_rules")

    def at(mesh):
        return device_bytes(shapes, acts, mesh, rules, cfg.mesh.shard_adapters, batch, seq, model_cfg.num_layers)

    from perft_jax.sharding import resolve_shape

    fixed = math.prod(s for s in cfg.mesh.shape if s != -1)
    mesh_bytes, error = None, ""
    try:
        mesh_bytes = at(resolve_shape(cfg.mesh, num_devices or fixed))
    except UserError as e:
        error = str(e)

    def fitting(remat):
        def fits(mesh):
            try:
                b = at(mesh)
            except UserError:
                return None
            total = b.total(remat)
            return b if total is not None and total <= device.usable else None
        return fits

    smallest = {r: None if acts[r].error else smallest_fit(fitting(r), model_cfg.num_experts, batch)
                for r in (False, True)}
    return Plan(device, model_cfg, batch, seq, bool(model_cfg.remat), mesh_bytes, error, smallest, acts)


# ---- report -------------------------------------------------------------------------------------------------

def gb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GB:.2f} GB"


def mesh_text(mesh: tuple[int, ...]) -> str:
    return f"{math.prod(mesh)} device{'s' if math.prod(mesh) > 1 else ''} (" + \
        " ".join(f"{a}={s}" for a, s in zip(MESH_AXES, mesh)) + ")"


def format_plan(plan: Plan, title: str = "") -> str:
    p, dev = plan, plan.device
    label = DEVICES.get(dev.name, (0, "custom"))[1]
    lines = [title] if title else []
    lines.append(f"device: {dev.name} ({label}): {gb(dev.capacity)}, {gb(dev.usable)} usable "
                 f"(10 % headroom for the runtime)")
    lines.append(f"batch: {p.batch} rows x {p.seq} tokens (data.batch_size x data.cutoff_len); "
                 f"model.remat: {str(p.remat).lower()}")
    if p.config_mesh is None:
        lines.append(f"config mesh: does not apply ({p.config_mesh_error})")
    else:
        b = p.config_mesh
        lines.append(f"config mesh: {mesh_text(b.mesh)}, {b.rows:g} rows per device")
        rows = [("base parameters", b.base, b.base), ("adapters", b.adapters, b.adapters),
                ("optimizer state", b.optimizer, b.optimizer), ("fsdp weight gather (est.)", b.gather, b.gather),
                ("activations (XLA, extrap.)", b.activations[False], b.activations[True]),
                ("total", b.total(False), b.total(True))]
        lines.append(f"  {'per device':<28}{'remat off':>12}{'remat on':>12}")
        lines += [f"  {name:<28}{gb(off):>12}{gb(on):>12}" for name, off, on in rows]
        verdict = ["n/a" if t is None else "yes" if t <= dev.usable else "NO" for t in (b.total(False), b.total(True))]
        lines.append(f"  {'fits':<28}{verdict[0]:>12}{verdict[1]:>12}")
    for remat in (False, True):
        s = p.smallest[remat]
        where = ("not measured" if p.acts[remat].error else "none up to 64 devices" if s is None else
                 f"{mesh_text(s.mesh)}, {gb(s.total(remat))} per device")
        lines.append(f"smallest mesh that fits, remat {'on' if remat else 'off'}: {where}")
    a = p.acts[False]
    lines.append(f"activations: XLA:CPU temporaries of the compiled train step ({a.backend} backend) at 1 row x "
                 f"{a.probe_seq} tokens, 1 and 2 layers, extrapolated to {p.model_cfg.num_layers} layers and scaled "
                 f"linearly with the tokens per device;")
    lines.append("  a proxy for the accelerator's; collective buffers not included")
    for remat in (False, True):
        if p.acts[remat].error:
            lines.append(f"  remat {'on' if remat else 'off'}: the train step did not compile: {p.acts[remat].error}")
    return "\n".join(lines)


__all__ = ["DEVICES", "Device", "Plan", "format_plan", "make_plan", "parse_device", "state_shapes"]
