"""Sampling in `generate`: the warpers against HF's torch warpers, top_k=1 against greedy, seeds, streams, one
compilation for every setting, and the distribution of sampled tokens against softmax(warped logits)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from tiny_models import tiny_model_config

from perft_jax import init_model
from perft_jax.errors import UserError
from perft_jax.eval import generate as gen
from perft_jax.eval import sampling

# (temperature, top_k, top_p): each warper alone, all three, and the edges (top_p=0 keeps one token, a top_k above
# the vocabulary keeps all).
SETTINGS = [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.9), (1.3, 20, 0.95), (0.3, 50, 0.3), (1.0, 1000, 0.0),
            (2.0, 1, 0.5)]


def hf_warp(scores: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """transformers' warpers as `_get_logits_processor` builds them for do_sample=True and one beam."""
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    out = torch.from_numpy(np.array(scores))
    for warper in warpers:
        out = warper(None, out)
    return out.numpy()


WARP = jax.jit(sampling.warp)


@pytest.mark.torch
@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_warpers_equal_hf(torch_required, temperature, top_k, top_p):
    """Jitted as in the decode loop: the same float32 scores bit for bit (so the same filter masks), and
    probabilities within float32 softmax rounding (jax's and torch's exp differ by an ulp or so)."""
    import torch

    rng = np.random.default_rng(top_k)
    scores = (rng.standard_normal((8, 300)) * rng.uniform(0.5, 4.0, (8, 1))).astype(np.float32)
    got = np.asarray(WARP(jnp.asarray(scores), sampling.sampling_settings(temperature, top_k, top_p)))
    want = hf_warp(scores, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_array_equal(got, want)
    assert 0 < np.isfinite(got).sum() and (top_k in (0, 1000) and top_p == 1.0 or np.isneginf(got).any())
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(got, axis=-1)), torch.softmax(torch.from_numpy(want), -1),
                               rtol=1e-6, atol=0)
    assert WARP._cache_size() == 1  # one compilation for every setting of this module: they are data


def test_settings_are_checked():
    for kwargs, match in [({"temperature": 0.0}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_p": 1.5}, "top_p"),
                          ({"seed": 1.5}, "seed")]:
        with pytest.raises(UserError, match=match):
            sampling.sampling_settings(**kwargs)


# --- generate with do_sample on a tiny model ---------------------------------------------------------------

_RNG = np.random.default_rng(0)
PROMPTS = [_RNG.integers(3, 64, n).tolist() for n in (5, 11, 8)]
EOS, PAD = 2, 1


@pytest.fixture(scope="module")
def model():
    """A tiny random OLMoE whose head is scaled up: logits of std ~1.5, so temperature and filters matter."""
    model = init_model(tiny_model_config(), seed=0)
    model.lm_head.kernel[...] = 15.0 * model.lm_head.kernel[...]
    return model


def _sample(model, prompts, **kwargs):
    return gen.generate(model, prompts, 8, EOS, PAD, do_sample=True, **kwargs)


def test_top_k_1_equals_greedy(model):
    greedy = gen.generate(model, PROMPTS, 8, EOS, PAD)
    assert _sample(model, PROMPTS, top_k=1, temperature=0.5, seed=3) == greedy
    assert _sample(model, PROMPTS, top_k=1, top_p=0.2, seed=4) == greedy


def test_seeds_streams_and_one_compilation(model):
    first = _sample(model, PROMPTS, seed=7, temperature=1.2)
    compiled = gen._greedy._cache_size()
    assert _sample(model, PROMPTS, seed=7, temperature=1.2) == first  # reproducible
    other = _sample(model, PROMPTS, seed=8, temperature=1.2)
    assert other != first and all(len(row) > 1 for row in other)  # a different seed differs
    # Row 1 alone, with its stream id: the same tokens as inside the batch (the batch and padding do not matter).
    assert _sample(model, [PROMPTS[1]], seed=7, temperature=1.2, streams=[1], pad_batch_to=3) == [first[1]]
    # Identical prompts in separate streams draw separately.
    same = _sample(model, [PROMPTS[0]] * 3, seed=7, temperature=1.2)
    assert same[0] == first[0] and len({tuple(row) for row in same}) > 1
    _sample(model, PROMPTS, seed=1, temperature=0.4, top_k=3, top_p=0.5)
    assert gen._greedy._cache_size() == compiled  # every setting and seed (all 3 x 16 here): one compilation


def test_sampling_with_beams_is_refused(model):
    with pytest.raises(UserError, match="num_beams=2"):
        gen.generate(model, PROMPTS, 4, EOS, PAD, num_beams=2, do_sample=True)
    with pytest.raises(UserError, match="generate: temperature"):
        _sample(model, PROMPTS, temperature=-1.0)


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; categories expected below 5 times are pooled into one."""
    n = counts.sum()
    big = probs * n >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(probs[big], probs[~big].sum()) * n
    keep = expected > 0
    if np.any(observed[~keep] > 0):  # a token drawn that the distribution excludes
        return float("inf"), int(keep.sum()) - 1
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return stat, int(keep.sum()) - 1


@pytest.mark.torch
def test_first_token_distribution(model, torch_required):
    """4096 rows of one prompt, one new token each: the counts fit softmax(HF-warped logits) (chi-square at
    p = 1e-4), and the same counts reject the distribution with the temperature, top-k or top-p ignored."""
    temperature, top_k, top_p, rows = 0.6, 12, 0.85, 4096
    prompt = PROMPTS[1]
    logits = np.asarray(model(jnp.asarray([prompt], jnp.int32)).logits[0, -1], np.float32)[None]

    def probs(t, k, p):
        warped = hf_warp(logits, t, k, p)[0].astype(np.float64)
        e = np.exp(warped - warped.max())
        return e / e.sum()

    tokens = gen.generate(model, [prompt] * rows, 1, EOS, PAD, do_sample=True, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=0)
    counts = np.bincount([row[0] for row in tokens], minlength=logits.shape[-1])
    want = probs(temperature, top_k, top_p)
    assert 3 <= np.count_nonzero(want) < top_k  # top-p cuts inside the top-k: both filters are active
    stat, dof = _chi_square(counts, want)
    bound = scipy.stats.chi2.ppf(1 - 1e-4, dof)
    assert stat < bound
    for wrong in [(1.0, top_k, top_p), (temperature, 0, top_p), (temperature, top_k, 1.0)]:
        assert _chi_square(counts, probs(*wrong))[0] > 10 * bound, wrong
