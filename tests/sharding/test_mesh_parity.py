"""Expert parallelism and FSDP on 8 simulated CPU devices equal the single-device model.

`mesh_worker.py` runs in a fresh interpreter (XLA_FLAGS must be set before jax starts; this pytest process
already runs jax on one device) and reports, per (data, fsdp, expert, tensor) mesh, the largest relative
difference max|sharded - single| / max|single| of the forward logits, of two PERFT-R training steps' losses and
gradient norms, and of the updated adapters, plus where the weights live. The base is a real converted checkpoint,
restored straight onto each mesh by `load_model(mesh=...)`.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from perft_jax import ModelConfig, export_hf, init_model
from perft_jax.convert.hf_to_jax import convert_hf_to_jax

WORKER = pathlib.Path(__file__).with_name("mesh_worker.py")
TOL = 1e-5  # float32; every difference measured is below 1.3e-6
MESHES = ["8,1,1,1", "2,1,4,1", "1,2,4,1", "2,2,2,1"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mesh")
    cfg = ModelConfig(model_type="olmoe", vocab_size=64, hidden_size=32, intermediate_size=16, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=False, qk_norm=True)
    export_hf(init_model(cfg, seed=3), root / "hf")
    convert_hf_to_jax(root / "hf", root / "ckpt", show_progress=False)
    out = root / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(WORKER), str(root / "ckpt"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_forward_and_training_step_equal_single_device(report, mesh):
    got = report["meshes"][mesh]
    assert got["logits"] <= TOL, got
    assert got["loss"] <= TOL and got["grad_norm"] <= TOL, got
    assert got["adapters"] <= TOL, got
    assert got["parallel"] == "RingOfExperts" and got["dropped"] == 0
    assert got["later_step_compiles"] == 0  # shardings are stable: the second step reuses the first's program
    assert got["odd_logits"] <= TOL  # 7 replicated tokens: padded to the 8 token shards, padding never dispatched


def test_the_ring_ran_every_backend(report):
    # The dense reference is matched by each backend on the local experts (nothing dropped at capacity factor 4).
    assert sorted(r["backend"] for r in report["meshes"].values()) == ["capacity", "dense", "dense", "ragged"]


@pytest.mark.parametrize("mesh", MESHES)
def test_each_device_holds_its_share_of_the_experts(report, mesh):
    data, fsdp, expert, _ = map(int, mesh.split(","))
    got = report["meshes"][mesh]
    # E = 8 experts over `expert`, D = 32 over `fsdp` (the FSDP rule embed_moe -> fsdp); I = 16, gate_up is [E, D, 2I].
    assert got["gate_up_shards"] == [[8 // expert, 32 // fsdp, 32]]
    assert got["down_shards"] == [[8 // expert, 16, 32 // fsdp]]
    assert got["adapter_specs"] == ["P()"]  # adapters (and their AdamW moments) replicated
    assert got["q_proj_spec"] == ("P('fsdp',)" if fsdp > 1 else "P()")  # dense base weights FSDP-sharded


def test_gspmd_dispatch_also_matches(report):
    got = report["gspmd"]
    assert got["parallel"] == "NoneType"
    assert max(got["logits"], got["loss"], got["grad_norm"], got["adapters"]) <= TOL, got
    assert got["adapter_specs"] == ["P()"] and got["later_step_compiles"] == 0

