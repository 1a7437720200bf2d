"""Export back to Hugging Face: transformers loads the directory and gives our logits."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import build_hf_model, hf_logits, rel_l2, save_hf_model, tiny_model_config, token_batch

from perft_jax import export_hf, init_model, load_model
from perft_jax.convert import cli
from perft_jax.convert.hf_to_jax import convert_hf_to_jax

pytestmark = pytest.mark.torch


def _load_hf(path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
def test_round_trip_hf_to_jax_to_hf(arch, tmp_path, torch_required):
    hf = build_hf_model(arch, seed=5, sliding_window=6) if arch == "mixtral" else build_hf_model(arch, seed=5)
    convert_hf_to_jax(save_hf_model(hf, tmp_path / "hf"), tmp_path / "ckpt", show_progress=False)
    assert cli.main(["--export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    back = _load_hf(tmp_path / "back")
    # Same tensors bit for bit (per-expert names), hence the same logits.
    want, got = hf.state_dict(), back.state_dict()
    assert sorted(want) == sorted(got)
    for key in want:
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy(), err_msg=key)
    ids, mask = token_batch(256)
    np.testing.assert_array_equal(hf_logits(back, ids, mask), hf_logits(hf, ids, mask))


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
def test_export_of_a_jax_model_matches_its_logits(arch, tmp_path, torch_required):
    """A model that never came from HF (random init, tied embeddings), exported in several shards."""
    cfg = tiny_model_config(arch, vocab_size=128, tie_word_embeddings=True, rope_theta=5e5)
    model = init_model(cfg, seed=7)
    export_hf(model, tmp_path / "hf", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids, mask = token_batch(128)
    ours = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    assert rel_l2(ours, hf_logits(_load_hf(tmp_path / "hf"), ids, mask), mask) <= 1e-5
    # ... and the exported directory converts back to the same model.
    convert_hf_to_jax(tmp_path / "hf", tmp_path / "ckpt", show_progress=False)
    again = load_model(tmp_path / "ckpt")(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    np.testing.assert_array_equal(np.asarray(again), np.asarray(ours))
