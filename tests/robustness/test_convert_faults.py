"""The converter and the converted base under faults (issue 15): NaN / inf weights, a converter killed mid-run,
stale temporary siblings, read-only and full disks, a truncated parameter file. Each case asserts the exit code or
exception, the single line, the culprit it names, and that nothing is left behind."""
from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_models import tiny_model_config

from perft_jax import UserError, export_hf, init_model, load_model
from perft_jax.checkpoint.base import MANIFEST
from perft_jax.convert import hf_to_jax
from perft_jax.convert.hf_to_jax import convert_hf_to_jax
from perft_jax.errors import disk_errors
from perft_jax.io import STALE_AFTER_S, atomic_directory, remove_stale_siblings
from tests.robustness.faults import REPO, error_line, run_cli, siblings, small_disk

Q_PROJ = "model.layers.1.self_attn.q_proj.weight"  # [32, 32]: 1024 values


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny OLMoE-shaped HF directory (per-expert layout), written by our exporter: no torch needed."""
    out = tmp_path_factory.mktemp("hf") / "hf"
    export_hf(init_model(tiny_model_config(), seed=0), out)
    return out


@pytest.fixture(scope="module")
def base(hf_dir, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("base") / "base"
    convert_hf_to_jax(hf_dir, out, show_progress=False)
    return out


def _edited(hf_dir: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    """A copy of `hf_dir` whose tensors went through `edit(dict) -> dict`."""
    shutil.copytree(hf_dir, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    save_file(edit(tensors), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _poison(key: str, *values: float):
    def edit(tensors):
        flat = tensors[key].reshape(-1)
        flat[:len(values)] = values
        return tensors
    return edit


def _fused(tensors: dict) -> dict:
    """The per-expert layout rewritten as transformers 5's fused one (gate_up_proj [E, 2I, D], down_proj [E, D, I])."""
    out = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    layers = sorted({int(k.split(".")[2]) for k in tensors if ".mlp.experts." in k})
    for layer in layers:
        prefix = f"model.layers.{layer}.mlp.experts"
        count = len({k.split(".")[5] for k in tensors if k.startswith(prefix + ".")})
        gate_up = [(tensors[f"{prefix}.{x}.gate_proj.weight"], tensors[f"{prefix}.{x}.up_proj.weight"])
                   for x in range(count)]
        out[f"{prefix}.gate_up_proj"] = np.stack([np.concatenate(pair) for pair in gate_up])
        out[f"{prefix}.down_proj"] = np.stack([tensors[f"{prefix}.{x}.down_proj.weight"] for x in range(count)])
    return out


def test_nan_and_inf_are_refused_naming_the_tensor(hf_dir, tmp_path):
    src = _edited(hf_dir, tmp_path / "hf", _poison(Q_PROJ, np.nan, np.nan, np.inf))
    out = tmp_path / "out"
    line = error_line(run_cli("convert_weights.py", "--hf-dir", src, "--out", out, "--no-progress"))
    assert line == (f"error: {src / 'model.safetensors'}: tensor {Q_PROJ} holds 2 NaN, 1 inf of 1024 values; "
                    "refusing to convert non-finite weights (pass --allow-nonfinite to convert them as they are)")
    assert siblings(out) == []


@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy's own warnings would be more lines on stderr
def test_allow_nonfinite_converts_and_reports_the_counts(hf_dir, tmp_path, capfd):
    src = _edited(hf_dir, tmp_path / "hf", _poison(Q_PROJ, np.nan, -np.inf))
    convert_hf_to_jax(src, tmp_path / "out", show_progress=False, allow_nonfinite=True)
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines == [f"warning: {src}: converted 2 non-finite values in 1 tensors as they are: {Q_PROJ} (1 NaN, 1 inf)"]
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["source"]["nonfinite"] == {Q_PROJ: {"nan": 1, "inf": 1, "overflow": 0}}
    q = np.asarray(load_model(tmp_path / "out").layers[1].attn.q_proj.kernel[...])
    assert np.isnan(q).sum() == 1 and np.isinf(q).sum() == 1  # converted as they are


