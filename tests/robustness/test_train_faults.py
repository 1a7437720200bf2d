"""Bad tokenizers, bases, configs and output locations for `perft-train` (issue 15): one line naming the culprit,
exit code 2, and no run directory, config.json or cache left behind, because everything is checked before the
run directory is made."""
from __future__ import annotations

import errno
import json
import shutil

import pytest
from transformers import AutoTokenizer

from perft_jax.cli import train_main
from perft_jax.hub import tokenizer_files
from perft_jax.params import main as params_main
from tests.robustness.battery import Tree, call_main, fails_cleanly
from tests.robustness.faults import error_line, run_cli, small_disk


@pytest.fixture(scope="module")
def bare_base(tiny_base, tmp_path_factory):
    """The tiny base without its tokenizer files: a checkpoint converted from weights alone."""
    bare = shutil.copytree(tiny_base["base"], tmp_path_factory.mktemp("bare") / "base")
    for path in tokenizer_files(bare):
        path.unlink()
    return bare


@pytest.fixture(scope="module")
def bigger_tokenizer(tiny_base, tmp_path_factory):
    """The base's tokenizer with 40 more tokens than the base's 384 embedding rows."""
    tok = AutoTokenizer.from_pretrained(str(tiny_base["base"]))
    tok.add_tokens([f"<extra_{i}>" for i in range(40)])
    out = tmp_path_factory.mktemp("bigger") / "tokenizer"
    tok.save_pretrained(str(out))
    return out


def _fails(run_config, work, capfd, overrides, *culprits):
    config = run_config(*overrides)
    before = Tree(work)
    return fails_cleanly(call_main(train_main, ["--config", config], capfd), *culprits, untouched=before)


def test_checkpoint_without_tokenizer_files_is_refused_not_a_2_token_fallback(run_config, work, capfd, bare_base):
    line = _fails(run_config, work, capfd, [f"model.checkpoint={bare_base}"], bare_base, "no tokenizer files",
                  "model.tokenizer")
    assert "tokenises to no tokens" not in line


def test_checkpoint_without_tokenizer_files_trains_with_model_tokenizer(run_config, work, bare_base, tiny_base):
    """The fix the message names works: the same base with `model.tokenizer` gets past every check."""
    from perft_jax.build import load_base_tokenizer, load_run_config

    cfg = load_run_config(run_config(f"model.checkpoint={bare_base}", f"model.tokenizer={tiny_base['hf']}"))
    assert load_base_tokenizer(cfg.model).vocab_size == 384


def test_tokenizer_with_more_ids_than_the_vocabulary(run_config, work, capfd, bigger_tokenizer, tiny_base):
    line = _fails(run_config, work, capfd, [f"model.tokenizer={bigger_tokenizer}"], bigger_tokenizer,
                  tiny_base["base"], "ids up to 423", "vocab_size 384")
    assert "nan" not in line


def test_pad_id_outside_the_vocabulary(run_config, work, capfd, tiny_base):
    _fails(run_config, work, capfd, ["data.pad_id=384"], "data.pad_id", "vocab_size 384", "got 384")


def test_missing_tokenizer(run_config, work, capfd):
    _fails(run_config, work, capfd, [f"model.tokenizer={work / 'none'}"], work / "none", "not found")


