"""The converter: both expert layouts, sharded indexes, dtypes, streaming, and every refused input."""
from __future__ import annotations

import json
import pathlib
import weakref

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_models import build_hf_model, hf_logits, rel_l2, save_hf_model, token_batch

from perft_jax import UserError, load_model
from perft_jax.checkpoint import base as base_ckpt
from perft_jax.convert import cli
from perft_jax.convert.hf_to_jax import convert_hf_to_jax

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def olmoe(torch_required):
    return build_hf_model("olmoe", seed=1)


@pytest.fixture
def hf_dir(olmoe, tmp_path) -> pathlib.Path:
    return save_hf_model(olmoe, tmp_path / "hf")


def _parity(hf_model, ckpt, **load_kwargs) -> float:
    ids, mask = token_batch(256)
    out = load_model(ckpt, **load_kwargs)(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    return rel_l2(out.logits, hf_logits(hf_model, ids, mask), mask)


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
def test_fused_expert_layout(arch, tmp_path, torch_required):
    """transformers-5 fused layout (`mlp.experts.gate_up_proj`, gate first) converts like per-expert."""
    hf = build_hf_model(arch, seed=2)
    save_hf_model(hf, tmp_path / "hf", save_original_format=False)
    keys = load_file(str(tmp_path / "hf" / "model.safetensors")).keys()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in keys)  # really the fused layout
    convert_hf_to_jax(tmp_path / "hf", tmp_path / "ckpt", show_progress=False)
    manifest = json.loads((tmp_path / "ckpt" / base_ckpt.MANIFEST).read_text())
    assert manifest["source"]["expert_layout"] == "fused"
    assert _parity(hf, tmp_path / "ckpt") <= 1e-5


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
def test_sharded_index(arch, tmp_path, torch_required):
    hf = build_hf_model(arch, seed=4)
    save_hf_model(hf, tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 3
    convert_hf_to_jax(tmp_path / "hf", tmp_path / "ckpt", show_progress=False)
    assert _parity(hf, tmp_path / "ckpt") <= 1e-5


def test_bfloat16_storage_and_tokenizer_copy(olmoe, hf_dir, tmp_path):
    (hf_dir / "tokenizer.json").write_text("{}")
    convert_hf_to_jax(hf_dir, tmp_path / "ckpt", dtype="bfloat16", show_progress=False)
    assert (tmp_path / "ckpt" / "tokenizer.json").read_text() == "{}"
    model = load_model(tmp_path / "ckpt")
    assert model.config.param_dtype == "bfloat16"
    assert model.layers[0].moe.experts.gate_up[...].dtype == jnp.bfloat16
    # bf16 weights and compute: close to float32 HF at bf16 precision, not bit-equal.
    assert _parity(olmoe, tmp_path / "ckpt") <= 2e-2
    # Loading a bf16 checkpoint in float32 widens exactly: stored values survive.
    model32 = load_model(tmp_path / "ckpt", dtype="float32")
    np.testing.assert_array_equal(np.asarray(model32.embed.embedding[...]),
                                  np.asarray(model.embed.embedding[...], np.float32))


def test_streams_one_group_at_a_time(hf_dir, tmp_path, monkeypatch):
    """Until a group is written, the converter reads only the tensors of that group."""
    from perft_jax.convert import source as source_mod

    events = []
    original_get = source_mod.SafetensorsSource.get
    original_save = base_ckpt.save_group
    monkeypatch.setattr(source_mod.SafetensorsSource, "get",
                        lambda self, key: events.append(("read", key)) or original_get(self, key))
    # Expert stacks are read while their group is being written, so the group ends when save_group returns.
    monkeypatch.setattr(base_ckpt, "save_group",
                        lambda d, group, tree: original_save(d, group, tree) or events.append(("save", group)))
    convert_hf_to_jax(hf_dir, tmp_path / "ckpt", show_progress=False)
    reads_by_group, pending = {}, []
    for kind, name in events:
        if kind == "read":
            pending.append(name)
        else:
            reads_by_group[name], pending = pending, []
    assert pending == []
    assert all(k.startswith("model.layers.0.") for k in reads_by_group["layer_000"])
    assert all(k.startswith("model.layers.1.") for k in reads_by_group["layer_001"])
    assert reads_by_group["embed"] == ["model.embed_tokens.weight"]
    assert sum(len(v) for v in reads_by_group.values()) == len(load_file(str(hf_dir / "model.safetensors")))


def test_expert_stacks_are_written_block_by_block(hf_dir, tmp_path, monkeypatch):
    """An expert stack is never whole in memory: each block is built from its own experts' tensors only,
    blocks of different stacks do not overlap, and a block is freed before the next one is built."""
    from perft_jax.convert import hf_to_jax
    from perft_jax.convert import source as source_mod

    monkeypatch.setattr(hf_to_jax, "BLOCK_BYTES", 3 * 64 * 64 * 4)  # 3 gate_up experts (float32), 6 down
    events, alive = [], []
    original_get = source_mod.SafetensorsSource.get
    original_blocks = base_ckpt.RowBlocks.blocks

    def blocks(self):
        for start, stop, block in original_blocks(self):
            assert not [ref for ref in alive if ref() is not None], "the previous block is still alive"
            alive.append(weakref.ref(block))
            events.append(("block", self.shape, start, stop))
            yield start, stop, block

    monkeypatch.setattr(source_mod.SafetensorsSource, "get",
                        lambda self, key: events.append(("read", key)) or original_get(self, key))
    monkeypatch.setattr(base_ckpt.RowBlocks, "blocks", blocks)
    convert_hf_to_jax(hf_dir, tmp_path / "ckpt", show_progress=False)

    gate_up, down = (8, 64, 64), (8, 32, 64)
    blocks_seen = [e[1:] for e in events if e[0] == "block"]
    assert sorted(blocks_seen) == sorted(2 * [(gate_up, 0, 3), (gate_up, 3, 6), (gate_up, 6, 8),
                                              (down, 0, 6), (down, 6, 8)])
    pending = []
    for event in events:
        if event[0] == "read":
            pending.append(event[1])
            continue
        _, shape, start, stop = event
        names = ("gate_proj", "up_proj") if shape == gate_up else ("down_proj",)
        experts = [k for k in pending if ".mlp.experts." in k]
        assert sorted(experts) == sorted(f"model.layers.{k.split('.')[2]}.mlp.experts.{x}.{n}.weight"
                                         for k in experts[:1] for x in range(start, stop) for n in names)
        pending = []


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_expert_blocks_reassemble_exactly(layout, olmoe, tmp_path, monkeypatch):
    """Blocks that do not divide the expert count restore to the same arrays as one whole block."""
    from perft_jax.convert import hf_to_jax

    hf_dir = save_hf_model(olmoe, tmp_path / "hf", save_original_format=layout == "per_expert")
    convert_hf_to_jax(hf_dir, tmp_path / "whole", show_progress=False)
    monkeypatch.setattr(hf_to_jax, "BLOCK_BYTES", 3 * 64 * 64 * 4)  # 3 gate_up experts (float32), 6 down
    convert_hf_to_jax(hf_dir, tmp_path / "blocks", show_progress=False)
    manifest = json.loads((tmp_path / "blocks" / base_ckpt.MANIFEST).read_text())
    assert manifest["source"]["expert_layout"] == layout
    whole, blocks = load_model(tmp_path / "whole"), load_model(tmp_path / "blocks")
    for layer_whole, layer_blocks in zip(whole.layers, blocks.layers):
        for name in ("gate_up", "down"):
            np.testing.assert_array_equal(np.asarray(getattr(layer_blocks.moe.experts, name)[...]),
                                          np.asarray(getattr(layer_whole.moe.experts, name)[...]))
    assert _parity(olmoe, tmp_path / "blocks") <= 1e-5


# ---- refused inputs: one-line message naming the culprit, exit code 2, nothing written ----

def _rewrite_weights(hf_dir: pathlib.Path, edit) -> None:
    path = hf_dir / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(hf_dir: pathlib.Path, **changes) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))


