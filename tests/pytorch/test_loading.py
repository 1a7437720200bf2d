"""perft_jax.pytorch beyond parity: the reference code's own numbers, older directories, refusals, training, and
its isolation from the rest of perft_jax."""
from __future__ import annotations

import ast
import copy
import json
import pathlib

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from testing_utils import REPO_ROOT
from tiny_models import build_hf_model, hf_logits, rel_l2, token_batch

from perft_jax import UserError, save_adapters
from perft_jax.perft.attach import attach_perft as attach_jax
from perft_jax.perft.config import PerftConfig
from perft_jax.pytorch import attach_perft, load_perft_adapters, read_perft_config, read_perft_metadata

pytestmark = pytest.mark.torch

PERFT_R = PerftConfig(variant="perft_r", adapter="parallel_adapter", bottleneck=4, num_adapters=4, top_k=2)
QUIRK = {"adapter_gate_weights": "base_router_rank"}


@pytest.fixture(scope="module")
def saved_r(tiny_bases, tmp_path_factory):
    """A PERFT-R directory saved by perft_jax for the tiny OLMoE base (near-zero init: enough for loading)."""
    _, _, jax_base = tiny_bases("olmoe")
    model = attach_jax(nnx.clone(jax_base), PERFT_R, seed=2)
    return save_adapters(model, tmp_path_factory.mktemp("saved_r") / "adapters",
                         extra_config={"base_model_name_or_path": "tiny-olmoe"})


def test_reference_golden_cases(shared_dir):
    """Directories written by the reference PERFT code reproduce its own logits (shared/data/perft_official_cases)."""
    root = shared_dir / "data" / "perft_official_cases"
    for case in ("olmoe-S-lora", "olmoe-D-par", "olmoe-E-par", "olmoe-R-par-quirk", "mixtral-R-par",
                 "mixtral-E-lora"):
        expected = np.load(root / case / "expected.npz")
        model = transformers.AutoModelForCausalLM.from_pretrained(root / case / "hf", dtype=torch.float32)
        load_perft_adapters(model, root / case / "adapters", QUIRK if "quirk" in case else None)
        got = hf_logits(model, expected["input_ids"], expected["attention_mask"])
        error = rel_l2(got, expected["logits"], expected["attention_mask"])
        assert error <= 1e-5, f"{case}: relative L2 error {error:.3g}"


def test_reads_config_and_metadata_back(saved_r):
    assert read_perft_config(saved_r) == PERFT_R
    meta = read_perft_metadata(saved_r)
    assert meta["base_model"]["architecture"] == "OlmoeForCausalLM"
    assert meta["base_model"]["name_or_path"] == "tiny-olmoe"
    assert meta["versions"]["transformers"] == transformers.__version__


def _strip_to_reference(adapter_dir: pathlib.Path) -> None:
    """Make `adapter_dir` what the reference code writes: its config keys only, no header metadata."""
    config = adapter_dir / "adapter_config.json"
    raw = json.loads(config.read_text())
    del raw["perft_jax"]
    config.write_text(json.dumps(raw))
    weights = adapter_dir / "adapter_model.safetensors"
    safetensors.numpy.save_file(safetensors.numpy.load_file(weights), weights)


def test_reference_format_directory_loads(tiny_bases, tmp_path):
    """The reference code's format (its config keys only; no metadata) loads as our own directory does. (Older
    perft_jax formats: tests/perft/test_adapter_metadata.py; both runtimes read directories with the same code.)"""
    hf_base, _, jax_base = tiny_bases("olmoe")
    model = attach_jax(nnx.clone(jax_base), PERFT_R, seed=5)
    current = save_adapters(model, tmp_path / "current")
    older = save_adapters(model, tmp_path / "older")
    _strip_to_reference(older)
    current_model = load_perft_adapters(copy.deepcopy(hf_base), current)
    older_model = load_perft_adapters(copy.deepcopy(hf_base), older)
    assert older_model.perft_config == current_model.perft_config == PERFT_R
    want = current_model.state_dict()
    got = older_model.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    ids, mask = token_batch(256)
    np.testing.assert_array_equal(hf_logits(older_model, ids, mask), hf_logits(current_model, ids, mask))


def test_refusals_leave_the_model_untouched(tiny_bases, saved_r, tmp_path):
    hf_base, _, _ = tiny_bases("olmoe")
    mixtral = build_hf_model("mixtral", seed=0)
    with pytest.raises(UserError, match=r"adapter_config\.json: perft_jax\.base_model\.model_type"):
        load_perft_adapters(mixtral, saved_r)
    assert getattr(mixtral, "perft_config", None) is None and not hasattr(mixtral.model.layers[0].mlp,
                                                                          "shared_routing_adapter")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((saved_r / "adapter_config.json").read_text())
    tensors = safetensors.numpy.load_file(saved_r / "adapter_model.safetensors")
    del tensors["model.layers.1.mlp.shared_routing_adapter.3.unit.adapter_w2.weight"]
    safetensors.numpy.save_file(tensors, broken / "adapter_model.safetensors")
    model = copy.deepcopy(hf_base)
    with pytest.raises(UserError, match=r"adapter_model\.safetensors: missing tensor model\.layers\.1\.mlp\."
                                        r"shared_routing_adapter\.3\.unit\.adapter_w2\.weight"):
        load_perft_adapters(model, broken)
    assert getattr(model, "perft_config", None) is None
    load_perft_adapters(model, saved_r)
    with pytest.raises(UserError, match="already carries PERFT adapters"):
        load_perft_adapters(model, saved_r)
    with pytest.raises(UserError, match="expected a transformers model of type olmoe or mixtral"):
        attach_perft(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)),
            PERFT_R)
    with pytest.raises(UserError, match=r"perft\.top_k: expected at most the base top-k=2"):
        attach_perft(copy.deepcopy(hf_base), PerftConfig(variant="perft_r", num_adapters=4, top_k=3, **QUIRK))


def test_attached_adapters_train(tiny_bases):
    """Fresh adapters start at the base (zero second matrices), train alone, and survive a deep copy."""
    hf_base, _, _ = tiny_bases("mixtral")
    model = attach_perft(copy.deepcopy(hf_base), PerftConfig(variant="perft_r", num_adapters=4, top_k=2,
                                                            init="zero"), seed=3)
    ids, mask = token_batch(256)
    np.testing.assert_array_equal(hf_logits(model, ids, mask), hf_logits(hf_base, ids, mask))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".shared_routing_adapter" in name for name in trainable)
    model.train()
    batch = torch.from_numpy(ids)
    model(batch, attention_mask=torch.from_numpy(mask), labels=batch).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    # W2 starts at zero, so W1 and the router get no gradient yet; W2 does.
    assert all(g is not None and g.abs().sum() > 0 for name, g in grads.items() if "adapter_w2" in name)
    twin = copy.deepcopy(model).eval()
    with torch.no_grad():
        twin.model.layers[0].mlp.shared_routing_adapter[0].unit.adapter_w2.weight.fill_(1.0)
    assert rel_l2(hf_logits(twin, ids, mask), hf_logits(model.eval(), ids, mask)) > 1e-3  # the copy is its own


def test_no_other_module_imports_the_runtime():
    """perft_jax.pytorch needs torch; nothing else in the package may import it (only users and tests do)."""
    package = REPO_ROOT / "perft_jax"
    for path in package.rglob("*.py"):
        if (package / "pytorch") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("perft_jax.pytorch") for n in names), f"{path} imports perft_jax.pytorch"