@pytest.mark.parametrize("allow", [False, True])
def test_nonfinite_in_a_fused_expert_stack_read_block_by_block(hf_dir, tmp_path, monkeypatch, capfd, allow):
    """The stack is read one expert (row block) at a time: a refusal still counts the whole tensor, and allowed
    counts add up over the blocks."""
    key = "model.layers.0.mlp.experts.down_proj"  # [4, 32, 16]

    def edit(tensors):
        fused = _fused(tensors)
        fused[key][0, 0, 0] = fused[key][3, 5, 7] = np.nan
        fused[key][3, 0, 1] = np.inf
        return fused

    src = _edited(hf_dir, tmp_path / "hf", edit)
    monkeypatch.setattr(hf_to_jax, "BLOCK_BYTES", 1)  # one expert per block
    if not allow:
        with pytest.raises(UserError, match=rf"tensor {key} holds 2 NaN, 1 inf of 2048 values; refusing"):
            convert_hf_to_jax(src, tmp_path / "out", show_progress=False)
        assert siblings(tmp_path / "out") == []
        return
    convert_hf_to_jax(src, tmp_path / "out", show_progress=False, allow_nonfinite=True)
    assert f"{key} (2 NaN, 1 inf)" in capfd.readouterr().err
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["source"]["nonfinite"] == {key: {"nan": 2, "inf": 1, "overflow": 0}}


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_float16_overflow_is_refused(hf_dir, tmp_path):
    src = _edited(hf_dir, tmp_path / "hf", _poison(Q_PROJ, 1e6, -7e4))  # finite in float32, beyond float16's 65504
    with pytest.raises(UserError) as err:
        convert_hf_to_jax(src, tmp_path / "out", dtype="float16", show_progress=False)
    assert (f"tensor {Q_PROJ} holds 0 NaN, 0 inf, 2 finite values that overflow to inf in the stored dtype of 1024 "
            "values") in str(err.value)
    assert siblings(tmp_path / "out") == []


