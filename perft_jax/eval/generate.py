"""Batched greedy, sampling and beam-search generation with the model's KV cache.

The evaluation protocol (shared/data/llm_adapters/README.md §3, spec/PERFT.md §7) decodes left-padded prompts
with HF `generate`: beam search with 4 beams in the reference, greedy as the cheap default here. Both loops
below reproduce transformers 5.23's `GenerationMixin` token for token (tests/eval/test_generate.py):

- greedy (`_sample` with `do_sample=False`): argmax of the float32 logits; a row that emitted EOS is
  padded with `pad_id` from then on; the loop stops when every row is done or after `max_new_tokens`.
- beam search (`_beam_search`): per prompt, the top 2N of N x V accumulated log-probabilities; candidates
  ending in EOS among the top N become finished hypotheses scored `sum_logprobs / new_tokens ** length_penalty`;
  the best N others keep running; reaching `max_new_tokens` finishes every candidate; `early_stopping`
  (False | True | "never") decides when a prompt can stop, exactly as HF's heuristic does. The length counts
  new tokens only (transformers >= 4.4x; older releases divided by the full length, prompt included).
- sampling (`_sample` with `do_sample=True`): the greedy loop, drawing each token from the temperature /
  top-k / top-p warped distribution instead of taking the argmax (eval/sampling.py: HF's warpers, their
  order and defaults; each row its own random stream, so a row's tokens do not depend on its batch).

One prefill writes the prompts into the cache, then a `jax.lax.while_loop` decodes one token per step, so a
call compiles once per (batch, padded length, max_new_tokens, num_beams, greedy or sampling): the
sampling settings, seed, EOS / pad ids and beam settings are data. Prompts are left-padded to a multiple of
`pad_to_multiple_of` and the batch to `pad_batch_to` rows to reuse compilations; neither changes the result,
because positions come from the attention mask and every row is decoded independently of the others.

On a device mesh (a model placed by `shard_model` / `load_model(mesh=...)`), the rows are split over the batch
axes (`activation_batch`; the batch is padded to a multiple of their size with copies of the last prompt), the
parameters stay where they were placed, and XLA partitions the cache like the rows. Every process passes the
same prompts and gets all results back.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from perft_jax.distributed import global_batch, to_host
from perft_jax.errors import UserError
from perft_jax.eval import sampling
from perft_jax.models.decoder import KVCache, MoeForCausalLM, init_cache
from perft_jax.sharding import LogicalSharding, model_sharding

# HF's "impossible" score: added to mask candidates out (not -inf, so sums stay finite and ties stay ties).
_NEG = -1.0e9


class PromptTooLongError(UserError):
    """A prompt does not leave room for the requested new tokens; `row` is its index in the batch."""

    def __init__(self, row: int, message: str):
        super().__init__(message)
        self.row = row


def generate(model: MoeForCausalLM, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int,
             pad_id: int, num_beams: int = 1, *, early_stopping: bool | str = False, length_penalty: float = 1.0,
             max_cache_len: int | None = None, pad_to_multiple_of: int = 16, pad_batch_to: int | None = None,
             do_sample: bool = False, temperature: float = sampling.DEFAULT_TEMPERATURE,
             top_k: int = sampling.DEFAULT_TOP_K, top_p: float = sampling.DEFAULT_TOP_P, seed: int = 0,
             streams: Sequence[int] | None = None) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens: greedy, sampled, or by beam search (`num_beams > 1`).

    Args:
        model: the LM (adapters included); run in eval mode (dropout off) without changing the caller's model.
        prompt_ids: B prompts of token ids (BOS included if the tokenizer adds one), of any lengths >= 1.
        max_new_tokens: the most tokens to generate per prompt.
        eos_id: the token that ends a row (or a hypothesis).
        pad_id: the token used for left padding (masked out; its value does not change the result).
        num_beams: 1 = greedy; N > 1 = beam search with N beams per prompt, the best hypothesis returned.
        early_stopping, length_penalty: beam search only, with HF's meaning and defaults.
        max_cache_len: the most real tokens (prompt + new) per row; default: the model's
            `max_position_embeddings`.
        pad_to_multiple_of: round the padded prompt length up to this multiple (fewer distinct compilations).
        pad_batch_to: repeat the last prompt up to this many rows (one compilation for a ragged last batch).
        do_sample: draw each token from softmax(warped logits) instead of the argmax (one beam only).
        temperature, top_k, top_p: sampling only; HF's meaning and defaults (top_k=0 / top_p=1 disable a filter).
        seed: sampling only: the PRNG key's seed (`jax.random.key(seed)`).
        streams: sampling only: each prompt's random stream id (default: its row index); a caller splitting one
            list of prompts into batches passes the prompts' indices in the list, so the split does not matter.

    Returns:
        B lists of new token ids: up to and including the first EOS, else all `max_new_tokens` tokens.

    Raises:
        PromptTooLongError (a UserError): a prompt longer than `max_cache_len - max_new_tokens`; names the row.
        UserError: empty batch or prompt, bad `max_new_tokens`, `num_beams`, `early_stopping` or sampling setting;
            sampling with several beams.
    """
    if not prompt_ids:
        raise UserError("generate: no prompts")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise UserError(f"generate: num_beams must be a positive integer, got {num_beams!r}")
    if early_stopping not in (False, True, "never"):
        raise UserError(f"generate: early_stopping must be False, True or 'never', got {early_stopping!r}")
    settings = None
    if do_sample:
        if num_beams > 1:
            raise UserError(f"generate: do_sample samples with one beam; got num_beams={num_beams} (beam sampling "
                            "is not supported)")
        try:
            settings = sampling.sampling_settings(temperature, top_k, top_p, seed)
        except UserError as e:
            raise UserError(f"generate: {e}") from None
        if streams is not None and len(streams) != len(prompt_ids):
            raise UserError(f"generate: {len(streams)} streams for {len(prompt_ids)} prompts")
    budget = model.config.max_position_embeddings if max_cache_len is None else max_cache_len
    for row, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise UserError(f"generate: prompt row {row} is empty")
        if len(ids) + max_new_tokens > budget:
            raise PromptTooLongError(row, f"generate: prompt row {row} has {len(ids)} tokens; with "
                                          f"max_new_tokens={max_new_tokens} it exceeds the cache budget of "
                                          f"{budget} tokens")
    logical = model_sharding(model)
    rows = max(len(prompt_ids), pad_batch_to or 0)
    if logical is not None:  # whole rows per device: a multiple of the batch shards
        shards = _batch_shards(logical)
        rows = -(-rows // shards) * shards
    ids, mask = _left_pad(prompt_ids, pad_id, pad_to_multiple_of, rows)
    batch = {"ids": ids, "mask": mask}
    if settings is not None:
        # Padding rows copy the last prompt and its stream: the same tokens, so they never extend the loop.
        stream_ids = list(range(len(prompt_ids)) if streams is None else streams)
        batch["streams"] = np.asarray(stream_ids + stream_ids[-1:] * (rows - len(prompt_ids)), np.int32)
    if logical is None:
        batch = {name: jnp.asarray(value) for name, value in batch.items()}
    else:
        batch = {name: global_batch({name: value}, logical.batch_sharding(value.shape))[name]
                 for name, value in batch.items()}
    ids, mask = batch["ids"], batch["mask"]
    # Dropout off in a view: the caller's module keeps its own mode.
    graphdef, state = nnx.split(nnx.view(model, only=nnx.Dropout, deterministic=True, raise_if_not_found=False))
    args = (graphdef, state, ids, mask, jnp.int32(eos_id), jnp.int32(pad_id))
    if num_beams == 1:
        # Greedy (settings None) and sampling are two compilations; any settings and seed share the second.
        tokens, lengths = _greedy(*args, settings=settings, streams=batch.get("streams"),
                                  max_new_tokens=max_new_tokens)
    else:
        # The early-stopping mode and length penalty are data, so one compilation serves every setting.
        tokens, lengths = _beam_search(*args, jnp.bool_(early_stopping is True), jnp.bool_(early_stopping == "never"),
                                       jnp.float32(length_penalty), max_new_tokens=max_new_tokens,
                                       num_beams=num_beams)
    tokens, lengths = to_host(tokens), to_host(lengths)
    return [tokens[i, :lengths[i]].tolist() for i in range(len(prompt_ids))]


def _batch_shards(logical: LogicalSharding) -> int:
    """How many ways the batch axes split the rows (size-1 mesh axes count once)."""
    return int(np.prod([logical.mesh.shape[a] for a in logical.mesh_axes("activation_batch")]))


def _left_pad(prompt_ids, pad_id: int, multiple: int, batch_to: int | None) -> tuple[np.ndarray, np.ndarray]:
    """ids / mask [B', T]: prompts right-aligned, T = the longest prompt rounded up to `multiple`."""
    rows = [list(p) for p in prompt_ids]
    if batch_to is not None and len(rows) < batch_to:
        rows += [rows[-1]] * (batch_to - len(rows))  # a copy of a real row: never changes when the loop stops
    longest = max(len(r) for r in rows)
    t = -(-longest // max(multiple, 1)) * max(multiple, 1)
    ids = np.full((len(rows), t), pad_id, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return ids, mask


def _prefill(graphdef, state, ids, mask, max_new_tokens: int) -> tuple[jax.Array, KVCache]:
    """Write the prompts into a fresh cache of T + max_new_tokens slots; last-position logits [B, V] float32."""
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.config, ids.shape[0], ids.shape[1] + max_new_tokens)
    out = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)
    return out.logits[:, -1].astype(jnp.float32), out.cache


def _decode(graphdef, state, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Append one token per row [B]; next logits [B, V] float32 and the cache."""
    out = nnx.merge(graphdef, state)(tokens[:, None], cache=cache, logits_to_keep=1)
    return out.logits[:, -1].astype(jnp.float32), out.cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _greedy(graphdef, state, ids, mask, eos_id, pad_id, settings: sampling.SamplingSettings | None = None,
            streams: jax.Array | None = None, *, max_new_tokens: int):
    """tokens [B, max_new_tokens] int32 (pad after EOS) and lengths [B] (EOS included); the argmax at every step,
    or with `settings` a draw from the warped distribution, from each row's random stream (`streams` [B] int32)."""
    b = ids.shape[0]
    keys = None if settings is None else sampling.row_keys(settings, streams)
    logits, cache = _prefill(graphdef, state, ids, mask, max_new_tokens)

    def body(carry):
        step, logits, cache, tokens, lengths, done, _ = carry
        if settings is None:
            pick = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            pick = sampling.sample(keys, step, logits, settings)
        nxt = jnp.where(done, pad_id, pick)
        tokens = tokens.at[:, step].set(nxt)
        lengths = jnp.where(done, lengths, step + 1)
        done = done | (nxt == eos_id)
        more = (step + 1 < max_new_tokens) & ~jnp.all(done)
        # Skip the forward after the last token instead of computing logits nobody reads.
        logits, cache = jax.lax.cond(more, lambda: _decode(graphdef, state, nxt, cache), lambda: (logits, cache))
        return step + 1, logits, cache, tokens, lengths, done, more

    carry = (jnp.int32(0), logits, cache, jnp.full((b, max_new_tokens), pad_id, jnp.int32),
             jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), jnp.bool_(True))
    carry = jax.lax.while_loop(lambda c: c[-1], body, carry)
    return carry[3], carry[4]


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, K, ...] rows picked per prompt by idx [B, N] -> [B, N, ...] (HF `_gather_beams`)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "num_beams"))
def _beam_search(graphdef, state, ids, mask, eos_id, pad_id, stop_when_full, never_stop, length_penalty, *,
                 max_new_tokens: int, num_beams: int):
    """Best hypothesis per prompt: tokens [B, max_new_tokens] int32 (pad-filled) and lengths [B].

    Mirrors transformers 5.23 `GenerationMixin._beam_search` with one EOS token: `running_*` are the N live
    beams of each prompt, `finished_*` the N best finished hypotheses (slots start empty at score -1e9).
    Beam row b * N + j of the cache is beam j of prompt b, as HF's `repeat_interleave` expansion.
    `stop_when_full` / `never_stop` (bool scalars) encode HF's early_stopping=True / "never".
    """
    b, n, m = ids.shape[0], num_beams, max_new_tokens
    keep = 2 * n  # HF beams_to_keep = max(2, 1 + number of EOS tokens) * N
    logits, cache = _prefill(graphdef, state, ids, mask, m)
    # The N beams of a prompt share its prefill: repeat rows instead of prefilling N copies.
    logits = jnp.repeat(logits, n, axis=0)
    cache = jax.tree.map(lambda x: jnp.repeat(x, n, axis=0) if x.ndim else x, cache)
    top_n_mask = jnp.arange(keep) < n  # only the top N candidates may become finished hypotheses

    def body(carry):
        (step, logits, cache, run_tok, run_score, fin_tok, fin_score, fin_len, fin_done, open_, _) = carry
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(b, n, vocab) + run_score[:, :, None]
        top_lp, top_idx = jax.lax.top_k(log_probs.reshape(b, n * vocab), keep)  # [B, 2N], best first
        src, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        cand_tok = _gather(run_tok, src).at[:, :, step].set(tok)  # [B, 2N, M]
        hits = (tok == eos_id) | (step + 1 >= m)  # HF stopping criteria: EOS, or max length reached

        # Live beams: the best N candidates that did not just finish.
        run_lp = top_lp + hits.astype(jnp.float32) * _NEG
        _, nxt = jax.lax.top_k(run_lp, n)
        run_tok, run_score, run_src = _gather(cand_tok, nxt), _gather(run_lp, nxt), _gather(src, nxt)

        # Finished hypotheses: merge the new ones (length-penalised) into the N best so far.
        just = hits & top_n_mask[None, :]
        score = top_lp / (step + 1).astype(jnp.float32) ** length_penalty
        full = jnp.all(fin_done, axis=-1, keepdims=True) & stop_when_full
        score = score + full.astype(jnp.float32) * _NEG  # the same sequence of additions as HF: same ties
        score = score + (~open_).astype(jnp.float32) * _NEG
        score = score + (~just).astype(jnp.float32) * _NEG
        merged = jnp.concatenate([fin_score, score], axis=1)
        _, best = jax.lax.top_k(merged, n)
        fin_tok = _gather(jnp.concatenate([fin_tok, cand_tok], axis=1), best)
        fin_score = _gather(merged, best)
        fin_len = _gather(jnp.concatenate([fin_len, jnp.full((b, keep), step + 1, jnp.int32)], axis=1), best)
        fin_done = _gather(jnp.concatenate([fin_done, just], axis=1), best)

        # HF `_check_early_stop_heuristic`: can the best live beam still beat the worst finished one?
        new_len = jnp.where(never_stop & (length_penalty > 0.0), m, step + 1).astype(jnp.float32)
        best_running = run_score[:, :1] / new_len ** length_penalty
        worst_finished = jnp.where(fin_done, jnp.min(fin_score, axis=1, keepdims=True), _NEG)
        open_ = open_ & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
        more = jnp.any(open_) & ~(jnp.all(fin_done) & stop_when_full) & ~jnp.all(hits)
        more = more & (step + 1 < m)

        def advance():
            rows = (jnp.arange(b)[:, None] * n + run_src).reshape(-1)  # reorder the cache to the live beams
            reordered = jax.tree.map(lambda x: jnp.take(x, rows, axis=0) if x.ndim else x, cache)
            return _decode(graphdef, state, run_tok[:, :, step].reshape(-1), reordered)

        logits, cache = jax.lax.cond(more, advance, lambda: (logits, cache))
        return (step + 1, logits, cache, run_tok, run_score, fin_tok, fin_score, fin_len, fin_done, open_, more)

    run_score = jnp.where(jnp.arange(n) == 0, 0.0, _NEG)[None, :].repeat(b, axis=0)  # only beam 0 expands first
    carry = (jnp.int32(0), logits, cache, jnp.full((b, n, m), pad_id, jnp.int32), run_score.astype(jnp.float32),
             jnp.full((b, n, m), pad_id, jnp.int32), jnp.full((b, n), _NEG, jnp.float32), jnp.zeros((b, n), jnp.int32),
             jnp.zeros((b, n), bool), jnp.ones((b, 1), bool), jnp.bool_(True))
    carry = jax.lax.while_loop(lambda c: c[-1], body, carry)
    fin_tok, fin_len = carry[5], carry[7]
    return fin_tok[:, 0], fin_len[:, 0]  # top_k keeps the finished slots sorted: slot 0 is the best
