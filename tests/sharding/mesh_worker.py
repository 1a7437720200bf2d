"""Run by test_mesh_parity.py in a fresh interpreter with 8 simulated CPU devices.

    python mesh_worker.py CKPT_DIR OUT_JSON [meshes|cases]

For every case (a mesh, an expert dispatch, a PERFT variant, replicated or sharded adapters) it restores the
converted base straight onto the mesh (`load_model(mesh=...)`), attaches adapters, and records against the
single-device result: forward logits, two training steps (loss, gradient norm, updated adapters), where the
weights live, each device's expert- and adapter-shard shapes, and whether the second step compiled again.
The assertions are in the test; this script only measures.
"""
from __future__ import annotations

import os

# Before jax is imported: the pytest process already initialised jax with one device.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")

from perft_jax import load_model  # noqa: E402
from perft_jax.errors import UserError  # noqa: E402
from perft_jax.models.moe.ep import (  # noqa: E402
    RaggedAllToAll,
    emulated_ragged_all_to_all,
    ragged_all_to_all,
)
from perft_jax.models.moe.experts import DISPATCH  # noqa: E402
from perft_jax.optim import OptimConfig  # noqa: E402
from perft_jax.perft.adapters import AdapterParam  # noqa: E402
from perft_jax.perft.attach import place_like_base  # noqa: E402
from perft_jax.perft.config import PerftConfig  # noqa: E402
from perft_jax.sharding import DEFAULT_RULES, LogicalSharding, MeshConfig, build_mesh  # noqa: E402
from perft_jax.train.optim import make_optimizer  # noqa: E402
from perft_jax.train.step import train_step  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script: tests/ for the fixtures
from tiny_models import tiny_model_config  # noqa: E402


def shard_shapes(x: jax.Array) -> list[tuple[int, ...]]:
    """Shapes of the shards this process holds (one per addressable device)."""
    return [tuple(np.shape(s.data)) for s in x.addressable_shards]


# Mesh -> the MoE backend the ring runs on each device's experts. Every result is compared with the dense
# single-device reference: at capacity factor 4 nothing is dropped, and then all backends compute the same.
MESHES = {(8, 1, 1, 1): "dense", (2, 1, 4, 1): "ragged", (1, 2, 4, 1): "capacity", (2, 2, 2, 1): "dense"}
# More cases, by name: (mesh, backend, dispatch, PERFT variant, adapters sharded by the rules below).
#   tensor > 1: attention heads, vocabulary and expert widths split over `tensor`;
#   a2a: the ragged all-to-all dispatch with its exchange emulated by all_to_all (XLA:CPU lacks the op);
#   sharded adapters: `mesh.shard_adapters` with `adapters: expert` (PERFT-R's 4 / PERFT-E's 8 adapter experts).
CASES = {
    "tensor 1,1,2,4": ((1, 1, 2, 4), "grouped", "ring", "perft_r", False),
    "tensor 1,2,1,4": ((1, 2, 1, 4), "capacity", "ring", "perft_r", False),
    "a2a 2,1,4,1": ((2, 1, 4, 1), "ragged", "a2a", "perft_r", False),
    "a2a 1,2,2,2": ((1, 2, 2, 2), "capacity", "a2a", "perft_r", False),
    # The accelerator kernels' path (XLA's ragged_dot on CPU), the one run with check_vma=False (ep.local_backend).
    "kernel 2,1,4,1": ((2, 1, 4, 1), "kernel", "ring", "perft_r", False),
    "sharded adapters perft_r 2,1,4,1": ((2, 1, 4, 1), "dense", "ring", "perft_r", True),
    "sharded adapters perft_e 2,2,2,1": ((2, 2, 2, 1), "dense", "ring", "perft_e", True),
}
ADAPTER_RULES = {**DEFAULT_RULES, "adapters": "expert"}
PERFTS = {"perft_r": PerftConfig(variant="perft_r", num_adapters=4, top_k=2),
          "perft_e": PerftConfig(variant="perft_e")}
PERFT = PERFTS["perft_r"]
OPTIM = OptimConfig(learning_rate=1e-2, warmup_steps=0)
STEPS = 2
COMPILES = [0]


def _count_compiles(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def make_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (8, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    mask[5, :6] = 0
    return {"input_ids": ids, "labels": np.where(mask == 1, ids, -100).astype(np.int32), "attention_mask": mask}


@nnx.jit
def forward(model, ids, mask):
    out = model(ids, attention_mask=mask)
    return out.logits, out.dropped_tokens


def _flat_adapters(model) -> dict:
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, AdapterParam))}


