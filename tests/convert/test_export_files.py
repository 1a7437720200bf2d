"""What an HF export ships besides the weights: the tokenizer and generation config, through HF -> perft-jax -> HF."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from tiny_models import build_hf_model, hf_logits, save_hf_model, token_batch

from perft_jax import UserError, export_hf, init_model, load_model
from perft_jax.convert import cli
from perft_jax.convert.hf_to_jax import convert_hf_to_jax
from perft_jax.demo import build_tokenizer
from perft_jax.hub import GENERATION_CONFIG

pytestmark = pytest.mark.torch

TEXTS = ["hello world, the correct answer is true", "Is 47 greater than 12? Answer true or false."] * 10
CHAT_TEMPLATE = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def source(tmp_path_factory, torch_required) -> pathlib.Path:
    """An HF model directory as the hub has them: weights, config, generation config, tokenizer with a chat template;
    the model's special-token ids are the tokenizer's."""
    hf_dir = tmp_path_factory.mktemp("export") / "hf"
    tokenizer = build_tokenizer(TEXTS, hf_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(hf_dir))
    model = build_hf_model("olmoe", seed=3, vocab_size=len(tokenizer), bos_token_id=None,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    save_hf_model(model, hf_dir)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", GENERATION_CONFIG} <= \
        {p.name for p in hf_dir.iterdir()}
    return hf_dir


@pytest.fixture(scope="module")
def ckpt(source) -> pathlib.Path:
    out = source.parent / "ckpt"
    convert_hf_to_jax(source, out, show_progress=False)
    return out


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _generation_config(path) -> dict:
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(str(path)).to_dict()


def test_import_keeps_tokenizer_and_generation_config(source, ckpt):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", GENERATION_CONFIG):
        assert (ckpt / name).read_bytes() == (source / name).read_bytes(), name


def test_round_trip_keeps_tokenizer_model_and_generation_config(source, ckpt, tmp_path):
    import torch
    import transformers

    assert cli.main(["--export", "--ckpt", str(ckpt), "--out", str(tmp_path / "back")]) == 0
    want, got = _tokenizer(source), _tokenizer(tmp_path / "back")
    assert len(got) == len(want) > 2
    assert got("hello")["input_ids"] == want("hello")["input_ids"] != []
    assert (got.eos_token_id, got.pad_token_id) == (want.eos_token_id, want.pad_token_id)
    chat = [{"role": "user", "content": "hello"}]
    assert got.apply_chat_template(chat, tokenize=False) == want.apply_chat_template(chat, tokenize=False)
    assert _generation_config(tmp_path / "back") == _generation_config(source)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    ids, mask = token_batch(len(want))
    np.testing.assert_array_equal(hf_logits(back, ids, mask), hf_logits(hf, ids, mask))


def test_export_without_a_tokenizer_source_derives_the_generation_config(source, ckpt, tmp_path, capsys):
    """A base with no tokenizer files: the CLI says the export has none; the generation config is the one
    transformers' save_pretrained writes for that config."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in ckpt.iterdir():
        if path.name not in {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", GENERATION_CONFIG}:
            (bare / path.name).symlink_to(path)
    assert cli.main(["--export", "--ckpt", str(bare), "--out", str(tmp_path / "out")]) == 0
    assert "holds no tokenizer files, so the export has none" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", GENERATION_CONFIG,
                                                                     "model.safetensors"]
    assert _generation_config(tmp_path / "out") == _generation_config(source)
    # --tokenizer ships one from elsewhere (here the HF source directory).
    assert cli.main(["--export", "--ckpt", str(bare), "--out", str(tmp_path / "with"), "--tokenizer",
                     str(source)]) == 0
    assert _tokenizer(tmp_path / "with")("hello")["input_ids"] == _tokenizer(source)("hello")["input_ids"]


def test_python_export_takes_a_tokenizer_directory(source, ckpt, tmp_path):
    """`export_hf` of a model that never came from HF, with the tokenizer of a directory; a directory without
    tokenizer files is refused before anything is written."""
    model = load_model(ckpt)
    export_hf(model, tmp_path / "hf", tokenizer=source)
    assert _tokenizer(tmp_path / "hf")("hello")["input_ids"] == _tokenizer(source)("hello")["input_ids"]
    assert json.loads((tmp_path / "hf" / GENERATION_CONFIG).read_text()) == \
        json.loads((source / GENERATION_CONFIG).read_text())
    (tmp_path / "empty").mkdir()
    random_model = init_model(model.config, seed=1)
    with pytest.raises(UserError, match=r"empty: holds no tokenizer files \(any of tokenizer.json, "):
        export_hf(random_model, tmp_path / "nothing", tokenizer=tmp_path / "empty")
    with pytest.raises(UserError, match="no such tokenizer directory"):
        export_hf(random_model, tmp_path / "nothing", tokenizer=tmp_path / "missing")
    assert not (tmp_path / "nothing").exists()
