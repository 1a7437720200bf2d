"""KV-cached decoding, `generate` (greedy and beam search) against HF transformers, and `evaluate` end to end."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import build_hf_model, rel_l2, save_hf_model, tiny_model_config

from perft_jax import init_model, load_model
from perft_jax.convert.hf_to_jax import convert_hf_to_jax
from perft_jax.errors import UserError
from perft_jax.eval.generate import PromptTooLongError, generate
from perft_jax.eval.runner import DEFAULT_MAX_NEW_TOKENS, evaluate
from perft_jax.models.decoder import init_cache
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.attach import attach_perft
from perft_jax.perft.config import PerftConfig

TOL = 1e-5
CONFIGS = {
    "olmoe": tiny_model_config("olmoe", clip_qkv=1.0),
    # A window shorter than the sequence, so the decode mask must drop old keys.
    "mixtral-sliding": tiny_model_config("mixtral", sliding_window=3),
}


def _model(name: str, variant: str):
    model = init_model(CONFIGS[name], seed=1)
    if variant != "none":
        attach_perft(model, PerftConfig(variant=variant))
        # Fresh adapters are (near) zero; randomise them so a decode path that skipped one would show.
        adapters = nnx.state(model, AdapterParam)
        keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(adapters))))
        nnx.update(model, jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), adapters))
    return model


# --- KV cache ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,variant", [("olmoe", "perft_r"), ("olmoe", "qv_lora"),
                                          ("mixtral-sliding", "perft_r")])
def test_cached_decoding_equals_full_forward(name, variant):
    """Two 3-token chunks (a prefill at slot 0, then a chunk at slot 3) + 5 single-token steps over a cache
    give the logits of one full forward; every call is jitted once for its shape (XLA compiles dominate)."""
    model = _model(name, variant)
    chunk, steps = 3, 5
    total = 2 * chunk + steps  # 11 > sliding_window: the decode mask must drop old keys
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 64, (2, total)), jnp.int32)
    mask = np.ones((2, total), np.int32)
    mask[1, :4] = 0  # row 1 is a left-padded prompt, its padding spilling into the second chunk
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0)  # what HF generate feeds
    graphdef, state = nnx.split(model)
    full = jax.jit(lambda s: nnx.merge(graphdef, s)(ids, attention_mask=jnp.asarray(mask),
                                                    position_ids=jnp.asarray(positions)).logits)(state)
    call = jax.jit(lambda s, tok, m, cache: nnx.merge(graphdef, s)(tok, attention_mask=m, cache=cache))

    # Committed like the model's arrays; an uncommitted first cache would compile the first width twice.
    cache, logits = jax.device_put(init_cache(model.config, 2, total), jax.local_devices()[0]), []
    for start, width in [(0, chunk), (chunk, chunk)] + [(i, 1) for i in range(2 * chunk, total)]:
        out = call(state, ids[:, start:start + width], jnp.asarray(mask[:, start:start + width]), cache)
        cache = out.cache
        logits.append(out.logits)
    assert call._cache_size() == 2  # one per width: the write slot is data, not shape
    assert int(cache.length) == total
    np.testing.assert_array_equal(cache.positions, mask.sum(axis=1))
    np.testing.assert_array_equal(cache.key_mask, mask.astype(bool))
    assert rel_l2(jnp.concatenate(logits, axis=1), full, mask) <= TOL


def test_cache_rejects_a_full_width_mask():
    model = _model("olmoe", "none")
    with pytest.raises(ValueError, match="new tokens only"):
        model(jnp.ones((1, 2), jnp.int32), attention_mask=jnp.ones((1, 5), jnp.int32),
              cache=init_cache(model.config, 1, 8))


def test_generate_names_the_prompt_that_is_too_long():
    model = _model("olmoe", "none")  # max_position_embeddings 4096
    with pytest.raises(PromptTooLongError, match="prompt row 1 has 4094 tokens") as err:
        generate(model, [[5] * 3, [5] * 4094], 4, eos_id=2, pad_id=1)
    assert err.value.row == 1


# --- parity with HF generate -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_and_jax(tmp_path_factory, torch_required):
    """A tiny random HF OLMoE and the same weights converted to perft-jax."""
    hf = build_hf_model("olmoe", seed=0)
    root = tmp_path_factory.mktemp("olmoe_generate")
    convert_hf_to_jax(save_hf_model(hf, root / "hf"), root / "ckpt", show_progress=False)
    return hf, load_model(root / "ckpt")


_RNG = np.random.default_rng(0)
PROMPTS = [_RNG.integers(3, 256, n).tolist() for n in (5, 11, 8)]


def hf_generate(hf, prompts, eos_id: int, **kwargs) -> list[list[int]]:
    """HF generate on a left-padded batch; new tokens up to and including the first EOS."""
    import torch

    t = max(map(len, prompts))
    ids = torch.tensor([[1] * (t - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, pad_token_id=1, eos_token_id=eos_id, do_sample=False,
                          **kwargs)[:, t:].tolist()
    return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in out]


@pytest.mark.torch
def test_greedy_matches_hf(hf_and_jax):
    hf, model = hf_and_jax
    # An EOS the model actually emits (row 0's 4th greedy token), so rows stop at different steps.
    eos = generate(model, PROMPTS, 10, eos_id=2, pad_id=1)[0][3]
    want = hf_generate(hf, PROMPTS, eos, max_new_tokens=10)
    assert any(row[-1] == eos for row in want) and any(len(row) == 10 for row in want)
    # Our prompts are padded to 16 columns, HF's to 11: padding must not matter.
    assert generate(model, PROMPTS, 10, eos_id=eos, pad_id=1) == want


# A token some beams end with for this model and these prompts: EOS-terminated hypotheses compete with
# full-length ones, and early_stopping=True picks a different hypothesis for row 1 than False does.
BEAM_EOS = 246


@pytest.mark.torch
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_beam_search_matches_hf(hf_and_jax, early_stopping):
    hf, model = hf_and_jax
    want = hf_generate(hf, PROMPTS, BEAM_EOS, max_new_tokens=6, num_beams=4, early_stopping=early_stopping,
                       length_penalty=1.0)
    if early_stopping is True:  # keep the case meaningful if the tiny model ever changes
        assert any(row[-1] == BEAM_EOS and len(row) < 6 for row in want)
    got = generate(model, PROMPTS, 6, eos_id=BEAM_EOS, pad_id=1, num_beams=4, early_stopping=early_stopping)
    assert got == want


# --- evaluate end to end -----------------------------------------------------------------------------------


class ByteTokenizer:
    """Bytes as ids 4..259; id 0 is the word " 7 true" (the only token the zero-head model below emits)."""

    eos_id, pad_id, bos_id = 2, 1, None
    WORD = " 7 true"

    def encode_batch(self, texts, max_length=None):
        return [[b + 4 for b in text.encode()] for text in texts]

    def decode(self, ids, skip_special_tokens=False):
        out, raw = [], bytearray()
        for i in ids:
            if i >= 4:
                raw.append(i - 4)
                continue
            out.append(raw.decode(errors="replace"))
            raw = bytearray()
            if i == 0:
                out.append(self.WORD)
            elif not skip_special_tokens:
                out.append({1: "<pad>", 2: "<eos>", 3: "<unk>"}[i])
        return "".join(out) + raw.decode(errors="replace")


def test_evaluate_end_to_end(tmp_path):
    cfg = tiny_model_config(vocab_size=260)
    model = init_model(cfg)
    # All logits equal -> argmax picks id 0 at every step: a known generation to score.
    model.lm_head.kernel[...] = jnp.zeros_like(model.lm_head.kernel[...])
    rows = {
        "boolq": [("Please answer the following question with true or false, question: is it?\n\n"
                   "Answer format: true/false", gold) for gold in ("true", "false", "true")],
        "gsm8k": [(f"Tom has {n} apples and gets {7 - n} more. How many?", gold)
                  for n, gold in ((3, "7"), (4, "7.0"), (5, "8"))],
    }
    for name, items in rows.items():
        (tmp_path / name).mkdir()
        records = [{"instruction": q, "input": "", "output": "", "answer": a} for q, a in items]
        (tmp_path / name / "test.json").write_text(json.dumps(records, indent=4))
    out_path = tmp_path / "results" / "eval.json"

    # 4 new tokens and one prompt-length bucket for both files: a single compilation (the test budget).
    summary = evaluate(model, ByteTokenizer(), ["boolq", "gsm8k"], tmp_path, out_path, batch_size=2,
                       max_new_tokens=4, show_progress=False, pad_to_multiple_of=512)

    saved = json.loads(out_path.read_text())
    assert sorted(saved) == ["accuracy", "generations", "macro_average", "n", "settings"]
    assert {k: v for k, v in saved.items() if k != "generations"} == summary
    assert list(out_path.parent.iterdir()) == [out_path]  # the temporary file was renamed, not left behind
    assert saved["settings"]["max_new_tokens"] == {"boolq": 4, "gsm8k": 4}
    assert DEFAULT_MAX_NEW_TOKENS == {"commonsense": 4, "math": 256}  # PERFT.md §7, data README §3
    assert summary["n"] == {"boolq": 3, "gsm8k": 3}
    for name, gens in saved["generations"].items():
        flags = [g["flag"] for g in gens]
        assert [g["index"] for g in gens] == [0, 1, 2]
        assert [g["gold"] for g in gens] == [a for _, a in rows[name]]
        assert summary["accuracy"][name] == pytest.approx(sum(flags) / len(flags))
    boolq, gsm8k = saved["generations"]["boolq"], saved["generations"]["gsm8k"]
    assert boolq[0]["generation"] == ByteTokenizer.WORD * 4
    assert boolq[0]["response"] == "the correct answer is" + ByteTokenizer.WORD * 4
    assert [g["pred"] for g in boolq] == ["true"] * 3 and [g["flag"] for g in boolq] == [True, False, True]
    assert gsm8k[0]["generation"] == ByteTokenizer.WORD * 4
    assert [g["pred"] for g in gsm8k] == [7.0] * 3 and [g["flag"] for g in gsm8k] == [True, True, False]
    assert summary["macro_average"] == pytest.approx(2 / 3)


def test_evaluate_names_the_example_that_is_too_long(tmp_path):
    model = init_model(tiny_model_config(vocab_size=260, max_position_embeddings=300))
    (tmp_path / "gsm8k").mkdir()
    records = [{"instruction": "short", "answer": "1"}, {"instruction": "x" * 300, "answer": "2"}]
    (tmp_path / "gsm8k" / "test.json").write_text(json.dumps(records))
    with pytest.raises(UserError, match="gsm8k: example 1 has 505 prompt tokens"):  # row 0 (210 tokens) fits
        evaluate(model, ByteTokenizer(), ["gsm8k"], tmp_path, tmp_path / "out.json", batch_size=2,
                 max_new_tokens=4, show_progress=False)
    assert not (tmp_path / "out.json").exists()
