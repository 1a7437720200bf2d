"""Run by test_export.py in a fresh interpreter with 8 simulated CPU devices.

    python export_worker.py OUT_JSON

Builds a tiny PERFT-R model on a (data 2, expert 4) mesh of CPU devices for each expert dispatch (`ring`, and the
real `ragged_a2a`: its op exists only on GPU/TPU, so it is built directly instead of through the factory, which
refuses CPU meshes), and exports its train and validation steps with `jax.export` for cuda and tpu. Records per
case whether it exported and which collectives and kernels the module holds; the assertions are in the test.
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # run as a script: the repository (benchmarks) and tests/

from tiny_models import hf_config  # noqa: E402

from benchmarks.flops import export, pretend_cudnn  # noqa: E402
from perft_jax.build import build_model  # noqa: E402
from perft_jax.config import ModelSection  # noqa: E402
from perft_jax.models.moe import ep  # noqa: E402
from perft_jax.optim import OptimConfig  # noqa: E402
from perft_jax.perft.config import PerftConfig  # noqa: E402
from perft_jax.sharding import LogicalSharding, MeshConfig, build_mesh  # noqa: E402
from perft_jax.train.optim import make_optimizer  # noqa: E402
from perft_jax.train.step import eval_step_fn, split_model, train_step_fn  # noqa: E402

PERFT = PerftConfig(variant="perft_r", num_adapters=4, top_k=2)
MARKS = ("ragged_all_to_all", "all_gather", "reduce_scatter", "all_to_all", "tpu_custom_call", "mosaic_gpu",
         "chlo.ragged_dot", "__cudnn$fmha")


def real_ragged_a2a(sharding: LogicalSharding, cfg):
    """`ep.ragged_all_to_all` without its CPU refusal: the real exchange, to be lowered for GPU/TPU only."""
    token_axes, _ = ep._dispatch_axes(sharding, cfg.num_experts, "ragged_a2a")
    return ep.RaggedAllToAll(sharding.mesh, token_axes, *ep.local_backend(sharding, cfg))


# The kernels and XLA's ragged_dot as the experts' local backend. (`auto` on a mesh resolves by the mesh's platform,
# models/moe/ep.py `local_backend`: on these CPU devices that is `grouped`, so the accelerator program is asked
# for by name.)
BACKENDS = ("kernel", "ragged")
DISPATCHES = {"ring": "ring", "ragged_a2a": real_ragged_a2a}


def cases(hf_path: pathlib.Path, mesh, backend: str) -> dict:
    sharding = LogicalSharding.create(mesh)
    # XLA attention: cuDNN's attention on a mesh is partitioned by `custom_partitioning`, whose host callbacks
    # jax.export cannot serialise ("serialization of host_callbacks is not yet implemented"); a jitted run on a
    # GPU mesh is not affected. The one-device exports in test_export.py cover the attention kernels.
    section = ModelSection(hf_config=str(hf_path), dtype="bfloat16", moe_backend=backend, attention_impl="xla")
    batch = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp", "expert")))
    # The model's (tiny) sharded arrays themselves are exported on; the tokens likewise.
    ones = jax.device_put(jnp.ones((8, 128), jnp.int32), batch)
    tokens = {k: ones for k in ("input_ids", "labels", "attention_mask")}
    report = {}
    for name, dispatch in DISPATCHES.items():
        model = build_model(section, PERFT, sharding, expert_dispatch=dispatch)
        cfg = model.config
        optimizer = make_optimizer(model, OptimConfig())
        graphdef, trainable, frozen = split_model(model)
        opt_graphdef, opt_state = nnx.split(optimizer)
        eval_graphdef, eval_state = nnx.split(nnx.view(model, only=nnx.Dropout, deterministic=True,
                                                       raise_if_not_found=False))
        steps = {
            "train": (lambda t, f, o, b: train_step_fn(graphdef, opt_graphdef, t, f, o, b, cfg, PERFT),
                      (trainable, frozen, opt_state, tokens)),
            "eval": (lambda s, b: eval_step_fn(eval_graphdef, s, b, cfg, PERFT), (eval_state, tokens)),
        }
        for step, (fn, args) in steps.items():
            for platform in ("cuda", "tpu"):
                start = time.perf_counter()
                key = f"{backend} {name} {step} {platform}"
                try:
                    with jax.set_mesh(mesh), pretend_cudnn():
                        exported = export(fn, platform, *args)
                    text = exported.mlir_module()
                    report[key] = {"ok": True, "devices": exported.nr_devices,
                                   "marks": {m: text.count(m) for m in MARKS}}
                except Exception as e:  # recorded, asserted in the test
                    report[key] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:600]}"}
                report[key]["seconds"] = time.perf_counter() - start
    return report


def main(out: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    hf_path = pathlib.Path(out).with_name("config.json")
    # head_dim 128 (hidden 512 over 4 heads), so that the attention kernels could apply; 8 experts over 4 shards.
    hf_config("olmoe", hidden_size=512, intermediate_size=128, num_experts=8).to_json_file(str(hf_path))
    mesh = build_mesh(MeshConfig(2, 1, 4, 1))
    with open(out, "w") as f:
        json.dump({k: v for backend in BACKENDS for k, v in cases(hf_path, mesh, backend).items()}, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
