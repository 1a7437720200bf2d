"""Hub names resolved from local caches laid out as the hub clients lay them out (there is no network here).

The model/dataset repo cache is huggingface_hub's (`<HF_HUB_CACHE>/models--org--name/{blobs,snapshots,refs}`,
https://huggingface.co/docs/huggingface_hub/guides/manage-cache), checked with its own `scan_cache_dir`; a hub
dataset for training is what `datasets.load_dataset(name)` leaves in HF_DATASETS_CACHE after an online load.
Both libraries read HF_HUB_CACHE / HF_HUB_OFFLINE / HF_DATASETS_* when imported, so in this process the fixtures
patch their constants as well as the variables; one test runs the converter in a fresh process on the variables alone.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys

import datasets
import huggingface_hub
import numpy as np
import pytest
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils.sha import git_hash, sha_fileobj
from safetensors.numpy import load_file
from testing_utils import CharTokenizer
from tiny_models import tiny_model_config

from perft_jax import UserError, export_hf, init_model, load_model
from perft_jax.build import load_run_config, resolve_model_config
from perft_jax.checkpoint import base as base_ckpt
from perft_jax.config import ModelSection
from perft_jax.convert import cli
from perft_jax.convert.hf_to_jax import convert_hf_to_jax
from perft_jax.data.config import DataConfig
from perft_jax.data.dataset import build_training_data, load_records
from perft_jax.data.tokenize import load_tokenizer
from perft_jax.demo import build_tokenizer
from perft_jax.eval.runner import evaluate
from perft_jax.hub import is_hub_name, locate

REPO = "tiny-org/tiny-olmoe"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def put_snapshot(cache: pathlib.Path, repo_id: str, commit: str, src: pathlib.Path, refs=("main",),
                 repo_type: str = "model") -> pathlib.Path:
    """Files of `src` as a cached snapshot: content-addressed blobs (git sha1, sha256 for LFS files such as
    safetensors), relative symlinks under snapshots/<commit>, and refs/<name> holding the commit hash."""
    root = cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = sha_fileobj(io.BytesIO(data)).hex() if path.suffix == ".safetensors" else git_hash(data)
        (root / "blobs" / blob).write_bytes(data)
        link = root / "snapshots" / commit / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "blobs" / blob, link.parent))
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return root / "snapshots" / commit


def put_prepared_dataset(cache: pathlib.Path, repo_id: str, commit: str, rows: list[dict], work: pathlib.Path):
    """What an online `datasets.load_dataset(repo_id)` of a repo of JSON files prepares (datasets/load.py
    HubDatasetModuleFactory: the `json` builder, config `default`, the commit as hash, Arrow files named after
    the dataset) at <cache>/<namespace>___<name>/default/0.0.0/<commit>."""
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    work.mkdir(parents=True)
    (work / "train.json").write_text(json.dumps(rows))
    builder = Json(cache_dir=str(work / "build"), dataset_name=name, data_files={"train": [str(work / "train.json")]})
    builder.download_and_prepare(output_dir=str(cache / f"{namespace}___{name}" / "default" / "0.0.0" / commit))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> pathlib.Path:
    """An empty hub cache, offline (HF_HUB_CACHE, HF_HUB_OFFLINE=1)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch, hub_cache) -> pathlib.Path:
    """An empty datasets cache, offline (HF_DATASETS_CACHE, HF_DATASETS_OFFLINE=1)."""
    cache = tmp_path / "datasets"
    cache.mkdir()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Two HF directories of the same tiny OLMoE (different weights, same BPE tokenizer), made without torch."""
    root = tmp_path_factory.mktemp("hub_src")
    dirs = {}
    for commit, seed in ((COMMIT_A, 1), (COMMIT_B, 2)):
        dirs[commit] = export_hf(init_model(tiny_model_config(vocab_size=64), seed=seed), root / commit)
        build_tokenizer(["hello world"] * 8, dirs[commit])
    return dirs


@pytest.fixture
def cached_model(hub_cache, hf_dirs) -> pathlib.Path:
    """REPO with main -> commit B and tag v1 -> commit A."""
    put_snapshot(hub_cache, REPO, COMMIT_A, hf_dirs[COMMIT_A], refs=("v1",))
    put_snapshot(hub_cache, REPO, COMMIT_B, hf_dirs[COMMIT_B])
    return hub_cache


def _embedding(path: pathlib.Path) -> np.ndarray:
    return load_file(str(path / "model.safetensors"))["model.embed_tokens.weight"]


def test_the_cache_is_laid_out_as_huggingface_hub_reads_it(cached_model):
    info = huggingface_hub.scan_cache_dir(cached_model)
    assert info.warnings == []
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type, set(repo.refs)) == (REPO, "model", {"main", "v1"})
    assert repo.refs["main"].commit_hash == COMMIT_B
    assert {f.file_name for f in repo.refs["v1"].files} >= {"config.json", "model.safetensors", "tokenizer.json"}


@pytest.mark.parametrize("revision, commit", [(None, COMMIT_B), ("v1", COMMIT_A), (COMMIT_A, COMMIT_A)])
def test_converts_from_a_repo_id_at_a_revision(cached_model, hf_dirs, tmp_path, revision, commit):
    convert_hf_to_jax(REPO, tmp_path / "ckpt", show_progress=False, revision=revision)
    manifest = json.loads((tmp_path / "ckpt" / base_ckpt.MANIFEST).read_text())
    assert manifest["source"]["hub"] == {"repo_id": REPO, "commit": commit}
    np.testing.assert_array_equal(np.asarray(load_model(tmp_path / "ckpt").embed.embedding[...]),
                                  _embedding(hf_dirs[commit]))
    assert (tmp_path / "ckpt" / "tokenizer.json").read_bytes() == (hf_dirs[commit] / "tokenizer.json").read_bytes()


def test_offline_misses_say_what_to_do(cached_model, tmp_path, capsys):
    argv = ["--hf-dir", "tiny-org/absent", "--out", str(tmp_path / "out"), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == ("error: tiny-org/absent: no such local directory, and not in the local hub cache "
                   "(HF_HUB_OFFLINE=1): run `hf download tiny-org/absent` on a machine with network, or pass a local "
                   "directory\n")
    assert cli.main(["--hf-dir", REPO, "--revision", "v9", "--out", str(tmp_path / "out")]) == 2
    assert "revision 'v9' is not in the local hub cache (HF_HUB_OFFLINE=1): run " \
           f"`hf download {REPO} --revision v9`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="a revision .'v1'. selects a hub snapshot, but .* is a local path"):
        convert_hf_to_jax(tmp_path, tmp_path / "out", revision="v1")


def test_converter_cli_honours_the_environment_in_a_fresh_process(cached_model, hf_dirs, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(cached_model), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    run = [sys.executable, "-m", "perft_jax.convert.cli", "--no-progress", "--out"]
    done = subprocess.run(run + [str(tmp_path / "ckpt"), "--hf-dir", REPO], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "ckpt" / base_ckpt.MANIFEST).read_text())["source"]["hub"]["commit"] == COMMIT_B
    missed = subprocess.run(run + [str(tmp_path / "x"), "--hf-dir", "tiny-org/absent"], env=env, capture_output=True,
                            text=True)
    assert missed.returncode == 2
    assert missed.stderr.count("\n") == 1 and "(HF_HUB_OFFLINE=1)" in missed.stderr


def test_an_existing_path_wins_over_a_hub_name(cached_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / REPO).mkdir(parents=True)
    assert not is_hub_name(REPO) and locate(REPO).path == pathlib.Path(REPO)
    monkeypatch.chdir(tmp_path / "tiny-org")
    assert is_hub_name(REPO) and locate(REPO).commit == COMMIT_B
    assert not is_hub_name("a/b/c") and not is_hub_name("/abs/name") and not is_hub_name("name")


def test_checkpoint_hub_name_gets_a_conversion_hint(tmp_path):
    hint = ("model.checkpoint: 'allenai/OLMoE-1B-7B-0924' is a hub name, not a converted checkpoint: run "
            "perft-convert --hf-dir allenai/OLMoE-1B-7B-0924 --out ckpts/olmoe-1b-7b-0924 first "
            "(then model.checkpoint=ckpts/olmoe-1b-7b-0924)")
    with pytest.raises(UserError) as err:
        resolve_model_config(ModelSection(checkpoint="allenai/OLMoE-1B-7B-0924"))
    assert str(err.value) == hint
    # ... also from a config file, whose relative paths are otherwise read beside it.
    (tmp_path / "run.yaml").write_text("model:\n  checkpoint: allenai/OLMoE-1B-7B-0924\n")
    with pytest.raises(UserError) as err:
        load_run_config(tmp_path / "run.yaml")
    assert str(err.value) == hint


def test_tokenizer_from_a_repo_id(cached_model, hf_dirs):
    tok = load_tokenizer(REPO)
    assert tok.encode("hello") == load_tokenizer(hf_dirs[COMMIT_B]).encode("hello") != []


def test_eval_data_from_a_hub_dataset_repo(hub_cache, tmp_path):
    rows = [{"instruction": "is it?", "input": "", "output": "", "answer": gold} for gold in ("true", "false")]
    (tmp_path / "bench" / "boolq").mkdir(parents=True)
    (tmp_path / "bench" / "boolq" / "test.json").write_text(json.dumps(rows))
    put_snapshot(hub_cache, "bench-org/llm-adapters-eval", COMMIT_A, tmp_path / "bench", repo_type="dataset")
    model = init_model(tiny_model_config(vocab_size=260))
    summary = evaluate(model, CharTokenizer(), ["boolq"], "bench-org/llm-adapters-eval", tmp_path / "eval.json",
                       batch_size=2, max_new_tokens=1, show_progress=False)
    assert summary["n"] == {"boolq": 2}
    with pytest.raises(UserError, match="run `hf download bench-org/absent --repo-type dataset`"):
        evaluate(model, CharTokenizer(), ["boolq"], "bench-org/absent", tmp_path / "eval.json", batch_size=2)


def test_training_data_from_a_cached_hub_dataset(datasets_cache, tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
    put_prepared_dataset(datasets_cache, "some-org/commonsense_170k", COMMIT_A, rows, tmp_path / "prep")
    (tmp_path / "local.json").write_text(json.dumps(rows[:2]))
    cfg = DataConfig(train_files=("some-org/commonsense_170k", str(tmp_path / "local.json")), val_set_size=0)
    source = load_records(cfg)
    assert [len(part) for part in source.parts] == [5, 2]
    assert source.parts[0].to_list() == rows
    data = build_training_data(cfg, CharTokenizer())
    assert sorted(data.train["row"]) == list(range(7))


def test_training_data_offline_miss_says_what_to_do(datasets_cache):
    with pytest.raises(UserError) as err:
        load_records(DataConfig(train_files=("some-org/absent",)))
    assert str(err.value).startswith("some-org/absent: no such file, and not a dataset in the local datasets cache "
                                     "(HF_DATASETS_OFFLINE=1): run `python -c \"import datasets; "
                                     "datasets.load_dataset('some-org/absent', split='train')\"` on a machine")
