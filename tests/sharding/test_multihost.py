"""`train.py` across processes: 2 processes x 2 CPU devices (jax.distributed over localhost, gloo collectives)
train exactly like 1 process x 4 devices, save one run checkpoint from both processes, and resume from it.

The same config runs everywhere (data x expert = 2 x 2 mesh, experts split in pairs); only the device count per
process and `mesh.distributed.*` differ. Each process is a fresh interpreter: XLA_FLAGS must be set before jax
starts, and this pytest process already runs jax on one device.

Preemption: a SIGTERM that reaches one process only stops both after the same step (the processes agree on the
signal at every step boundary), both save that step into the shared run checkpoint and exit 0, and the resumed
run ends exactly where an uninterrupted one does. That run also splits the adapters over `expert`
(`mesh.shard_adapters`), so sharded adapters are saved, restored and exported across processes too.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

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


SHARDED_ADAPTERS = ("mesh.shard_adapters=true", "mesh.logical_axis_rules.adapters=expert")


def _wait_for_step(run_dir: pathlib.Path, step: int, procs: list[subprocess.Popen]) -> None:
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and any(s >= step for s in _losses(run_dir)):
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a process ended early: {[p.communicate() for p in procs]}")
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {TIMEOUT}s")


@pytest.fixture(scope="module")
def preempted(config_file, tmp_path_factory):
    """2 x 2 devices, SIGTERM to process 1 only after step 2; then resumed to 2 steps past the stop; and the same
    run uninterrupted on 1 x 4 devices for comparison."""
    root = tmp_path_factory.mktemp("preempt")
    run_dir = root / "multi"
    common = ("train.max_steps=500", "checkpoint.every_steps=1000", "train.eval_every_steps=0", *SHARDED_ADAPTERS)
    procs = _two_processes(config_file, run_dir, *common)
    _wait_for_step(run_dir, 2, procs)
    procs[1].send_signal(signal.SIGTERM)
    outs = _finish(procs)
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    stop = saved[-1]
    resumed = _finish(_two_processes(config_file, run_dir, *common[1:], f"train.max_steps={stop + 2}"))
    single = root / "single"
    _finish([_launch(config_file, single, 4, *common[1:], f"train.max_steps={stop + 2}")])
    return {"run_dir": run_dir, "outs": outs, "saved": saved, "stop": stop, "resumed_outs": resumed,
            "losses": _losses(run_dir),
            "single": _losses(single), "adapters": load_file(str(run_dir / "adapters" / "adapter_model.safetensors")),
            "single_adapters": load_file(str(single / "adapters" / "adapter_model.safetensors"))}


def test_sigterm_to_one_process_stops_both_at_the_same_step(preempted):
    stop = preempted["stop"]
    assert preempted["saved"] == [stop] and 2 <= stop < 500  # one checkpoint, written by both processes together
    assert f"stopped by signal at step {stop}" in preempted["outs"][0]  # process 0 was not signalled itself
    assert "stopped by signal" not in preempted["outs"][1]  # only process 0 prints
    assert f"resumed from step {stop}" in preempted["resumed_outs"][0]


def test_resumed_run_equals_an_uninterrupted_one(preempted):
    stop, losses, single = preempted["stop"], preempted["losses"], preempted["single"]
    assert sorted(losses) == list(range(1, stop + 3))
    for step in range(1, stop + 3):
        assert abs(losses[step] - single[step]) <= 1e-6 * abs(single[step]), (step, losses[step], single[step])
    assert sorted(preempted["adapters"]) == sorted(preempted["single_adapters"])
    for key, value in preempted["single_adapters"].items():
        # Relative to the largest entry, as test_mesh_parity measures: gloo across processes sums in another order
        # than one process does, and AdamW magnifies that on entries whose gradients are near zero.
        got = preempted["adapters"][key]
        assert np.max(np.abs(got - value)) <= 1e-5 * np.max(np.abs(value)), key


def test_eval_across_processes_equals_one_device(preempted, config_file, tmp_path):
    """`mode=eval` on 2 processes x 2 devices (sharded adapters of the preempted run): the same generations as one
    device; process 0 alone prints the accuracies and writes eval.json."""
    evaluation = ("mode=eval", "eval.benchmarks=[synthetic_compare]",
                  f"eval.data_dir={config_file.parent / 'data' / 'eval'}",
                  f"eval.adapters={preempted['run_dir'] / 'adapters'}", "eval.max_examples=8", "eval.batch_size=8",
                  "eval.max_new_tokens=4", *SHARDED_ADAPTERS)
    single = _finish([_launch(config_file, tmp_path / "single", 1, *evaluation, "mesh.data=1", "mesh.expert=1")])
    multi = _finish(_two_processes(config_file, tmp_path / "multi", *evaluation))
    want = json.loads((tmp_path / "single" / "eval.json").read_text())
    got = json.loads((tmp_path / "multi" / "eval.json").read_text())
    assert got["generations"] == want["generations"] and got["accuracy"] == want["accuracy"]
    assert "average" in multi[0] and "average" not in multi[1] and "average" in single[0]
