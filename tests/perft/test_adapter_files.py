"""Adapter files (spec/PERFT.md §6): reference golden cases, round trips, HF PEFT interop, strict refusals.

The golden cases were computed by the reference PyTorch PERFT code (shared/data/perft_official_cases); the
expected tensor names below are written out from PERFT.md §6, independently of the module under test.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from tiny_models import build_hf_model, hf_logits, rel_l2, save_hf_model, tiny_model_config, token_batch

from perft_jax import ModelConfig, UserError, init_model, load_model
from perft_jax.convert.hf_to_jax import convert_hf_to_jax
from perft_jax.perft.adapter_files import load_adapters, read_adapter_config, save_adapters
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.attach import attach_perft, has_adapters
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.dynmole import DynMoLEConfig

TOL = 1e-5
GOLDEN = ("olmoe-S-lora", "olmoe-D-par", "olmoe-E-par", "olmoe-R-par-quirk", "mixtral-R-par", "mixtral-E-lora")
QUIRK = {"adapter_gate_weights": "base_router_rank"}
MOE_PREFIX = {"olmoe": "mlp", "mixtral": "block_sparse_moe"}


# ---------------------------------------------------------------------------------------------------------------
# Golden cases from the reference implementation


@pytest.fixture(scope="module")
def golden(shared_dir, tmp_path_factory):
    """case -> (case dir, converted base checkpoint), converted once per module."""
    cache = {}

    def get(case):
        if case not in cache:
            case_dir = shared_dir / "data" / "perft_official_cases" / case
            ckpt = tmp_path_factory.mktemp(case) / "ckpt"
            convert_hf_to_jax(case_dir / "hf", ckpt, show_progress=False)
            cache[case] = (case_dir, ckpt)
        return cache[case]

    return get


def _golden_error(case_dir: pathlib.Path, ckpt: pathlib.Path, overrides=None) -> float:
    expected = np.load(case_dir / "expected.npz")
    model = load_adapters(load_model(ckpt), case_dir / "adapters", overrides=overrides)
    out = model(jnp.asarray(expected["input_ids"]), attention_mask=jnp.asarray(expected["attention_mask"]))
    return rel_l2(out.logits, expected["logits"], expected["attention_mask"])


@pytest.mark.shared
@pytest.mark.parametrize("case", GOLDEN)
def test_golden_case_matches_reference_logits(golden, case):
    case_dir, ckpt = golden(case)
    error = _golden_error(case_dir, ckpt, QUIRK if "quirk" in case else None)
    assert error <= TOL, f"{case}: relative L2 error {error:.3g}"


@pytest.mark.shared
def test_golden_quirk_needs_the_switch(golden):
    """The paper-form weighting does not reproduce the reference OLMoE PERFT-R numbers."""
    case_dir, ckpt = golden("olmoe-R-par-quirk")
    assert read_adapter_config(case_dir / "adapters").adapter_gate_weights == "adapter_router"
    assert _golden_error(case_dir, ckpt) > 1e-3


@pytest.mark.shared
def test_golden_configs_read_from_reference_keys(shared_dir):
    root = shared_dir / "data" / "perft_official_cases"
    assert read_adapter_config(root / "olmoe-S-lora" / "adapters") == PerftConfig(
        variant="perft_s", adapter="lora", bottleneck=2, lora_alpha=4.0, dropout=0.0)
    assert read_adapter_config(root / "olmoe-D-par" / "adapters") == PerftConfig(
        variant="perft_d", adapter="parallel_adapter", bottleneck=6, num_adapters=3)
    assert read_adapter_config(root / "mixtral-R-par" / "adapters", QUIRK) == PerftConfig(
        variant="perft_r", adapter="parallel_adapter", bottleneck=8, num_adapters=4, top_k=2,
        adapter_gate_weights="base_router_rank")


# ---------------------------------------------------------------------------------------------------------------
# Round trips on tiny random models


def tiny_config(arch: str) -> ModelConfig:
    olmoe = arch == "olmoe"
    return tiny_model_config(arch, vocab_size=96, num_kv_heads=4 if olmoe else 2, num_experts=6 if olmoe else 4)


VARIANTS = {
    "perft_s": dict(variant="perft_s"),
    "perft_d": dict(variant="perft_d", num_adapters=3),
    "perft_r": dict(variant="perft_r", num_adapters=4, top_k=2),
    "perft_e": dict(variant="perft_e"),
}
FORMS = {
    "lora": dict(adapter="lora", bottleneck=3, lora_alpha=6.0),
    "parallel_adapter": dict(adapter="parallel_adapter", bottleneck=5, activation="silu"),
}
EXTRA_CASES = {
    # Settings the reference keys cannot express travel in the "perft_jax" key.
    "perft_r-quirk": PerftConfig(variant="perft_r", adapter="parallel_adapter", bottleneck=4, num_adapters=4,
                                 top_k=2, adapter_gate_weights="base_router_rank"),
    "perft_r-dynmole": PerftConfig(variant="perft_r", adapter="lora", bottleneck=2, lora_alpha=3.0, num_adapters=4,
                                   top_k=2, router="dynmole", dynmole=DynMoLEConfig(keep_top_k=2)),
    "qv_lora": PerftConfig(variant="qv_lora", adapter="lora", bottleneck=4, lora_alpha=8.0),
}
ROUND_TRIPS = {f"{v}-{f}": PerftConfig(**VARIANTS[v], **FORMS[f]) for v in VARIANTS for f in FORMS} | EXTRA_CASES


def randomize_adapters(model, seed: int, scale: float = 0.3) -> None:
    """Replace the near-zero init by weights large enough to move the logits visibly."""
    leaves, treedef = jax.tree.flatten(nnx.state(model, AdapterParam))
    rng = np.random.default_rng(seed)  # numpy: no per-shape XLA compiles, keeps the suite fast
    new = [jnp.asarray(rng.standard_normal(x.shape) * scale, x.dtype) for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def logits_of(model) -> np.ndarray:
    ids, mask = token_batch(model.config.vocab_size)
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)


def expected_tensors(mcfg: ModelConfig, cfg: PerftConfig) -> dict[str, tuple[int, ...]]:
    """File tensor names and PyTorch shapes, written out from PERFT.md §6 (and HF PEFT for qv_lora)."""
    moe, h, r = MOE_PREFIX[mcfg.model_type], mcfg.hidden_size, cfg.bottleneck
    first, second = ("lora_A", "lora_B") if cfg.adapter == "lora" else ("adapter_w1", "adapter_w2")
    out = {}
    for layer in range(mcfg.num_layers):
        if cfg.variant == "qv_lora":
            prefix = f"base_model.model.model.layers.{layer}.self_attn"
            out[f"{prefix}.q_proj.lora_A.weight"] = (r, h)
            out[f"{prefix}.q_proj.lora_B.weight"] = (mcfg.num_heads * mcfg.head_dim, r)
            out[f"{prefix}.v_proj.lora_A.weight"] = (r, h)
            out[f"{prefix}.v_proj.lora_B.weight"] = (mcfg.num_kv_heads * mcfg.head_dim, r)
            continue
        base = f"model.layers.{layer}.{moe}"
        if cfg.variant == "perft_s":
            units = [f"{base}.shared_adapter.0.unit"]
        elif cfg.variant == "perft_d":
            units = [f"{base}.shared_adapter.{j}.unit" for j in range(cfg.num_adapters)]
        elif cfg.variant == "perft_r":
            units = [f"{base}.shared_routing_adapter.{j}.unit" for j in range(cfg.num_adapters)]
            out[f"{base}.shared_routing_adapter_gate.weight"] = (cfg.num_adapters, h)
        else:
            units = [f"{base}.experts.{e}.embedded_routing_adapter.unit" for e in range(mcfg.num_experts)]
        for unit in units:
            out[f"{unit}.{first}.weight"] = (r, h)
            out[f"{unit}.{second}.weight"] = (h, r)
    return out


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_round_trip_is_bit_exact(tmp_path, arch, case):
    cfg, mcfg = ROUND_TRIPS[case], tiny_config(arch)
    trained = attach_perft(init_model(mcfg, seed=1), cfg, seed=2)
    randomize_adapters(trained, seed=3)
    want = logits_of(trained)
    assert rel_l2(want, logits_of(init_model(mcfg, seed=1))) > 1e-2  # the adapters matter

    out = save_adapters(trained, tmp_path / "adapters", extra_config={"step": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]  # no temporary directory left behind
    assert read_adapter_config(out) == cfg
    fresh = load_adapters(init_model(mcfg, seed=1), out)
    np.testing.assert_array_equal(logits_of(fresh), want)

    # Names and shapes exactly as PERFT.md §6 / HF PEFT spell them; values are the transposed slices.
    tensors = safetensors.numpy.load_file(out / "adapter_model.safetensors")
    assert {k: v.shape for k, v in tensors.items()} == expected_tensors(mcfg, cfg)
    layer = trained.layers[1]
    if cfg.variant == "qv_lora":
        name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
        np.testing.assert_array_equal(tensors[name], np.asarray(layer.attn.v_lora.lora_B[...]).T)
    else:
        bank = layer.moe.adapters.bank
        second = bank.lora_B if cfg.adapter == "lora" else bank.adapter_w2
        unit = {"perft_s": "shared_adapter.0", "perft_d": "shared_adapter.2", "perft_r": "shared_routing_adapter.2",
                "perft_e": "experts.2.embedded_routing_adapter"}[cfg.variant]
        j = 0 if cfg.variant == "perft_s" else 2
        name = f"model.layers.1.{MOE_PREFIX[arch]}.{unit}.unit.{second_name(cfg)}.weight"
        np.testing.assert_array_equal(tensors[name], np.asarray(second[...])[j].T)
        if cfg.variant == "perft_r":
            np.testing.assert_array_equal(tensors[f"model.layers.1.{MOE_PREFIX[arch]}.shared_routing_adapter_gate.weight"],
                                          np.asarray(layer.moe.adapters.router[...]).T)


def second_name(cfg: PerftConfig) -> str:
    return "lora_B" if cfg.adapter == "lora" else "adapter_w2"


@pytest.mark.parametrize("case", ["perft_d-lora", "perft_r-parallel_adapter", "perft_e-lora"])
def test_reference_config_keys(tmp_path, case):
    cfg = ROUND_TRIPS[case]
    model = attach_perft(init_model(tiny_config("mixtral")), cfg)
    out = save_adapters(model, tmp_path / "a", extra_config={"base_model_name_or_path": "tiny"})
    raw = json.loads((out / "adapter_config.json").read_text())
    args = {"r": 3, "lora_alpha": 6, "lora_dropout": 0.0} if cfg.adapter == "lora" else \
        {"hidden_dim": 5, "hidden_act": "silu", "dropout": 0.0}
    assert raw["adapter_type"] == ("LoRA" if cfg.adapter == "lora" else "Parallel_Adapter")
    assert raw["adapter_args"] == args
    assert (raw["shared_adapter"], raw["shared_adapter_num"]) == ((True, 3) if cfg.variant == "perft_d" else (False, 0))
    assert (raw["shared_routing_adapter"], raw["shared_routing_adapter_num_experts"],
            raw["shared_routing_adapter_num_experts_per_tok"]) == \
        ((True, 4, 2) if cfg.variant == "perft_r" else (False, 0, 0))
    assert raw["shared_routing_adapter_router_aux_loss_coef"] == 0.01
    assert raw["embedded_routing_adapter"] is (cfg.variant == "perft_e")
    ours = raw["perft_jax"]
    assert ours["perft"]["variant"] == cfg.variant and ours["base_model_name_or_path"] == "tiny"
    assert ours["base_model"]["model_type"] == "mixtral" and ours["base_model"]["hidden_size"] == 32
    # Without "perft_jax", the reference keys alone give the same config back.
    del raw["perft_jax"]
    (out / "adapter_config.json").write_text(json.dumps(raw))
    assert read_adapter_config(out) == cfg


def test_explicit_config_records_training_only_fields(tmp_path):
    cfg = PerftConfig(variant="perft_r", num_adapters=4, top_k=1, router_aux_loss_coef=0.05, init="zero",
                      base_router_aux_loss=False)
    model = attach_perft(init_model(tiny_config("olmoe")), cfg)
    out = save_adapters(model, tmp_path / "a", config=cfg)
    assert read_adapter_config(out) == cfg
    assert json.loads((out / "adapter_config.json").read_text())["shared_routing_adapter_router_aux_loss_coef"] == 0.05
    with pytest.raises(UserError, match="differ from this config"):
        save_adapters(model, tmp_path / "b", config=PerftConfig(variant="perft_r", num_adapters=4, top_k=2))


def test_load_into_carried_adapters(tmp_path):
    cfg = ROUND_TRIPS["perft_r-lora"]
    trained = attach_perft(init_model(tiny_config("olmoe")), cfg)
    randomize_adapters(trained, seed=5)
    out = save_adapters(trained, tmp_path / "a")
    carried = attach_perft(init_model(tiny_config("olmoe")), cfg, seed=9)
    np.testing.assert_array_equal(logits_of(load_adapters(carried, out)), logits_of(trained))
    other = attach_perft(init_model(tiny_config("olmoe")), ROUND_TRIPS["perft_d-lora"])
    with pytest.raises(UserError, match=r"adapter_config\.json: the model carries adapters that differ"):
        load_adapters(other, out)


def test_save_replaces_only_adapter_directories(tmp_path):
    model = attach_perft(init_model(tiny_config("olmoe")), ROUND_TRIPS["perft_s-lora"])
    out = save_adapters(model, tmp_path / "a")
    with pytest.raises(UserError, match="overwrite=True"):
        save_adapters(model, out)
    randomize_adapters(model, seed=1)
    save_adapters(model, out, overwrite=True)  # an adapter directory is replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    np.testing.assert_array_equal(logits_of(load_adapters(init_model(tiny_config("olmoe")), out)), logits_of(model))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        save_adapters(model, out, overwrite=True)
    with pytest.raises(UserError, match="carries no adapters"):
        save_adapters(init_model(tiny_config("olmoe")), tmp_path / "b")


# ---------------------------------------------------------------------------------------------------------------
# HF PEFT interop (qv_lora)


@pytest.fixture
def peft_required(torch_required):
    return pytest.importorskip("peft", reason="the qv_lora PEFT interop tests need peft (pip install peft)")


def _converted_hf(tmp_path, arch):
    hf = build_hf_model(arch, seed=4)
    hf_dir = save_hf_model(hf, tmp_path / "hf")
    convert_hf_to_jax(hf_dir, tmp_path / "ckpt", show_progress=False)
    return hf, hf_dir, load_model(tmp_path / "ckpt")


@pytest.mark.torch
@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
def test_qv_lora_loads_in_peft(tmp_path, peft_required, arch):
    hf, hf_dir, model = _converted_hf(tmp_path, arch)
    attach_perft(model, PerftConfig(variant="qv_lora", adapter="lora", bottleneck=4, lora_alpha=8.0))
    randomize_adapters(model, seed=6, scale=0.2)  # lora_B random and nonzero
    ids, mask = token_batch(model.config.vocab_size)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    assert rel_l2(ours, hf_logits(hf, ids, mask), mask) > 1e-2  # the LoRA deltas matter
    out = save_adapters(model, tmp_path / "qv", extra_config={"base_model_name_or_path": str(hf_dir)})
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["target_modules"] == ["q_proj", "v_proj"] and "perft_jax" not in raw
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft_required.PeftModel.from_pretrained(hf, str(out)).eval()
    assert not [w for w in caught if "nexpected" in str(w.message)]
    assert rel_l2(ours, hf_logits(peft_model, ids, mask), mask) <= TOL


@pytest.mark.torch
def test_peft_saved_lora_loads_here(tmp_path, peft_required):
    import torch

    hf, _, model = _converted_hf(tmp_path, "olmoe")
    peft_model = peft_required.get_peft_model(hf, peft_required.LoraConfig(
        r=2, lora_alpha=5, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    peft_model.eval().save_pretrained(str(tmp_path / "peft"))
    assert read_adapter_config(tmp_path / "peft") == PerftConfig(variant="qv_lora", adapter="lora", bottleneck=2,
                                                                 lora_alpha=5.0)
    load_adapters(model, tmp_path / "peft")
    ids, mask = token_batch(model.config.vocab_size)
    ours = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    assert rel_l2(ours, hf_logits(peft_model, ids, mask), mask) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# Refusals: one-line UserErrors naming the file and the tensor or key; the model stays untouched


@pytest.fixture
def saved_r(tmp_path):
    model = attach_perft(init_model(tiny_config("olmoe")), ROUND_TRIPS["perft_r-parallel_adapter"])
    return save_adapters(model, tmp_path / "saved")


def _edit_tensors(adapter_dir: pathlib.Path, edit) -> pathlib.Path:
    path = adapter_dir / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    return path


def _refused(adapter_dir, *needles, model=None):
    model = model or init_model(tiny_config("olmoe"))
    with pytest.raises(UserError) as info:
        load_adapters(model, adapter_dir)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, message
    assert not has_adapters(model)  # checks run before anything is attached
    return message


GATE = "model.layers.1.mlp.shared_routing_adapter_gate.weight"
W2 = "model.layers.1.mlp.shared_routing_adapter.3.unit.adapter_w2.weight"


def test_refuses_missing_tensor(saved_r):
    path = _edit_tensors(saved_r, lambda t: t.pop(W2))
    _refused(saved_r, path, "missing tensor", W2)


def test_refuses_unexpected_tensor(saved_r):
    name = "model.layers.0.mlp.shared_routing_adapter.4.unit.adapter_w1.weight"
    path = _edit_tensors(saved_r, lambda t: t.update({name: np.zeros((5, 32), np.float32)}))
    _refused(saved_r, path, "unexpected tensor", name)


def test_refuses_misshaped_tensor(saved_r):
    path = _edit_tensors(saved_r, lambda t: t.update({GATE: np.zeros((5, 32), np.float32)}))
    _refused(saved_r, path, GATE, "[5, 32]", "[4, 32]")


def test_refuses_integer_tensor(saved_r):
    path = _edit_tensors(saved_r, lambda t: t.update({GATE: np.zeros((4, 32), np.int32)}))
    _refused(saved_r, path, GATE, "dtype")


def test_refuses_other_base_model(saved_r):
    mixtral = init_model(tiny_config("mixtral"))
    _refused(saved_r, "adapter_config.json", "perft_jax.base_model.model_type", model=mixtral)


def test_refuses_peft_config_on_other_modules(tmp_path):
    model = attach_perft(init_model(tiny_config("olmoe")), ROUND_TRIPS["qv_lora"])
    out = save_adapters(model, tmp_path / "qv")
    config_path = out / "adapter_config.json"
    raw = json.loads(config_path.read_text())
    for targets in (["q_proj", "k_proj", "v_proj"], ["q_proj"], "q_proj|v_proj"):
        config_path.write_text(json.dumps({**raw, "target_modules": targets}))
        _refused(out, config_path, "target_modules")
        with pytest.raises(UserError, match="target_modules"):
            read_adapter_config(out)
    config_path.write_text(json.dumps({**raw, "use_dora": True}))
    _refused(out, config_path, "use_dora")


def test_refuses_bad_reference_config(saved_r, tmp_path):
    config_path = saved_r / "adapter_config.json"
    raw = json.loads(config_path.read_text())
    del raw["perft_jax"]
    config_path.write_text(json.dumps({**raw, "adapter_type": "IA3"}))
    _refused(saved_r, config_path, "adapter_type")
    config_path.write_text(json.dumps({**raw, "shared_routing_adapter_num_experts_per_tok": 9}))
    _refused(saved_r, config_path, "top_k")
    config_path.write_text(json.dumps({**raw, "embedded_routing_adapter": True}))
    _refused(saved_r, config_path, "embedded_routing_adapter")
    shutil.rmtree(saved_r)
    _refused(saved_r, config_path, "missing adapter config")