def test_garbled_tokenizer_json(run_config, work, capfd):
    (work / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    _fails(run_config, work, capfd, [f"model.tokenizer={work / 'tokenizer.json'}"], work / "tokenizer.json",
           "not a `tokenizers` JSON file")


def test_tokenizer_folder_with_garbled_files(run_config, work, capfd, tiny_base):
    folder = work / "tok"
    folder.mkdir()
    shutil.copy(tiny_base["base"] / "tokenizer_config.json", folder)
    (folder / "tokenizer.json").write_text("{")
    _fails(run_config, work, capfd, [f"model.tokenizer={folder}"], folder, "cannot load an HF tokenizer")


def test_base_that_is_not_a_checkpoint(run_config, work, capfd):
    (work / "empty").mkdir()
    _fails(run_config, work, capfd, [f"model.checkpoint={work / 'empty'}"], work / "empty",
           "not a perft-jax base checkpoint")


def test_base_with_a_garbled_manifest(run_config, work, capfd, tiny_base):
    base = shutil.copytree(tiny_base["base"], work / "base")
    (base / "perft_model.json").write_text('{"format": ')
    _fails(run_config, work, capfd, [f"model.checkpoint={base}"], base / "perft_model.json", "invalid JSON")


def test_missing_base(run_config, work, capfd):
    _fails(run_config, work, capfd, [f"model.checkpoint={work / 'no_base'}"], "model.checkpoint", work / "no_base")


def test_random_base_needs_a_tokenizer(run_config, work, capfd, tiny_base):
    _fails(run_config, work, capfd, ["model.checkpoint=", f"model.hf_config={tiny_base['hf'] / 'config.json'}"],
           "model.tokenizer: needed")


@pytest.mark.parametrize("override, culprits", [
    ("train.epoch=2", ["train.epoch: unknown key"]),
    ("perft.top_k=9", ["perft.top_k", "got 9"]),
    ("data.cutoff_len=true", ["data.cutoff_len", "got True"]),
])
def test_bad_config_override(run_config, work, capfd, override, culprits):
    config = run_config()
    before = Tree(work)
    fails_cleanly(call_main(train_main, ["--config", config, override], capfd), *culprits, untouched=before)


def test_missing_config_file(work, capfd):
    before = Tree(work)
    fails_cleanly(call_main(train_main, ["--config", work / "none.yaml"], capfd), work / "none.yaml",
                  untouched=before)


def test_config_file_that_is_not_yaml(work, capfd):
    (work / "bad.yaml").write_text("model: [checkpoint\n")
    before = Tree(work)
    fails_cleanly(call_main(train_main, ["--config", work / "bad.yaml"], capfd), work / "bad.yaml", untouched=before)


def test_output_dir_that_is_a_file(run_config, work, capfd):
    (work / "taken").write_text("")
    _fails(run_config, work, capfd, [f"train.output_dir={work / 'taken'}"], "train.output_dir", work / "taken")


def test_read_only_output_location(run_config, work, capfd):
    with small_disk(work / "disk", read_only=True) as disk:
        line = _fails(run_config, work, capfd, [f"train.output_dir={disk / 'run'}"], disk / "run",
                      "read-only file system")
    assert "Traceback" not in line


def test_as_a_process_a_vocabulary_mismatch_is_one_line(run_config, work, bigger_tokenizer):
    """The real command, in its own process: nothing else (a warning, a log line, a progress bar) on stderr."""
    config = run_config(f"model.tokenizer={bigger_tokenizer}")
    before = Tree(work)
    line = error_line(run_cli("train.py", "--config", config))
    assert str(bigger_tokenizer) in line and "vocab_size 384" in line
    before.assert_unchanged()


def test_a_bad_row_after_a_good_file_leaves_nothing(run_config, work, capfd, tiny_base):
    rows = json.loads(tiny_base["train"].read_text())[:40]
    rows[33]["instruction"] = None
    bad = work / "bad.json"
    bad.write_text(json.dumps(rows))
    _fails(run_config, work, capfd, [f"data.train_files=[{tiny_base['train']},{bad}]"], bad, "row 33")


@pytest.mark.parametrize("command", ["train", "params"])
@pytest.mark.parametrize("fault, says", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/locked.json"), "/data/locked.json: permission denied"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"), "/mnt/ro/run: read-only file system"),
    (OSError(errno.ENOSPC, "No space left on device", "/"), "/: no space left on the device ("),
])
def test_an_os_error_naming_its_file_is_one_line(run_config, capfd, monkeypatch, command, fault, says):
    """Both CLI policies (train_main's and errors.run_cli's) for an OS error at an edge that did not say it itself."""
    def fail(*args, **kwargs):
        raise fault

    config = run_config()
    if command == "train":
        monkeypatch.setattr("perft_jax.train.loop.run_training", fail)
        proc = call_main(train_main, ["--config", config], capfd)
    else:
        monkeypatch.setattr("perft_jax.params.run", fail)
        proc = call_main(params_main, ["--config", config], capfd)
    fails_cleanly(proc, says)


@pytest.mark.parametrize("fault", [OSError(errno.ENOSPC, "No space left on device"),
                                   FileNotFoundError(errno.ENOENT, "No such file or directory", "/internal/x")])
def test_an_os_error_without_a_file_or_of_another_kind_keeps_its_traceback(run_config, monkeypatch, fault):
    """Not explained by the policy: an edge must name it itself, else it is a bug to see whole."""
    def fail(*args, **kwargs):
        raise fault

    monkeypatch.setattr("perft_jax.train.loop.run_training", fail)
    with pytest.raises(type(fault)):
        train_main(["--config", str(run_config())])
