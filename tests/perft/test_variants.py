"""The registry of PERFT variants (perft/variants.py): one object per variant, the config's list derived from it."""
import dataclasses
import typing

import pytest

from perft_jax.perft.config import PerftConfig, Variant
from perft_jax.perft.variants import VARIANTS


def test_one_list_of_variants():
    assert list(VARIANTS) == list(typing.get_args(Variant))


@pytest.mark.parametrize("name", [n for n in VARIANTS if n not in ("none", "qv_lora")])
def test_reference_flags_select_the_variant_back(name):
    cfg = PerftConfig(variant=name, num_adapters=3, top_k=2)
    raw = VARIANTS[name].reference_keys(cfg)
    picked = [v.name for v in VARIANTS.values() if v.from_reference(raw) is not None]
    assert picked[0] == name


@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_only_settings_do_not_change_the_computation(name):
    cfg = PerftConfig(variant=name, adapter="lora", num_adapters=4, top_k=2)
    other = dataclasses.replace(cfg, router_aux_loss_coef=0.5, base_router_aux_loss=False, init="zero",
                                router_init_std=0.1)
    assert VARIANTS[name].computation(cfg) == VARIANTS[name].computation(other)
    wider = dataclasses.replace(cfg, bottleneck=cfg.bottleneck + 1)
    assert (VARIANTS[name].computation(cfg) == VARIANTS[name].computation(wider)) is (name == "none")
