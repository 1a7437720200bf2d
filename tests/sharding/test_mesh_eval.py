"""`train.py mode=eval` on a mesh of 8 simulated CPU devices writes the same generations as on one device.

The eval pipeline restores the base onto the mesh, loads the adapters beside it (replicated, or split with
`mesh.shard_adapters`), splits the prompts over the batch axes and decodes with the KV cache; every process gets
all results and process 0 writes them. Each run is a fresh interpreter (XLA_FLAGS must be set before jax starts).
The adapters are random and of a visible size, so that they change the generations.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
import yaml
from flax import nnx

from perft_jax import demo, load_model
from perft_jax.config_parsing import to_dict
from perft_jax.perft.adapter_files import save_adapters
from perft_jax.perft.adapters import AdapterParam

REPO = pathlib.Path(__file__).resolve().parents[2]
# name -> (simulated devices, overrides); "single" is the reference.
RUNS = {
    "single": (1, []),
    "ring 2,1,4,1": (8, ["mesh.data=2", "mesh.expert=4"]),
    "tensor 1,1,2,4": (8, ["mesh.data=1", "mesh.expert=2", "mesh.tensor=4"]),
    "gspmd sharded adapters 2,2,2,1": (8, ["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2",
                                            "mesh.expert_dispatch=gspmd", "mesh.shard_adapters=true",
                                            "mesh.logical_axis_rules.adapters=expert"]),
    "single beams": (1, ["eval.num_beams=2"]),
    "ring 2,1,4,1 beams": (8, ["mesh.data=2", "mesh.expert=4", "eval.num_beams=2"]),
    "single base only": (1, ["eval.adapters=''"]),
}


@pytest.fixture(scope="module")
def evals(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("mesh_eval")
    paths = demo.prepare_assets(root)
    cfg = demo.demo_config(root, paths, [])
    model = load_model(paths["base"], perft=cfg.perft, seed=1)
    noise = jax.jit(lambda t: jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), t))
    nnx.update(model, noise(nnx.state(model, AdapterParam)))
    save_adapters(model, root / "adapters")
    data = to_dict(demo.demo_config(root, paths, [
        "mode=eval", f"eval.adapters={root / 'adapters'}", "eval.max_examples=12", "eval.batch_size=8",
        "eval.max_new_tokens=6"]))
    config = root / "eval.yaml"
    config.write_text(yaml.safe_dump(data))
    procs = {}
    for name, (devices, overrides) in RUNS.items():
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        out_dir = root / name.replace(" ", "_").replace(",", "")
        procs[name] = (out_dir, subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), "--config", str(config), f"train.output_dir={out_dir}",
             *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for name, (out_dir, proc) in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, out[-2000:], err[-4000:])
        results[name] = json.loads((out_dir / "eval.json").read_text())
    return results


@pytest.mark.parametrize("name", [n for n in RUNS if not n.startswith("single")])
def test_generations_on_a_mesh_equal_one_device(evals, name):
    reference = evals["single beams" if name.endswith("beams") else "single"]
    got = evals[name]
    assert got["generations"] == reference["generations"]
    assert got["accuracy"] == reference["accuracy"]
    assert got["n"] == {"synthetic_compare": 12}


def test_the_adapters_change_the_generations(evals):
    # The comparisons above are not vacuous: without the adapters the base generates something else.
    assert evals["single"]["generations"] != evals["single base only"]["generations"]
