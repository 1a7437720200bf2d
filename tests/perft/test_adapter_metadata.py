"""What an adapter directory records for reloading it elsewhere (format 2), and that older formats still load."""
from __future__ import annotations

import importlib.metadata
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import transformers
from flax import nnx
from tiny_models import tiny_model_config, token_batch

from perft_jax import UserError, init_model
from perft_jax.models import ARCHITECTURES
from perft_jax.perft.adapter_configs import FORMAT_VERSION
from perft_jax.perft.adapter_files import load_adapters, read_adapter_config, save_adapters
from perft_jax.perft.attach import attach_perft
from perft_jax.perft.config import PerftConfig

PERFT_E = PerftConfig(variant="perft_e", adapter="lora", bottleneck=2, lora_alpha=4.0)
VERSIONS = {"perft_jax": importlib.metadata.version("perft-jax"), "jax": jax.__version__, "flax": flax.__version__,
            "transformers": transformers.__version__}


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, attention_mask=mask).logits


def _saved(tmp_path, arch="mixtral", cfg=PERFT_E, **extra):
    model = attach_perft(init_model(tiny_model_config(arch), seed=1), cfg, seed=2)
    return model, save_adapters(model, tmp_path / "a", extra_config=extra or None)


def test_records_base_variant_and_versions(tmp_path):
    model, out = _saved(tmp_path, base_model_name_or_path="ckpts/tiny-mixtral", step=3)
    meta = json.loads((out / "adapter_config.json").read_text())["perft_jax"]
    assert meta["format_version"] == FORMAT_VERSION == 2
    assert meta["versions"] == VERSIONS
    assert meta["perft"]["variant"] == "perft_e" and meta["step"] == 3
    base = meta["base_model"]
    assert base["architecture"] == "MixtralForCausalLM" and base["name_or_path"] == "ckpts/tiny-mixtral"
    assert (base["model_type"], base["hidden_size"], base["num_layers"], base["num_experts"]) == ("mixtral", 32, 2, 4)
    # The recorded HF config rebuilds the base's description through transformers' own config class.
    hf_config = transformers.AutoConfig.for_model(**base["hf_config"])
    assert ARCHITECTURES["mixtral"].config_from_hf(hf_config) == model.config


def test_qv_lora_keeps_a_pure_peft_config(tmp_path):
    cfg = PerftConfig(variant="qv_lora", adapter="lora", bottleneck=2, lora_alpha=4.0)
    _, out = _saved(tmp_path, "olmoe", cfg, base_model_name_or_path="allenai/OLMoE-1B-7B-0924")
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["base_model_name_or_path"] == "allenai/OLMoE-1B-7B-0924" and "perft_jax" not in raw
    with safetensors.safe_open(out / "adapter_model.safetensors", framework="np") as f:
        meta = json.loads(f.metadata()["perft_jax"])
    assert meta["versions"] == VERSIONS and meta["base_model"]["architecture"] == "OlmoeForCausalLM"
    assert meta["base_model"]["name_or_path"] == "allenai/OLMoE-1B-7B-0924"


def test_format_1_directory_loads(tmp_path):
    model, out = _saved(tmp_path)
    raw = json.loads((out / "adapter_config.json").read_text())
    meta = raw["perft_jax"]
    meta["format_version"] = 1
    del meta["versions"]
    for key in ("architecture", "hf_config", "name_or_path", "intermediate_size"):
        del meta["base_model"][key]
    (out / "adapter_config.json").write_text(json.dumps(raw))
    assert read_adapter_config(out) == PERFT_E
    ids, mask = map(jnp.asarray, token_batch(model.config.vocab_size))
    fresh = load_adapters(init_model(model.config, seed=1), out)
    np.testing.assert_array_equal(_logits(fresh, ids, mask), _logits(model, ids, mask))


def test_newer_format_is_refused(tmp_path):
    model, out = _saved(tmp_path)
    raw = json.loads((out / "adapter_config.json").read_text())
    raw["perft_jax"]["format_version"] = FORMAT_VERSION + 1
    (out / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"adapter_config\.json: perft_jax\.format_version 3 .* upgrade perft-jax"):
        read_adapter_config(out)
    with pytest.raises(UserError, match=r"perft_jax\.format_version 3"):
        load_adapters(init_model(model.config, seed=1), out)