def run(ckpt, mesh=None, backend="dense", dispatch="ring", perft=PERFT, shard_adapters=False):
    """Forward + STEPS train steps; returns host copies of everything compared, plus placement facts."""
    rules = ADAPTER_RULES if shard_adapters else None
    if dispatch == "a2a":  # the exchange emulated: XLA:CPU has no ragged-all-to-all
        dispatch = functools.partial(ragged_all_to_all, emulate=True)
    model = load_model(ckpt, moe_backend=backend, capacity_factor=4.0 if backend == "capacity" else None,
                       mesh=mesh, expert_dispatch=dispatch, rules=rules, shard_adapters=shard_adapters, perft=perft,
                       seed=1)
    # Adapters of a visible size (the second matrices start near zero), so that they matter in every result.
    scale = jax.jit(lambda t: jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(7), a.shape), t))
    nnx.update(model, scale(nnx.state(model, AdapterParam)))
    place_like_base(model, nnx.state(model, AdapterParam))  # back where attaching placed them
    if mesh is None:  # commit every array, so the reference compiles its step once too
        nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
        place = jax.numpy.asarray
    else:
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp", "expert")))
        place = lambda x: jax.device_put(x, batch_sharding)  # noqa: E731
    batch = {k: place(v) for k, v in make_batch().items()}
    logits, dropped = forward(model, batch["input_ids"], batch["attention_mask"])
    # One row of 7 tokens, replicated: 7 does not split over the token shards, so the ring pads.
    odd_logits = np.asarray(forward(model, batch["input_ids"][:1, :7], batch["attention_mask"][:1, :7])[0])
    optimizer = make_optimizer(model, OPTIM)
    adapter_shardings = {k: v.sharding for k, v in _flat_adapters(model).items()}
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        metrics = [train_step(model, optimizer, batch, model.config, perft)]
        compiles_before = COMPILES[0]
        metrics += [train_step(model, optimizer, batch, model.config, perft) for _ in range(STEPS - 1)]
        later_step_compiles = COMPILES[0] - compiles_before
    adapters = _flat_adapters(model)
    moments = [v.get_value() for p, v in nnx.to_flat_state(nnx.state(optimizer)) if "mu" in p]
    experts = model.layers[0].moe.experts
    return {
        "logits": np.asarray(logits), "dropped": int(np.sum(dropped)), "odd_logits": odd_logits,
        "loss": [float(m["total"]) for m in metrics], "grad_norm": [float(m["grad_norm"]) for m in metrics],
        "later_step_compiles": later_step_compiles,
        "adapters": {k: np.asarray(v) for k, v in adapters.items()},
        "gate_up_shards": sorted(set(shard_shapes(experts.gate_up[...]))),
        "down_shards": sorted(set(shard_shapes(experts.down[...]))),
        "gate_up_spec": str(experts.gate_up[...].sharding.spec if mesh is not None else None),
        "q_proj_spec": str(model.layers[0].attn.q_proj.kernel[...].sharding.spec if mesh is not None else None),
        "adapter_specs": sorted({str(v.sharding.spec) for v in adapters.values()} if mesh is not None else []),
        "adapter_shards": {k: sorted(set(shard_shapes(v))) for k, v in adapters.items() if k.startswith("layers.0.")},
        "adapters_kept_placement": all(adapters[k].sharding == s for k, s in adapter_shardings.items()),
        "moment_specs": sorted({str(m.sharding.spec) for m in moments} if mesh is not None else []),
        "moment_shards": sorted({tuple(map(tuple, sorted(set(shard_shapes(m))))) for m in moments}),
        "logits_spec": str(logits.sharding.spec if mesh is not None else None),
        "parallel": getattr(experts.dispatch, "__name__", type(experts.dispatch).__name__),
        "backend": model.config.moe_backend,
    }


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def compare(result, ref) -> dict:
    return {
        "logits": rel(result["logits"], ref["logits"]),
        "loss": max(rel(a, b) for a, b in zip(result["loss"], ref["loss"])),
        "loss_step1": rel(result["loss"][0], ref["loss"][0]),
        "grad_norm": max(rel(a, b) for a, b in zip(result["grad_norm"], ref["grad_norm"])),
        "adapters": max(rel(result["adapters"][k], ref["adapters"][k]) for k in ref["adapters"]),
        "dropped": result["dropped"],
        "odd_logits": rel(result["odd_logits"], ref["odd_logits"]),
        "backend": result["backend"],
        "later_step_compiles": result["later_step_compiles"],
        **{k: result[k] for k in ("gate_up_shards", "down_shards", "gate_up_spec", "q_proj_spec", "adapter_specs",
                                   "adapter_shards", "adapters_kept_placement", "moment_specs", "moment_shards",
                                   "logits_spec", "parallel")},
    }