ROUTER = "model.layers.1.mlp.gate.weight"
REFUSALS = {
    "missing tensor": (lambda d: _rewrite_weights(d, lambda t: t.pop(ROUTER)), f"missing tensor {ROUTER}"),
    "unexpected tensor": (lambda d: _rewrite_weights(d, lambda t: t.update({"model.extra.weight": t[ROUTER]})),
                          "unexpected tensor model.extra.weight"),
    "mis-shaped tensor": (lambda d: _rewrite_weights(d, lambda t: t.update({ROUTER: t[ROUTER][:, :-1].copy()})),
                          f"tensor {ROUTER} has shape [8, 63], expected [8, 64]"),
    "wrongly typed tensor": (lambda d: _rewrite_weights(d, lambda t: t.update({ROUTER: t[ROUTER].astype(np.int32)})),
                             f"tensor {ROUTER} has dtype I32"),
    "unknown model_type": (lambda d: _edit_config(d, model_type="llama"), "unknown model_type 'llama'"),
    "missing config": (lambda d: (d / "config.json").unlink(), "config.json: missing model config"),
    "unreadable config": (lambda d: (d / "config.json").write_text("{not json"),
                          "config.json: unreadable model config"),
    "pickle weights": (lambda d: _to_pickle(d), "pytorch_model.bin: pickle-based PyTorch weights are refused"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
}


def _to_pickle(hf_dir: pathlib.Path) -> None:
    import torch

    tensors = load_file(str(hf_dir / "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, hf_dir / "pytorch_model.bin")
    (hf_dir / "model.safetensors").unlink()


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_cli_refuses_bad_input(case, hf_dir, tmp_path, capsys):
    corrupt, message = REFUSALS[case]
    corrupt(hf_dir)
    out = tmp_path / "ckpt"
    assert cli.main(["--hf-dir", str(hf_dir), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and message in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left behind


def test_allow_pickle_converts_bin_weights(olmoe, hf_dir, tmp_path):
    _to_pickle(hf_dir)
    assert cli.main(["--hf-dir", str(hf_dir), "--out", str(tmp_path / "ckpt"), "--allow-pickle",
                     "--no-progress"]) == 0
    assert _parity(olmoe, tmp_path / "ckpt") <= 1e-5


def test_existing_checkpoint_needs_overwrite(hf_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert cli.main(["--hf-dir", str(hf_dir), "--out", str(out), "--no-progress"]) == 0
    before = (out / base_ckpt.MANIFEST).read_text()
    assert cli.main(["--hf-dir", str(hf_dir), "--out", str(out), "--no-progress"]) == 2
    assert "already holds a checkpoint; pass --overwrite" in capsys.readouterr().err
    assert (out / base_ckpt.MANIFEST).read_text() == before
    assert cli.main(["--hf-dir", str(hf_dir), "--out", str(out), "--overwrite", "--dtype", "bfloat16",
                     "--no-progress"]) == 0
    assert json.loads((out / base_ckpt.MANIFEST).read_text())["model"]["param_dtype"] == "bfloat16"


def test_failure_midway_leaves_no_checkpoint(hf_dir, tmp_path, monkeypatch):
    """A crash while writing layer 1 leaves neither the output nor a temporary directory."""
    original_save = base_ckpt.save_group

    def failing_save(d, group, tree):
        if group == "layer_001":
            raise OSError("disk full")
        original_save(d, group, tree)

    monkeypatch.setattr(base_ckpt, "save_group", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_hf_to_jax(hf_dir, tmp_path / "ckpt", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_unreadable_expert_while_writing_is_a_one_line_error(hf_dir, tmp_path, monkeypatch, capsys):
    """Expert tensors are read inside orbax's writer; a failure there still ends as one line, nothing left."""
    from perft_jax.convert import source as source_mod

    original_read = source_mod._SafetensorsFile.read
    culprit = "model.layers.1.mlp.experts.5.up_proj.weight"

    def read(self, key, rows=None):
        if key == culprit:
            raise UserError(f"{self.path}: truncated safetensors file (tensor {key})")
        return original_read(self, key, rows)

    monkeypatch.setattr(source_mod._SafetensorsFile, "read", read)
    out = tmp_path / "ckpt"
    assert cli.main(["--hf-dir", str(hf_dir), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert f"truncated safetensors file (tensor {culprit})" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_load_model_refuses_a_non_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a perft-jax base checkpoint"):
        load_model(tmp_path)


def test_verify_flag_prints_logit_difference(hf_dir, tmp_path, capsys):
    assert cli.main(["--hf-dir", str(hf_dir), "--out", str(tmp_path / "ckpt"), "--verify", "--no-progress"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("verify:")][0]
    rel = float(line.split("relative L2 ")[1].split()[0])
    assert rel <= 1e-5


def test_converts_without_torch_installed(hf_dir, tmp_path):
    """The converter reads safetensors with numpy: it runs where torch is not installed."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['torch'] = None  # find_spec -> None, import -> ImportError: 'not installed'\n"
        "from perft_jax.convert.cli import main\n"
        f"rc = main(['--hf-dir', {str(hf_dir)!r}, '--out', {str(tmp_path / 'ckpt')!r}, '--no-progress'])\n"
        "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
        f"rc2 = main(['--hf-dir', {str(hf_dir)!r}, '--out', {str(tmp_path / 'other')!r}, '--no-progress',"
        " '--verify'])\n"
        "sys.exit(10 * rc + rc2)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]  # import ok (0); --verify without torch: exit 2
    assert "error: --verify needs torch" in result.stderr
    assert base_ckpt.is_base_checkpoint(tmp_path / "ckpt")
    assert not (tmp_path / "other").exists()  # refused before converting
