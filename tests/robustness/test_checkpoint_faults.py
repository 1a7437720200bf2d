"""Run checkpoints and keep-best adapters under faults (issue 15): a damaged newest step is reported, set aside and
skipped; unfinished orbax steps are cleaned; full and read-only disks end in one line with nothing left behind; and
`train.py` resumes past a damaged checkpoint to the uninterrupted result."""
from __future__ import annotations

import os
import pathlib
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from perft_jax import UserError
from perft_jax.checkpoint.run import CheckpointConfig, RunCheckpointer
from perft_jax.config import load_config
from perft_jax.perft.adapter_configs import CONFIG_NAME, WEIGHTS_NAME
from perft_jax.perft.config import PerftConfig
from perft_jax.train.keep_best import NO_BEST, resumed_best
from perft_jax.train.loop import run_training
from tests.robustness.faults import error_line, run_cli, siblings, small_disk
from tests.train.test_run_checkpoint import _setup
from tests.train.test_train_cli import _config_file, assets  # noqa: F401  # `assets`: a module-scoped fixture

CONFIG = CheckpointConfig(every_steps=1, keep=5, async_save=True)


def _saved(directory: pathlib.Path, steps=(1, 2, 3)) -> pathlib.Path:
    """Run checkpoints of `steps`, each told apart by its data state and metadata."""
    model, optimizer, batches = _setup()
    with RunCheckpointer(directory, CONFIG) as ckpt:
        for step in steps:
            ckpt.save(step, model, optimizer, {"step": step}, {"step": step})
    return directory


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> pathlib.Path:
    return _saved(tmp_path_factory.mktemp("pristine") / "ckpt")


@pytest.fixture
def ckpt_dir(pristine, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(pristine, tmp_path / "ckpt"))


