"""ModelConfig: the published full-size shapes, validation messages, and the dtype policy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import CONFIGS
from tiny_models import tiny_model_config

from perft_jax import ModelConfig, UserError, abstract_model, init_model
from perft_jax.models import read_hf_config_file
from perft_jax.models.config import DTYPES


def _num_params(model) -> int:
    from flax import nnx

    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name, billions", [("olmoe-1b-7b", 6.919), ("mixtral-8x7b", 46.703)])
def test_full_size_configs_have_the_published_parameter_count(name, billions):
    """OLMoE-1B-7B has 6.92 B parameters, Mixtral-8x7B 46.7 B: counted from shapes, no weights."""
    cfg, _, _ = read_hf_config_file(CONFIGS / "hf" / f"{name}.json")
    assert _num_params(abstract_model(cfg)) / 1e9 == pytest.approx(billions, abs=5e-4)


def test_olmoe_config_fields():
    cfg, arch, _ = read_hf_config_file(CONFIGS / "hf" / "olmoe-1b-7b.json")
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.qk_norm) == (64, 8, False, True)
    assert cfg.rope_theta == 10000.0 and arch.moe_prefix == "mlp"


def _tiny(**changes) -> ModelConfig:
    shapes = dict(hidden_size=16, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1)
    return tiny_model_config(**{**shapes, **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(num_experts_per_tok=5), "model.num_experts_per_tok: expected at most num_experts=4, got 5"),
    (dict(num_kv_heads=3), "model.num_kv_heads: expected a divisor of num_heads=2, got 3"),
    (dict(moe_backend="megablox"),
     "model.moe_backend: expected one of ['auto', 'dense', 'capacity', 'grouped', 'ragged', 'kernel']"),
    (dict(dtype="float8"), "model.dtype: expected one of"),
    (dict(hidden_size=0), "model.hidden_size: expected a positive integer, got 0"),
    (dict(head_dim=7), "model.head_dim: expected an even number"),
])
def test_invalid_values_name_the_key(changes, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _tiny(**changes)


def test_unknown_key_is_refused():
    with pytest.raises(UserError, match="unknown key 'num_expert'"):
        ModelConfig.from_dict({"num_expert": 4})


@pytest.mark.parametrize("param_dtype, dtype", [("float32", "bfloat16"), ("bfloat16", "bfloat16"),
                                                 ("bfloat16", "float32")])
def test_dtype_policy(param_dtype, dtype):
    """Parameters are stored in param_dtype; activations and logits come out in the compute dtype."""
    model = init_model(_tiny(param_dtype=param_dtype, dtype=dtype))
    assert model.layers[0].moe.experts.down[...].dtype == DTYPES[param_dtype]
    out = model(jnp.ones((1, 5), jnp.int32))
    assert out.logits.dtype == DTYPES[dtype]
    assert bool(jnp.all(jnp.isfinite(out.logits.astype(jnp.float32))))
