"""Tests for perft_jax.perft.efficiency and the `python -m perft_jax.params` CLI (spec/PERFT.md §5).

Expected counts are written out by formula from the model's layout and PERFT.md §5 (S: a; D: M·a;
R: M·a + M·H trainable, K·a + M·H activated; E: N·a trainable, k·a activated; a = 2·H·r), never taken
from the code under test. Full-size totals are the published ones (OLMoE-1B-7B: 6.92 B total, 1.28 B
active; Mixtral-8x7B: 46.7 B total, 12.9 B active).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest
import yaml
from tiny_models import tiny_model_config

from perft_jax import params
from perft_jax.checkpoint.base import write_manifest
from perft_jax.models.config import ModelConfig
from perft_jax.models.hf_config import read_hf_config_file
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.efficiency import efficiency_report, format_report, human, percent

REPO = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs" / "perft").glob("*.yaml"))

V, H, I, L, NH, NKV, HD, N, K_BASE = 256, 64, 32, 2, 4, 2, 16, 8, 2
TINY = tiny_model_config(vocab_size=V, hidden_size=H, intermediate_size=I, num_layers=L, num_heads=NH,
                         num_kv_heads=NKV, head_dim=HD, num_experts=N, num_experts_per_tok=K_BASE)
TINY_HF = {"model_type": "olmoe", "vocab_size": V, "hidden_size": H, "intermediate_size": I,
           "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": NKV, "num_experts": N,
           "num_experts_per_tok": K_BASE, "norm_topk_prob": False, "pad_token_id": 1, "eos_token_id": 2}


def base_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, activated per token) of the base model, written out layer by layer."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    attention = h * q + 2 * h * kv + q * h + ((q + kv) if cfg.qk_norm else 0)
    norms = 2 * h
    router = h * cfg.num_experts
    one_expert = 3 * h * cfg.intermediate_size  # gate, up, down
    embed_head = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h  # + final norm
    total = embed_head + cfg.num_layers * (attention + norms + router + cfg.num_experts * one_expert)
    active = embed_head + cfg.num_layers * (attention + norms + router + cfg.num_experts_per_tok * one_expert)
    return total, active


def adapter_counts(cfg: ModelConfig, p: PerftConfig) -> tuple[int, int]:
    """(trainable, activated trainable per token) by PERFT.md §5."""
    h, r, m, k = cfg.hidden_size, p.bottleneck, p.num_adapters, p.top_k
    a = 2 * h * r
    per_layer = {
        "none": (0, 0),
        "perft_s": (a, a),
        "perft_d": (m * a, m * a),
        "perft_r": (m * a + m * h, k * a + m * h),
        "perft_e": (cfg.num_experts * a, cfg.num_experts_per_tok * a),
        # LoRA A (H, r) and B (r, out) on q_proj (out = heads * hd) and v_proj (out = kv heads * hd).
        "qv_lora": ((h * r + r * cfg.num_heads * cfg.head_dim) + (h * r + r * cfg.num_kv_heads * cfg.head_dim),) * 2,
    }[p.variant]
    return per_layer[0] * cfg.num_layers, per_layer[1] * cfg.num_layers


VARIANT_CASES = [
    PerftConfig(variant="none"),
    PerftConfig(variant="perft_s", bottleneck=4),
    PerftConfig(variant="perft_d", bottleneck=4, num_adapters=3),
    PerftConfig(variant="perft_r", bottleneck=4, num_adapters=4, top_k=2),
    PerftConfig(variant="perft_r", adapter="lora", bottleneck=8, num_adapters=6, top_k=1),
    PerftConfig(variant="perft_r", bottleneck=4, num_adapters=4, top_k=2, router="dynmole"),
    PerftConfig(variant="perft_e", bottleneck=4),
    PerftConfig(variant="perft_e", adapter="lora", bottleneck=2),
    PerftConfig(variant="qv_lora", adapter="lora", bottleneck=8, lora_alpha=16),
]


@pytest.mark.parametrize("model_cfg", [TINY, TINY.replace(tie_word_embeddings=True, qk_norm=False)],
                         ids=["untied-qknorm", "tied"])
@pytest.mark.parametrize("perft_cfg", VARIANT_CASES, ids=lambda p: f"{p.variant}-{p.adapter}-{p.router}")
def test_tiny_counts_match_formulas(model_cfg, perft_cfg):
    base_total, base_active = base_counts(model_cfg)
    trainable, act_trainable = adapter_counts(model_cfg, perft_cfg)
    rep = efficiency_report(model_cfg, perft_cfg)
    assert (rep.base_total, rep.base_activated) == (base_total, base_active)
    assert (rep.trainable_params, rep.activated_trainable_params_per_token) == (trainable, act_trainable)
    assert rep.total_params == base_total + trainable
    assert rep.activated_params_per_token == base_active + act_trainable
    assert rep.activated_efficiency == pytest.approx(act_trainable / (base_active + act_trainable), rel=1e-12)
    assert rep.trainable_fraction == pytest.approx(trainable / (base_total + trainable), rel=1e-12)
    assert rep.dynamic_k == (perft_cfg.router == "dynmole" and perft_cfg.variant == "perft_r")


def test_tiny_hand_numbers():
    """One case spelled out in digits: PERFT-R (M, K) = (4, 2), D_B = 4 on the tiny model."""
    rep = efficiency_report(TINY, PerftConfig(variant="perft_r", bottleneck=4, num_adapters=4, top_k=2))
    # per layer: attention 4096+2048+2048+4096 + q/k norm 64+32, norms 128, router 512, experts 8 * 6144
    assert rep.base_total == 256 * 64 * 2 + 64 + 2 * (12288 + 96 + 128 + 512 + 8 * 6144)
    assert rep.base_activated == 256 * 64 * 2 + 64 + 2 * (12288 + 96 + 128 + 512 + 2 * 6144)
    assert rep.trainable_params == 2 * (4 * 512 + 4 * 64) == 4608  # a = 2 * 64 * 4 = 512
    assert rep.activated_trainable_params_per_token == 2 * (2 * 512 + 4 * 64) == 2560


def test_olmoe_published_totals():
    cfg, _, _ = read_hf_config_file(REPO / "configs/hf/olmoe-1b-7b.json")
    rep = efficiency_report(cfg, PerftConfig(variant="perft_r", bottleneck=32, num_adapters=8, top_k=2))
    assert round(rep.base_total / 1e9, 2) == 6.92  # OLMoE paper / model card: 6.92 B total
    assert round(rep.base_activated / 1e9, 2) == 1.28  # 1.28 B active per token
    assert (rep.base_total, rep.base_activated) == base_counts(cfg)
    a = 2 * 2048 * 32
    assert rep.trainable_params == 16 * (8 * a + 8 * 2048)
    assert rep.activated_trainable_params_per_token == 16 * (2 * a + 8 * 2048)


def test_mixtral_published_totals():
    cfg, _, _ = read_hf_config_file(REPO / "configs/hf/mixtral-8x7b.json")
    rep = efficiency_report(cfg, PerftConfig(variant="perft_e", bottleneck=32))
    assert round(rep.base_total / 1e9, 1) == 46.7  # Mixtral paper: 46.7 B total, 12.9 B active
    assert round(rep.base_activated / 1e9, 1) == 12.9
    assert (rep.base_total, rep.base_activated) == base_counts(cfg)
    assert rep.activated_trainable_params_per_token == 32 * 2 * (2 * 4096 * 32)


def test_formatting():
    assert human(1_282_017_280) == "1.28 B"
    assert human(6_291_456) == "6.29 M"
    assert human(512) == "512"
    assert percent(0.0034643) == "0.3464 %"
    assert percent(0.00017959) == "0.01796 %"
    text = format_report(efficiency_report(TINY, VARIANT_CASES[5]))
    assert "activated efficiency" in text and "keep-top-k floor" in text
    assert all(len(line) <= 160 for line in text.splitlines())


# --- the CLI -----------------------------------------------------------------------------------------------

def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = params.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_cli_on_shipped_configs(capsys, path):
    data = yaml.safe_load(path.read_text())
    assert set(data) == {"model", "perft"}
    rc, out, err = run_cli(capsys, "--config", path)
    assert rc == 0, err
    assert "activated efficiency" in out and "trainable parameters" in out and "%" in out
    model_name = "olmoe" if path.name.startswith("olmoe") else "mixtral"
    assert f"model: {model_name}" in out
    assert ("keep-top-k floor" in out) == ("dynmole" in path.name)


def test_shipped_set_is_complete():
    names = {p.name for p in SHIPPED}
    for model in ("olmoe-1b-7b", "mixtral-8x7b"):
        for suffix in ("perft-r", "perft-s", "perft-d", "perft-e", "qv-lora", "perft-r-dynmole"):
            assert f"{model}-{suffix}.yaml" in names


def test_cli_all_variants(capsys):
    rc, out, err = run_cli(capsys, "--config", REPO / "configs/perft/olmoe-1b-7b-perft-r.yaml", "--all-variants")
    assert rc == 0, err
    rows = [line.split()[0] for line in out.splitlines()[3:8]]
    assert rows == ["perft_s", "perft_d", "perft_r", "perft_e", "qv_lora"]


def write_config(tmp_path: pathlib.Path, perft: dict | None = None, model: dict | None = None, **extra) -> pathlib.Path:
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_HF))
    data = {"model": model if model is not None else {"hf_config": "tiny.json"}, **extra}
    if perft is not None:
        data["perft"] = perft
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


R_CFG = {"variant": "perft_r", "bottleneck": 4, "num_adapters": 4, "top_k": 2}


def test_cli_tiny_counts_and_overrides(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the hf_config path resolves against the YAML's folder, not the cwd
    path = write_config(tmp_path, R_CFG, data={"cutoff_len": 64}, train={"max_steps": 3})  # other sections: fine
    rc, out, err = run_cli(capsys, "--config", path, "perft.top_k=1")
    assert rc == 0, err
    trainable, act = adapter_counts(TINY, PerftConfig(**{**R_CFG, "top_k": 1}))
    assert f"{trainable:,}" in out and f"{act:,}" in out


def test_cli_hf_config_relative_to_cwd(capsys, tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    write_config(tmp_path, R_CFG)
    path = tmp_path / "sub" / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"hf_config": "tiny.json"}, "perft": R_CFG}))
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, "--config", path)
    assert rc == 0, err


def test_cli_checkpoint_manifest(capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_manifest(ckpt, TINY)
    path = write_config(tmp_path, R_CFG, model={"checkpoint": "ckpt"})
    rc, out, err = run_cli(capsys, "--config", path)
    assert rc == 0, err
    base_total, _ = base_counts(TINY)
    assert f"{base_total:,}" in out


def test_cli_module_entry_point(tmp_path):
    path = write_config(tmp_path, R_CFG)
    proc = subprocess.run([sys.executable, "-m", "perft_jax.params", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "activated efficiency" in proc.stdout


BAD = [
    ({"perft": R_CFG, "extra": {"foo": 1}}, [], "foo"),
    ({"perft": {**R_CFG, "foo": 1}}, [], "perft.foo"),
    ({"perft": {**R_CFG, "variant": "perft_x"}}, [], "perft.variant"),
    ({"perft": R_CFG}, ["perft.top_k=5"], "perft.top_k"),
    ({"perft": {**R_CFG, "bottleneck": 0}}, [], "perft.bottleneck"),
    ({"perft": R_CFG}, ["perft.bottleneck=-3"], "perft.bottleneck"),
    ({"perft": {**R_CFG, "num_adapters": 3, "router": "dynmole", "dynmole": {"keep_top_k": 4}}}, [],
     "perft.dynmole.keep_top_k"),
    ({"perft": {**R_CFG, "num_adapters": 1, "top_k": 1, "router": "dynmole", "dynmole": {"keep_top_k": 2}}}, [],
     "perft.dynmole"),
    ({"perft": {**R_CFG, "top_k": 3, "adapter_gate_weights": "base_router_rank"}}, [], "perft.top_k"),
    ({"perft": R_CFG, "model": {"hf_config": "missing.json"}}, [], "missing.json"),
    ({"perft": R_CFG, "model": {"checkpoint": "no_ckpt"}}, [], "no_ckpt"),
    ({"perft": R_CFG, "model": {"hf_config": "tiny.json", "dtyp": "bfloat16"}}, [], "model.dtyp: unknown key"),
    ({"perft": R_CFG, "model": {}}, [], "model"),
    ({"perft": R_CFG}, ["perft.top_k"], "perft.top_k"),
]


@pytest.mark.parametrize("data,overrides,named", BAD, ids=[case[2] for case in BAD])
def test_cli_bad_input(capsys, tmp_path, data, overrides, named):
    data = dict(data)
    perft, model = data.pop("perft", None), data.pop("model", None)
    extra = data.pop("extra", {})
    path = write_config(tmp_path, perft, model, **extra)
    rc, out, err = run_cli(capsys, "--config", path, *overrides)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert named in lines[0]


def test_cli_bad_files(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "--config", tmp_path / "nope.yaml")
    assert rc == 2 and "nope.yaml" in err and len(err.strip().splitlines()) == 1
    no_model = tmp_path / "no_model.yaml"
    no_model.write_text("perft: {variant: perft_s}\n")
    rc, _, err = run_cli(capsys, "--config", no_model)
    assert rc == 2 and "error: model:" in err
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    path = write_config(tmp_path, R_CFG, model={"hf_config": "bad.json"})
    rc, _, err = run_cli(capsys, "--config", path)
    assert rc == 2 and "bad.json" in err and len(err.strip().splitlines()) == 1


def test_variant_configs_keep_shape():
    cfg = PerftConfig(variant="perft_r", bottleneck=16, num_adapters=8, top_k=2)
    variants = params.variant_configs(cfg)
    assert [v.variant for v in variants] == list(params.VARIANTS)
    assert all(v.bottleneck == 16 for v in variants)
    assert variants[-1].adapter == "lora" and variants[-1].lora_alpha == 32  # qv_lora: r = D_B, alpha = 2r
    assert dataclasses.replace(variants[-1], variant="perft_r", adapter="parallel_adapter", lora_alpha=16.0) == cfg
