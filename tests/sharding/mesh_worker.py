"""Run by test_mesh_parity.py in a fresh interpreter with 8 simulated CPU devices.

    python mesh_worker.py CKPT_DIR OUT_JSON

For every mesh it restores the converted base straight onto the mesh (`load_model(mesh=...)`), attaches
PERFT-R adapters, and records against the single-device result: forward logits, two training steps (loss,
gradient norm, updated adapters), where the weights live, each device's expert-shard shape, and whether the
second step compiled again.
The assertions are in the test; this script only measures.
"""
from __future__ import annotations

import os

# Before jax is imported: the pytest process already initialised jax with one device.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")

from perft_jax import load_model  # noqa: E402
from perft_jax.perft.adapters import AdapterParam  # noqa: E402
from perft_jax.perft.config import PerftConfig  # noqa: E402
from perft_jax.sharding import MeshConfig, build_mesh, shard_shapes  # noqa: E402
from perft_jax.train.optim import OptimConfig, make_optimizer  # noqa: E402
from perft_jax.train.step import train_step  # noqa: E402

# Mesh -> the MoE backend the ring runs on each device's experts. Every result is compared with the dense
# single-device reference: at capacity factor 4 nothing is dropped, and then all backends compute the same.
MESHES = {(8, 1, 1, 1): "dense", (2, 1, 4, 1): "ragged", (1, 2, 4, 1): "capacity", (2, 2, 2, 1): "dense"}
PERFT = PerftConfig(variant="perft_r", num_adapters=4, top_k=2)
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


def run(ckpt, mesh=None, backend="dense", dispatch="ring"):
    """Forward + STEPS train steps; returns host copies of everything compared, plus placement facts."""
    model = load_model(ckpt, moe_backend=backend, capacity_factor=4.0 if backend == "capacity" else None,
                       mesh=mesh, expert_dispatch=dispatch, perft=PERFT, seed=1)
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
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        metrics = [train_step(model, optimizer, batch, model.config, PERFT)]
        compiles_before = COMPILES[0]
        metrics += [train_step(model, optimizer, batch, model.config, PERFT) for _ in range(STEPS - 1)]
        later_step_compiles = COMPILES[0] - compiles_before
    experts = model.layers[0].moe.experts
    return {
        "logits": np.asarray(logits), "dropped": int(np.sum(dropped)), "odd_logits": odd_logits,
        "loss": [float(m["total"]) for m in metrics], "grad_norm": [float(m["grad_norm"]) for m in metrics],
        "later_step_compiles": later_step_compiles,
        "adapters": {".".join(map(str, p)): np.asarray(v.get_value())
                     for p, v in nnx.to_flat_state(nnx.state(model, AdapterParam))},
        "gate_up_shards": sorted(set(shard_shapes(experts.gate_up[...]))),
        "down_shards": sorted(set(shard_shapes(experts.down[...]))),
        "gate_up_spec": str(experts.gate_up[...].sharding.spec if mesh is not None else None),
        "q_proj_spec": str(model.layers[0].attn.q_proj.kernel[...].sharding.spec if mesh is not None else None),
        "adapter_specs": sorted({str(v.get_value().sharding.spec) for _, v in
                                 nnx.to_flat_state(nnx.state(model, AdapterParam))} if mesh is not None else []),
        "logits_spec": str(logits.sharding.spec if mesh is not None else None),
        "parallel": type(experts.parallel).__name__,
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
        **{k: result[k] for k in ("gate_up_shards", "down_shards", "gate_up_spec", "q_proj_spec",
                                   "adapter_specs", "logits_spec", "parallel")},
    }


def main(ckpt: str, out: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    ref = run(ckpt)
    report = {"reference": {"loss": ref["loss"], "grad_norm": ref["grad_norm"]}, "meshes": {}}
    timings = {}
    for shape, backend in MESHES.items():
        start = time.perf_counter()
        mesh = build_mesh(MeshConfig(*shape))
        report["meshes"][",".join(map(str, shape))] = compare(run(ckpt, mesh, backend), ref)
        timings[str(shape)] = time.perf_counter() - start
    start = time.perf_counter()
    report["gspmd"] = compare(run(ckpt, build_mesh(MeshConfig(2, 2, 2, 1)), dispatch="gspmd"), ref)
    timings["gspmd"] = time.perf_counter() - start
    report["timings"] = timings
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
