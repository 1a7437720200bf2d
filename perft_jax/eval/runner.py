"""Evaluate a model on LLM-Adapters benchmark files: prompt, generate, decode, extract, score, write JSON.

Protocol (shared/data/llm_adapters/README.md §3-§5, spec/PERFT.md §7): the evaluation template per family
(commonsense prompts continue with `the correct answer is`), 4 new tokens for commonsense and 256 for math,
the whole sequence (prompt + generation) decoded (commonsense skips special tokens, math does not), the
response read after the last `### Response:`, scored by the benchmark's rule; the summary is the per-benchmark
accuracy and their unweighted mean.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Sequence

from flax import nnx
from tqdm import tqdm

from perft_jax.data.prompts import eval_prompt
from perft_jax.data.tokenize import Tokenizer
from perft_jax.distributed import is_main_process
from perft_jax.errors import UserError
from perft_jax.eval.generate import PromptTooLongError, generate
from perft_jax.eval.scoring import COMMONSENSE, extract_response, get_benchmark, macro_average, score
from perft_jax.hub import locate
from perft_jax.io import write_text_atomic

# PERFT.md §7: 4 new tokens after `the correct answer is`; README §3: 256 for math.
DEFAULT_MAX_NEW_TOKENS = {"commonsense": 4, "math": 256}


def load_benchmark(data_dir: str | os.PathLike, name: str, max_examples: int | None = None) -> list[dict]:
    """The rows of `<data_dir>/<name>/test.json` (README §1 schema), the first `max_examples` if given.

    Raises:
        UserError: missing, unreadable (not UTF-8, not JSON) or empty file, or a row without a string
            `instruction` / an `answer`, or with a non-string `input`.
    """
    path = pathlib.Path(data_dir) / name / "test.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not UTF-8 (UnicodeDecodeError) or not JSON
        raise UserError(f"{name}: cannot read {path}: {e}") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON array of records, got {type(rows).__name__}")
    if not rows:
        raise UserError(f"{path}: no rows to evaluate ({name})")
    rows = rows[:max_examples] if max_examples is not None else rows
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or "answer" not in row:
            raise UserError(f"{path}: row {i} needs a string 'instruction' and an 'answer'")
        if not isinstance(row.get("input", ""), str):
            raise UserError(f"{path}: row {i}: 'input' must be a string, got {type(row['input']).__name__}")
    return rows


def evaluate(model: nnx.Module, tokenizer: Tokenizer, benchmarks: Sequence[str], data_dir: str | os.PathLike,
             out_path: str | os.PathLike, batch_size: int, max_examples: int | None = None, num_beams: int = 1,
             max_new_tokens: int | None = None, *, show_progress: bool = True,
             pad_to_multiple_of: int = 64) -> dict:
    """Generate and score every benchmark; write the results JSON to `out_path` and return its summary.

    Args:
        model: the LM to evaluate (with its adapters).
        tokenizer: from `load_tokenizer`; needs `eos_id` (its `pad_id`, else EOS, pads the batch).
        benchmarks: registry names (`scoring.BENCHMARKS`), e.g. ["boolq", "gsm8k"].
        data_dir: folder with `<benchmark>/test.json` (the LLM-Adapters dataset layout), or a hub dataset repo id
            laid out the same way (only those files are fetched, into the local hub cache; HF_HUB_OFFLINE=1: the
            cache alone).
        out_path: the JSON file to write (through a temporary file and a rename: never half-written).
        batch_size: prompts per `generate` call (the last batch is padded to it: one compilation).
        max_examples: evaluate the first rows of each file only.
        num_beams: 1 = greedy; 4 = the reference's beam search.
        max_new_tokens: for every benchmark; default 4 (commonsense) / 256 (math).
        pad_to_multiple_of: prompt-length bucket (fewer compilations; does not change results).

    Returns:
        {"accuracy": {name: fraction}, "macro_average": float, "n": {name: rows}, "settings": {...}}; the file
        holds the same plus "generations": {name: [{"index", "generation", "response", "pred", "gold", "flag"}]}
        ("index" is the row in test.json; "pred" is null when no number was found).
    """
    if not benchmarks:
        raise UserError("evaluate: no benchmarks given")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"evaluate: batch_size must be a positive integer, got {batch_size!r}")
    if tokenizer.eos_id is None:
        raise UserError("evaluate: the tokenizer has no EOS token")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    benches = [get_benchmark(name) for name in benchmarks]  # fail on a typo before any generation
    data_dir = locate(data_dir, repo_type="dataset", allow_patterns=[f"{b.name}/test.json" for b in benches],
                      what="eval.data_dir").path
    # Every file is read and checked before the first generation: a bad last benchmark fails in seconds.
    tasks = {bench.name: load_benchmark(data_dir, bench.name, max_examples) for bench in benches}
    accuracy, counts, new_tokens, generations = {}, {}, {}, {}
    for bench in benches:
        rows = tasks[bench.name]
        new_tokens[bench.name] = DEFAULT_MAX_NEW_TOKENS[bench.family] if max_new_tokens is None else max_new_tokens
        prompts = [eval_prompt(r["instruction"], bench.family, r.get("input", "")) for r in rows]
        prompt_ids = tokenizer.encode_batch(prompts)
        gen_ids = _generate_all(model, prompt_ids, bench.name, batch_size, new_tokens[bench.name],
                                tokenizer.eos_id, pad_id, num_beams, pad_to_multiple_of,
                                show_progress and is_main_process())
        # README §3: decode prompt + generation (commonsense skips special tokens, math keeps them).
        skip = bench.family == COMMONSENSE
        responses = [extract_response(tokenizer.decode(p + g, skip_special_tokens=skip))
                     for p, g in zip(prompt_ids, gen_ids)]
        result = score(bench.name, responses, [r["answer"] for r in rows])
        accuracy[bench.name], counts[bench.name] = result["accuracy"], result["n"]
        generations[bench.name] = [
            {"index": i, "generation": tokenizer.decode(g, skip_special_tokens=skip), "response": resp,
             "pred": _json_pred(pred), "gold": row["answer"], "flag": bool(flag)}
            for i, (g, resp, pred, row, flag) in enumerate(zip(gen_ids, responses, result["preds"], rows,
                                                                result["flags"]))]
    summary = {"accuracy": accuracy, "macro_average": macro_average(accuracy), "n": counts,
               "settings": {"num_beams": num_beams, "max_new_tokens": new_tokens, "batch_size": batch_size,
                            "max_examples": max_examples}}
    if is_main_process():  # multi-host: every process generated the same results; one writes them
        _write_json(pathlib.Path(out_path), {**summary, "generations": generations})
    return summary


def _generate_all(model, prompt_ids: list[list[int]], name: str, batch_size: int, max_new_tokens: int,
                  eos_id: int, pad_id: int, num_beams: int, pad_to_multiple_of: int,
                  show_progress: bool) -> list[list[int]]:
    """New tokens per prompt, in prompt order; batches are formed from length-sorted prompts (less padding)."""
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out: list[list[int] | None] = [None] * len(prompt_ids)
    with tqdm(total=len(order), desc=name, unit="example", disable=not show_progress) as progress:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            try:
                gens = generate(model, [prompt_ids[i] for i in rows], max_new_tokens, eos_id, pad_id, num_beams,
                                pad_to_multiple_of=pad_to_multiple_of, pad_batch_to=batch_size)
            except PromptTooLongError as e:
                row = rows[e.row]
                raise UserError(f"{name}: example {row} has {len(prompt_ids[row])} prompt tokens; with "
                                f"max_new_tokens={max_new_tokens} it exceeds the model's cache budget "
                                f"(max_position_embeddings={model.config.max_position_embeddings})") from None
            for i, g in zip(rows, gens):
                out[i] = g
            progress.update(len(rows))
    return out


def _json_pred(pred: str | float) -> str | float | None:
    """A prediction as strict JSON: +inf (no number found) becomes null."""
    return None if isinstance(pred, float) and not math.isfinite(pred) else pred


def _write_json(path: pathlib.Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False))