def a2a_checks() -> dict:
    """The ragged all-to-all exchange: the emulation against the op's documented example (jax.lax.ragged_all_to_all
    docstring, axis of size 2), the one-line refusal on CPU, and the real op lowered for GPU and TPU (forward and
    gradient of one MoE layer; compiling and running it needs those devices)."""
    mesh2 = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    operand = jnp.array([1, 2, 2, 3, 4, 0], jnp.float32)[:, None]  # [1, 2, 2] on device 0, [3, 4, 0] on device 1
    offsets_sizes = [jnp.array(a, jnp.int32) for a in ([0, 1, 0, 1], [1, 2, 1, 1], [0, 0, 1, 2], [1, 1, 2, 1])]

    def exchange(op, *args):
        return emulated_ragged_all_to_all(op, jnp.zeros((4, 1)), *args, axis_name="x")

    example = jax.jit(jax.shard_map(exchange, mesh=mesh2, in_specs=(jax.P("x"),) * 5, out_specs=jax.P("x")))(
        operand, *offsets_sizes)
    mesh = build_mesh(MeshConfig(2, 1, 4, 1))
    try:
        ragged_all_to_all(LogicalSharding.create(mesh), tiny_model_config(num_experts=8, moe_backend="ragged"))
        refused = ""
    except UserError as e:
        refused = str(e)
    real = RaggedAllToAll(mesh, ("data", "expert"), DISPATCH["ragged"])
    keys = jax.random.split(jax.random.key(0), 4)
    x, logits = jax.random.normal(keys[0], (16, 32)), jax.random.normal(keys[1], (16, 8))
    weights, indices = jax.lax.top_k(jax.nn.softmax(logits), 2)
    gate_up, down = jax.random.normal(keys[2], (8, 32, 32)), jax.random.normal(keys[3], (8, 16, 32))
    loss = lambda x: jnp.sum(real(x, weights, indices.astype(jnp.int32), gate_up, down, capacity_factor=1.0)[0] ** 2)  # noqa: E731
    lowered = {}
    for platform in ("cuda", "tpu"):
        exported = jax.export.export(jax.jit(jax.value_and_grad(loss)), platforms=[platform], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")])(x)
        lowered[platform] = exported.mlir_module().count("@ragged_all_to_all(")
    return {"example": np.asarray(example).ravel().tolist(), "cpu_error": refused, "lowered": lowered}


def main(ckpt: str, out: str) -> None:
    """The issue's four meshes, gspmd and the ragged all-to-all checks, then `CASES`: one process, one
    single-device reference."""
    assert jax.device_count() == 8, jax.devices()
    ref = run(ckpt)
    report = {"reference": {"loss": ref["loss"], "grad_norm": ref["grad_norm"]}, "meshes": {}, "cases": {}}
    timings = {}
    for shape, backend in MESHES.items():
        start = time.perf_counter()
        mesh = build_mesh(MeshConfig(*shape))
        report["meshes"][",".join(map(str, shape))] = compare(run(ckpt, mesh, backend), ref)
        timings[str(shape)] = time.perf_counter() - start
    start = time.perf_counter()
    report["gspmd"] = compare(run(ckpt, build_mesh(MeshConfig(2, 2, 2, 1)), dispatch="gspmd"), ref)
    timings["gspmd"] = time.perf_counter() - start
    report["a2a_checks"] = a2a_checks()
    refs = {"perft_r": ref}
    for name, (shape, backend, dispatch, variant, shard_adapters) in CASES.items():
        start = time.perf_counter()
        if variant not in refs:
            refs[variant] = run(ckpt, perft=PERFTS[variant])
        got = run(ckpt, build_mesh(MeshConfig(*shape)), backend, dispatch, PERFTS[variant], shard_adapters)
        report["cases"][name] = compare(got, refs[variant])
        timings[name] = time.perf_counter() - start
    report["timings"] = timings
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