def test_a_killed_converter_leaves_its_tmp_dir_and_the_next_run_removes_it(tmp_path):
    hf = tmp_path / "hf"
    export_hf(init_model(tiny_model_config(num_layers=32), seed=0), hf)  # 34 groups: about 1.5 s to convert
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(REPO / "convert_weights.py"), "--hf-dir", str(hf), "--out", str(out),
                             "--no-progress"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list(tmp_path.glob(".out.tmp-*/params/layer_002")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the converter ended before it could be killed"
    proc.send_signal(signal.SIGKILL)  # mid-conversion: no cleanup runs
    proc.wait()
    left = siblings(out)
    assert [n.split("-")[0] for n in left] == [".out.owner", ".out.tmp"], left
    again = run_cli("convert_weights.py", "--hf-dir", hf, "--out", out, "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    tmp = out.with_name(next(n for n in left if n.startswith(".out.tmp")))
    assert again.stderr.strip().splitlines() == [
        f"note: removed the stale temporary directory {tmp} (left by process {proc.pid} on {socket.gethostname()}, "
        "which is no longer running)"]
    assert siblings(out) == ["out"]
    load_model(out)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _sibling(out: pathlib.Path, uid: str, owner: dict | None, age_s: float = 0.0, kind: str = "tmp") -> pathlib.Path:
    path = out.with_name(f".{out.name}.{kind}-{uid}")
    (path / "params").mkdir(parents=True)
    stamped = [path]
    if owner is not None:
        marker = out.with_name(f".{out.name}.owner-{uid}")
        marker.write_text(json.dumps(owner))
        stamped.append(marker)
    for p in stamped:
        os.utime(p, (time.time() - age_s,) * 2)
    return path


@pytest.mark.parametrize("case, owner, age_s, removed", [
    ("running here", {"pid": os.getpid(), "host": socket.gethostname()}, 2 * STALE_AFTER_S, False),
    ("gone from here", "dead", 0.0, True),
    ("another host, recent", {"pid": 1, "host": "elsewhere"}, 60.0, False),
    ("another host, old", {"pid": 1, "host": "elsewhere"}, STALE_AFTER_S + 60, True),
    ("no marker, old", None, STALE_AFTER_S + 60, True),
])
def test_only_provably_stale_siblings_are_removed(tmp_path, capfd, case, owner, age_s, removed):
    out = tmp_path / "out"
    owner = {"pid": _dead_pid(), "host": socket.gethostname()} if owner == "dead" else owner
    tmp = _sibling(out, "abc123", owner, age_s)
    assert remove_stale_siblings(out) == ([tmp] if removed else [])
    err = capfd.readouterr().err.strip().splitlines()
    if not removed:
        assert tmp.is_dir() and err == []
        return
    why = (f"left by process {owner['pid']} on {owner['host']}, which is no longer running" if case == "gone from here"
           else "untouched for over 24 hours")
    assert err == [f"note: removed the stale temporary directory {tmp} ({why})"]
    assert siblings(out) == []  # the marker went with it


def test_killed_between_the_two_renames_gets_the_old_output_back(tmp_path, capfd):
    out = tmp_path / "out"
    owner = {"pid": _dead_pid(), "host": socket.gethostname()}
    old = _sibling(out, "abc123", owner, kind="old")
    (old / "weights").write_text("previous")
    _sibling(out, "abc123", None, kind="tmp")  # the new one, complete but never renamed
    remove_stale_siblings(out)
    assert (out / "weights").read_text() == "previous" and siblings(out) == ["out"]
    assert capfd.readouterr().err.startswith(f"note: restored {out} from {old} ")


def test_an_exception_inside_atomic_directory_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "half").write_text("written")
        raise RuntimeError("interrupted")
    assert siblings(tmp_path / "out") == []


def test_read_only_output_is_one_line(hf_dir, tmp_path):
    with small_disk(tmp_path / "ro", read_only=True) as disk:
        line = error_line(run_cli("convert_weights.py", "--hf-dir", hf_dir, "--out", disk / "ckpt", "--no-progress"))
        assert line == f"error: {disk / 'ckpt'}: read-only file system; choose a location you can write to"
        assert list(disk.iterdir()) == []


def test_full_disk_during_conversion_is_one_line_and_leaves_nothing(hf_dir, tmp_path):
    with small_disk(tmp_path / "small", size="40k") as disk:  # the checkpoint takes about 120 KiB
        line = error_line(run_cli("convert_weights.py", "--hf-dir", hf_dir, "--out", disk / "ckpt", "--no-progress"))
        assert line.startswith(f"error: {disk / 'ckpt'}: no space left on the device (about 90.0 KiB needed, ")
        assert line.endswith(" free of 40.0 KiB); free some space or write elsewhere")
        assert list(disk.iterdir()) == []


def test_permission_denied_for_an_ordinary_user(hf_dir, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores file modes (the read-only disk case covers an unwritable --out as root)")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    line = error_line(run_cli("convert_weights.py", "--hf-dir", hf_dir, "--out", locked / "ckpt", "--no-progress"))
    assert line == f"error: {locked / 'ckpt'}: permission denied; choose a location you can write to"
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("filename, culprit", [
    ("{out}/params/x", "{out}: permission denied; choose a location you can write to"),
    ("{tmp}/.out.tmp-1a2b/config.json", "{out}: permission denied; choose a location you can write to"),
    ("{tmp}/hf/config.json", "{tmp}/hf/config.json: permission denied"),  # reading an input: not --out's fault
])
def test_a_permission_error_names_the_file_it_is_about(tmp_path, filename, culprit):
    out = tmp_path / "out"
    with pytest.raises(UserError) as err, disk_errors(out):
        raise PermissionError(errno.EACCES, "Permission denied", filename.format(out=out, tmp=tmp_path))
    assert str(err.value) == culprit.format(out=out, tmp=tmp_path)


def _truncated(base: pathlib.Path, dst: pathlib.Path, group: str) -> pathlib.Path:
    """A copy of `base` whose data files of parameter group `group` lost their second half."""
    shutil.copytree(base, dst)
    for data in (dst / "params" / group / "ocdbt.process_0" / "d").iterdir():
        os.truncate(data, data.stat().st_size // 2)
    return dst


def _reconvert(hf_dir: pathlib.Path, bad: pathlib.Path) -> str:
    return f"re-convert the checkpoint: python convert_weights.py --hf-dir {hf_dir} --out {bad} --overwrite"


def test_truncated_parameter_file_names_the_group_and_suggests_reconverting(hf_dir, base, tmp_path):
    bad = _truncated(base, tmp_path / "base", "layer_001")
    with pytest.raises(UserError) as err:
        load_model(bad)
    message = str(err.value)
    assert message.startswith(f"{bad}: parameter group layer_001 is damaged (")
    assert message.endswith(f"); {_reconvert(hf_dir, bad)}")
    line = error_line(run_cli("convert_weights.py", "--export", "--ckpt", bad, "--out", tmp_path / "hf_out"))
    assert line == f"error: {message}" and not (tmp_path / "hf_out").exists()


SHARDED_LOAD = """
import sys
from perft_jax import load_model
from perft_jax.errors import run_cli
from perft_jax.sharding import MeshConfig, build_mesh
sys.exit(run_cli(lambda: load_model(sys.argv[1], mesh=build_mesh(MeshConfig(data=1, expert=2)))))
"""


def test_truncated_parameter_file_restored_onto_a_mesh_is_the_same_line(hf_dir, base, tmp_path):
    """Onto a mesh orbax reads the arrays itself; its failure (issue 15: "Encountered error while reading array
    index", and a screen of tracebacks) is the same one line."""
    bad = _truncated(base, tmp_path / "base", "layer_000")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-c", SHARDED_LOAD, str(bad)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    line = error_line(proc)
    assert line.startswith(f"error: {bad}: parameter group layer_000 is damaged (")
    assert line.endswith(f"); {_reconvert(hf_dir, bad)}")


def test_missing_parameter_group_names_it(base, tmp_path):
    bad = tmp_path / "base"
    shutil.copytree(base, bad)
    shutil.rmtree(bad / "params" / "head")
    with pytest.raises(UserError, match=rf"^{bad}: parameter group head is damaged \(.+\); re-convert the checkpoint"):
        load_model(bad)