def _truncate(step_dir: pathlib.Path) -> None:
    """What a node dying mid-write leaves: the adapters' data files cut short."""
    for data in (step_dir / "adapters" / "ocdbt.process_0" / "d").iterdir():
        os.truncate(data, data.stat().st_size // 3)


DAMAGE = {  # how a node dying mid-write or a flaky file system leaves a step, and what restore then says
    "truncated array file": (_truncate, "OUT_OF_RANGE: Error reading"),
    "meta item deleted": (lambda d: (d / "meta" / "metadata").unlink(), f"meta{os.sep}metadata not found"),
    "array metadata deleted": (lambda d: (d / "optimizer" / "_METADATA").unlink(), "optimizer/_METADATA is missing"),
    "garbled sharding file": (lambda d: (d / "rng" / "_sharding").write_bytes(b"\xff{"), "Invalid JSON"),
    "data item truncated": (lambda d: os.truncate(d / "data" / "metadata", 5), "line 1 column"),
}


def _restore(directory: pathlib.Path, **kw):
    model, optimizer, _ = _setup()
    with RunCheckpointer(directory, CONFIG) as ckpt:
        return ckpt.restore(model, optimizer, **kw), ckpt.all_steps()


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_step_is_set_aside_and_the_one_before_restores(ckpt_dir, capfd, damage):
    spoil, detail = DAMAGE[damage]
    spoil(ckpt_dir / "3")
    restored, steps = _restore(ckpt_dir)
    assert restored.step == 2 and restored.data_state == {"step": 2} and restored.metadata == {"step": 2}
    assert steps == [1, 2] and sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2", "3.damaged-1"]
    line, = capfd.readouterr().err.strip().splitlines()
    assert line.startswith(f"warning: {ckpt_dir / '3'}: damaged run checkpoint (") and detail in line, line
    assert line.endswith("); moved to 3.damaged-1 for inspection, resuming from step 2")


def test_two_damaged_steps_are_both_set_aside(ckpt_dir, capfd):
    _truncate(ckpt_dir / "3")
    (ckpt_dir / "2" / "meta" / "metadata").unlink()
    restored, steps = _restore(ckpt_dir)
    assert restored.step == 1 and steps == [1]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2.damaged-1", "3.damaged-1"]
    lines = capfd.readouterr().err.strip().splitlines()
    assert [line.split(":")[1].strip() for line in lines] == [str(ckpt_dir / "3"), str(ckpt_dir / "2")]


def test_nothing_restores_is_one_line_and_moves_nothing(ckpt_dir):
    for step in (1, 2, 3):
        _truncate(ckpt_dir / str(step))
    with pytest.raises(UserError) as err:
        _restore(ckpt_dir)
    message = str(err.value)
    assert message.startswith(f"{ckpt_dir}: none of the run checkpoints [1, 2, 3] restores (step 3: OUT_OF_RANGE")
    assert message.endswith("nothing was moved: move the directory away to start afresh") and "\n" not in message
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2", "3"]


def test_a_damaged_step_asked_for_by_number_is_an_error(ckpt_dir):
    _truncate(ckpt_dir / "2")
    with pytest.raises(UserError, match=rf"^{ckpt_dir / '2'}: damaged run checkpoint \(OUT_OF_RANGE"):
        _restore(ckpt_dir, step=2)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2", "3"]  # nothing moved


def test_a_checkpoint_of_another_model_is_refused_not_set_aside(ckpt_dir):
    model, optimizer, _ = _setup(PerftConfig(variant="perft_r", num_adapters=4, top_k=2, bottleneck=4, dropout=0.1))
    with RunCheckpointer(ckpt_dir, CONFIG) as ckpt, pytest.raises(UserError, match="does not match the model"):
        ckpt.restore(model, optimizer)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2", "3"]


def test_unfinished_orbax_steps_of_a_crash_are_removed_at_startup(ckpt_dir, capfd):
    # orbax 0.12.8 writes a step as `<step>.orbax-checkpoint-tmp` and renames it once every item is committed;
    # earlier versions appended a timestamp (`-<seconds>`)
    unfinished = ["4.orbax-checkpoint-tmp", "5.orbax-checkpoint-tmp-1764672000"]
    for name in unfinished:
        shutil.copytree(ckpt_dir / "3", ckpt_dir / name)
    restored, steps = _restore(ckpt_dir)
    assert restored.step == 3 and steps == [1, 2, 3]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2", "3"]
    assert sorted(capfd.readouterr().err.strip().splitlines()) == [
        f"note: removed the unfinished run checkpoint {ckpt_dir / name} (an interrupted save)" for name in unfinished]


def test_full_disk_while_saving_is_one_line_and_leaves_no_tmp_step(tmp_path, capfd):
    model, optimizer, _ = _setup()
    with small_disk(tmp_path / "small", size="300k") as disk:  # a step takes about 200 KiB on tmpfs
        ckpt = RunCheckpointer(disk / "ckpt", CONFIG)
        with pytest.raises(UserError) as err:
            for step in range(1, 5):
                ckpt.save(step, model, optimizer, {}, {})
            ckpt.wait_until_finished()
        message = str(err.value)
        assert message.startswith(f"{disk / 'ckpt' / '2'}: no space left on the device (about ")
        assert " KiB needed, " in message
        assert message.endswith(" free of 300.0 KiB); free some space or write elsewhere")
        assert sorted(p.name for p in (disk / "ckpt").iterdir()) == ["1"]  # the good step stays, no tmp step
        assert capfd.readouterr().err == ""  # none of orbax's error logs and tracebacks


def test_read_only_checkpoint_directory_is_refused_before_any_save(tmp_path):
    with small_disk(tmp_path / "ro", read_only=True, folders=("ckpt",)) as disk:
        for directory in (disk / "ckpt", disk / "new"):
            with pytest.raises(UserError, match=rf"^{directory}: read-only file system; choose a location you can "
                                                 "write to$"):
                RunCheckpointer(directory, CONFIG)
        assert [p.name for p in disk.iterdir()] == ["ckpt"] and not list((disk / "ckpt").iterdir())


def _adapter_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    from perft_jax.perft.adapter_files import save_adapters

    return save_adapters(_setup()[0], tmp_path / "best_adapters")


@pytest.mark.parametrize("damage, problem", [
    ("truncated weights", f"{WEIGHTS_NAME}: Error while deserializing header"),
    ("config deleted", f"{CONFIG_NAME}: missing adapter config"),
])
def test_damaged_best_adapters_are_set_aside_and_keep_best_starts_over(tmp_path, capfd, damage, problem):
    best_dir = _adapter_dir(tmp_path)
    if damage == "truncated weights":
        os.truncate(best_dir / WEIGHTS_NAME, 100)
    else:
        (best_dir / CONFIG_NAME).unlink()
    assert resumed_best(best_dir, {"val_loss": 1.5, "step": 5}, is_writer=True) == NO_BEST
    line, = capfd.readouterr().err.strip().splitlines()
    assert line.startswith(f"warning: {best_dir}: the keep-best adapters of step 5 do not read back (")
    assert problem in line
    assert line.endswith("); moved to best_adapters.damaged-1 for inspection; keep-best starts over at the next "
                         "validation")
    assert siblings(best_dir) == ["best_adapters.damaged-1"]


def test_intact_or_missing_best_adapters(tmp_path, capfd):
    best_dir = _adapter_dir(tmp_path)
    best = {"val_loss": 1.5, "step": 5}
    assert resumed_best(best_dir, best, is_writer=True) == best and capfd.readouterr().err == ""
    shutil.rmtree(best_dir)
    assert resumed_best(best_dir, best, is_writer=True) == NO_BEST
    assert capfd.readouterr().err.strip() == (f"warning: {best_dir}: the keep-best adapters of step 5 do not read "
                                              "back (missing); keep-best starts over at the next validation")


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    run_training(load_config(_config_file(assets, run_dir)))
    return run_dir


def test_train_resumes_past_a_damaged_checkpoint_to_the_uninterrupted_result(assets, finished_run, tmp_path):  # noqa: F811
    """The standard resume test with the newest checkpoint truncated (and the keep-best adapters too): the rerun
    says so in two lines, resumes from the step before and ends bit-identical to the uninterrupted run."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    config = _config_file(assets, run_dir)
    newest = max(int(p.name) for p in (run_dir / "checkpoints").iterdir())
    _truncate(run_dir / "checkpoints" / str(newest))
    os.truncate(run_dir / "best_adapters" / WEIGHTS_NAME, 1000)
    shutil.rmtree(run_dir / "adapters")
    proc = run_cli("train.py", "--config", config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {newest - 1} " in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr[-3000:]
    assert lines[0].startswith(f"warning: {run_dir / 'checkpoints' / str(newest)}: damaged run checkpoint (")
    assert lines[0].endswith(f"moved to {newest}.damaged-1 for inspection, resuming from step {newest - 1}")
    assert lines[1].startswith(f"warning: {run_dir / 'best_adapters'}: the keep-best adapters of step ")
    want = load_file(str(finished_run / "adapters" / WEIGHTS_NAME))
    best = load_file(str(finished_run / "best_adapters" / WEIGHTS_NAME))
    assert all(np.array_equal(best[key], want[key]) for key in want)  # this run's best validation is its last
    for sub in ("adapters", "best_adapters"):  # so after keep-best starts over, both are the uninterrupted ones
        got = load_file(str(run_dir / sub / WEIGHTS_NAME))
        assert sorted(got) == sorted(want)
        for key in got:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{sub}: {key}")


def test_train_with_a_full_checkpoint_disk_is_one_line(assets, tmp_path):  # noqa: F811
    with small_disk(tmp_path / "small", size="200k") as disk:
        proc = run_cli("train.py", "--config", _config_file(assets, tmp_path / "run",
                                                            f"checkpoint.directory={disk / 'ckpt'}"))
        line = error_line(proc)
        assert line.startswith(f"error: {disk / 'ckpt' / '1'}: no space left on the device (about ")
        assert list((disk / "ckpt").iterdir()) == []
