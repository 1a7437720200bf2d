"""`train.py` across processes: 2 processes x 2 CPU devices (jax.distributed over localhost, gloo collectives)
train exactly like 1 process x 4 devices, save one run checkpoint from both processes, and resume from it.

The same config runs everywhere (data x expert = 2 x 2 mesh, experts split in pairs); only the device count per
process and `mesh.distributed.*` differ. Each process is a fresh interpreter: XLA_FLAGS must be set before jax
starts, and this pytest process already runs jax on one device.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from perft_jax import demo
from perft_jax.config_parsing import to_dict

REPO = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> pathlib.Path:
    """A small PERFT-R run on the demo's tiny OLMoE base: 48 rows, global batch 8, constant learning rate (so a
    run resumed with a larger train.max_steps follows the same schedule as one that ran straight through)."""
    root = tmp_path_factory.mktemp("multihost")
    paths = demo.prepare_assets(root)
    rows = json.loads(paths["train"].read_text())[:48]
    small = root / "small.json"
    small.write_text(json.dumps(rows))
    cfg = demo.demo_config(root, paths, [
        f"data.train_files=[{small}]", "data.batch_size=8", "data.val_set_size=8", "train.max_steps=3",
        "train.log_every_steps=1", "train.eval_every_steps=3", "train.progress_bar=false", "train.tensorboard=false",
        "checkpoint.every_steps=3", "optim.schedule=constant", "optim.warmup_steps=0", "mesh.data=2", "mesh.expert=2"])
    data = to_dict(cfg)
    data.pop("eval")
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _launch(config: pathlib.Path, run_dir: pathlib.Path, devices: int, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(config),
                             f"train.output_dir={run_dir}", *overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, (out[-2000:], err[-4000:])
        outs.append(out)
    return outs


def _two_processes(config: pathlib.Path, run_dir: pathlib.Path, *overrides: str) -> list[subprocess.Popen]:
    address = f"127.0.0.1:{_free_port()}"
    return [_launch(config, run_dir, 2, f"mesh.distributed.coordinator_address={address}",
                    "mesh.distributed.num_processes=2", f"mesh.distributed.process_id={pid}",
                    "mesh.distributed.initialization_timeout=120", *overrides) for pid in (0, 1)]


def _losses(run_dir: pathlib.Path, split: str = "train") -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["total" if split == "train" else "lm"] for r in lines if r["split"] == split}


@pytest.fixture(scope="module")
def runs(config_file, tmp_path_factory):
    """1 x 4 devices (4 steps) and 2 x 2 devices (3 steps), side by side; then the 2 x 2 run resumes to step 4."""
    root = tmp_path_factory.mktemp("runs")
    single, multi = root / "single", root / "multi"
    procs = [_launch(config_file, single, 4, "train.max_steps=4")] + _two_processes(config_file, multi)
    outs = _finish(procs)
    first = {"single": _losses(single), "multi": _losses(multi), "multi_val": _losses(multi, "val"),
             "single_val": _losses(single, "val"), "outs": outs,
             "adapters": load_file(str(multi / "adapters" / "adapter_model.safetensors"))}
    resumed = _finish(_two_processes(config_file, multi, "train.max_steps=4"))
    return {**first, "resumed": _losses(multi), "resumed_outs": resumed, "multi_dir": multi}


def test_two_processes_train_like_one(runs):
    single, multi = runs["single"], runs["multi"]
    assert sorted(multi) == [1, 2, 3]
    for step in (1, 2, 3):
        assert abs(multi[step] - single[step]) <= 1e-6 * abs(single[step]), (step, multi[step], single[step])
    assert abs(runs["multi_val"][3] - runs["single_val"][3]) <= 1e-6 * runs["single_val"][3]
    print("max relative loss difference, 2x2 vs 1x4:",
          max(abs(multi[s] - single[s]) / abs(single[s]) for s in (1, 2, 3)))


def test_only_process_0_writes(runs):
    report, silent = runs["outs"][1], runs["outs"][2]  # outs[0] is the single-process run
    assert "trainable" in report.lower() and "trainable" not in silent.lower()
    assert runs["adapters"]  # written once, by process 0, into the shared run directory


def test_run_checkpoint_saved_and_restored_by_both_processes(runs):
    assert "resumed from step 3" in runs["resumed_outs"][0]
    assert (runs["multi_dir"] / "checkpoints" / "4").is_dir()
    step4 = runs["resumed"][4]
    np.testing.assert_allclose(step4, runs["single"][4], rtol=1e-6)
