"""Answer extraction and scoring for the LLM-Adapters commonsense and math benchmarks.

Source: shared/data/llm_adapters/README.md §3 "Response text", §4 "Commonsense scoring", §5 "Math scoring"
(LLM-Adapters `commonsense_evaluate.py` / `evaluate.py` at 8166572, which PERFT's evaluation copies), and
shared/spec/PERFT.md §7 (the response is read after the *last* `### Response:`; the average is the
unweighted mean over benchmarks).

The rules are deliberately naive (plain substrings, no word boundaries, first or last match) because the
published numbers were produced with them; "fixing" them would make our accuracies incomparable. They are
checked against the PERFT authors' own extracted labels (shared/data/perft_reference_outputs/).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from perft_jax.errors import UserError

RESPONSE_MARKER = "### Response:"
# README §5 step 5: absolute, not relative, tolerance between the predicted and the gold number.
NUMERIC_TOLERANCE = 0.001
# README §5 step 2: optional '-', digits, then an optional '.' and digits (upstream r'-?\d+\.?\d*').
_NUMBER_RE = re.compile(r"-?\d+\.?\d*")

COMMONSENSE = "commonsense"
MATH = "math"
# Extraction rules: first label token (README §4), last number (§5 numeric), first capital A-E (§5 AQuA).
LABEL_RULE = "label"
NUMBER_RULE = "number"
LETTER_RULE = "letter"


@dataclass(frozen=True)
class Benchmark:
    """One evaluation set: its folder name, family (which prompt, README §3), rule and label tokens."""

    name: str
    family: str
    rule: str
    labels: tuple[str, ...] = ()


_ANSWER_LABELS = tuple(f"answer{i}" for i in range(1, 6))  # README §4: answer1..answer5 for all QA sets
_REGISTRY = (
    Benchmark("boolq", COMMONSENSE, LABEL_RULE, ("true", "false")),
    Benchmark("piqa", COMMONSENSE, LABEL_RULE, ("solution1", "solution2")),
    Benchmark("social_i_qa", COMMONSENSE, LABEL_RULE, _ANSWER_LABELS),
    Benchmark("hellaswag", COMMONSENSE, LABEL_RULE, tuple(f"ending{i}" for i in range(1, 5))),
    Benchmark("winogrande", COMMONSENSE, LABEL_RULE, ("option1", "option2")),
    Benchmark("ARC-Easy", COMMONSENSE, LABEL_RULE, _ANSWER_LABELS),
    Benchmark("ARC-Challenge", COMMONSENSE, LABEL_RULE, _ANSWER_LABELS),
    Benchmark("openbookqa", COMMONSENSE, LABEL_RULE, _ANSWER_LABELS),
    Benchmark("gsm8k", MATH, NUMBER_RULE),
    Benchmark("AddSub", MATH, NUMBER_RULE),
    Benchmark("MultiArith", MATH, NUMBER_RULE),
    Benchmark("SingleEq", MATH, NUMBER_RULE),
    Benchmark("SVAMP", MATH, NUMBER_RULE),
    # README §5: mawps is not in upstream evaluate.py; follow-up work scores it with the numeric rule.
    Benchmark("mawps", MATH, NUMBER_RULE),
    Benchmark("AQuA", MATH, LETTER_RULE, ("A", "B", "C", "D", "E")),
)
# Not a published benchmark: the task perft_jax.demo generates ("Is 47 greater than 12?"), boolq's labels.
DEMO_BENCHMARKS = (Benchmark("synthetic_compare", COMMONSENSE, LABEL_RULE, ("true", "false")),)
BENCHMARKS: Mapping[str, Benchmark] = {b.name: b for b in _REGISTRY + DEMO_BENCHMARKS}
COMMONSENSE_BENCHMARKS = tuple(b.name for b in _REGISTRY if b.family == COMMONSENSE)
MATH_BENCHMARKS = tuple(b.name for b in _REGISTRY if b.family == MATH)
# Upstream alternation r'true|false' etc.: leftmost match wins, case-sensitive, no word boundaries.
_TOKEN_RES = {name: re.compile("|".join(map(re.escape, b.labels))) for name, b in BENCHMARKS.items() if b.labels}


def get_benchmark(name: str) -> Benchmark:
    """The registry entry for `name`, spelled exactly as its data folder (e.g. "ARC-Easy", "gsm8k").

    Raises:
        UserError (a ValueError): unknown name; matching is case-sensitive, as the folder names are.
    """
    try:
        return BENCHMARKS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}") from None


def extract_response(generation: str, which: str = "last") -> str:
    """The stripped response text of a decoded generation (prompt + new tokens), README §3.

    Args:
        generation: the whole decoded sequence, which contains the prompt's `### Response:` marker.
        which: "last" (PERFT.md §7 and DoRA: after the last marker, the default) or "first" (upstream
            LLM-Adapters: `split("### Response:")[1]`, i.e. the text between the first and a second marker).

    Raises:
        UserError (a ValueError): no marker in the text, or an unknown `which`.
    """
    if which not in ("first", "last"):
        raise UserError(f"extract_response: which must be 'first' or 'last', got {which!r}")
    pieces = generation.split(RESPONSE_MARKER)
    if len(pieces) < 2:
        raise UserError(f"generation has no {RESPONSE_MARKER!r} marker: {generation[:80]!r}")
    return (pieces[-1] if which == "last" else pieces[1]).strip()


def extract_answer(benchmark: str, response: str) -> str | float:
    """The prediction read from a response by the benchmark's rule (README §4, §5).

    Returns:
        label rule: the first label token found (by position), or "" (always wrong) when none occurs;
        number rule: the last number after removing commas, as a float, or +inf (never correct) when none;
        letter rule (AQuA): the first of the characters A-E anywhere in the response, or "".
    """
    bench = get_benchmark(benchmark)
    if not isinstance(response, str):
        raise UserError(f"{bench.name}: response must be a string, got {type(response).__name__}")
    text = response.strip()  # README §3/§4: upstream strips before matching
    if bench.rule == NUMBER_RULE:
        # README §5: "1,000" reads as 1000, "3/4" gives 4, "5-3" gives -3 (hyphen + digit is a minus).
        numbers = _NUMBER_RE.findall(text.replace(",", ""))
        return float(numbers[-1]) if numbers else math.inf
    # README §4 (labels) and §5 AQuA (letters): the leftmost case-sensitive substring match.
    match = _TOKEN_RES[bench.name].search(text)
    return match.group(0) if match else ""


def _as_float(benchmark: str, value: str | float, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{benchmark}: {what} {value!r} is not a number") from None


def is_correct(benchmark: str, pred: str | float, gold: str | float) -> bool:
    """Whether a prediction (from `extract_answer`) matches the gold `answer` field.

    Label and letter rules compare strings exactly (README §4, §5 AQuA). The number rule compares
    `abs(pred - float(gold)) <= 0.001` (README §5), so +inf and NaN are never correct.

    Raises:
        UserError (a ValueError): unknown benchmark, a gold label outside the benchmark's label set, or a
            gold/pred that is not a number for a numeric benchmark. Each means misaligned data, not a miss.
    """
    bench = get_benchmark(benchmark)
    if bench.rule == NUMBER_RULE:
        gold_value = _as_float(bench.name, gold, "gold answer")
        pred_value = _as_float(bench.name, pred, "prediction")
        return abs(pred_value - gold_value) <= NUMERIC_TOLERANCE
    if gold not in bench.labels:
        raise UserError(f"{bench.name}: gold answer {gold!r} is not one of {list(bench.labels)}")
    return pred == gold


def score(benchmark: str, responses: Sequence[str], golds: Sequence[str | float]) -> dict:
    """Extract and score every response of one benchmark file.

    Args:
        benchmark: registry name (see `BENCHMARKS`).
        responses: stripped response texts (see `extract_response`), one per eval row.
        golds: the rows' `answer` fields, in the same order.

    Returns:
        dict with `benchmark`, `n`, `correct`, `accuracy` (correct / n, a fraction in [0, 1]), and per-row
        `preds` (as `extract_answer` returns them) and `flags` (bools).

    Raises:
        UserError (a ValueError): unknown benchmark, no rows, or responses and golds of different lengths.
    """
    bench = get_benchmark(benchmark)
    if len(responses) != len(golds):
        raise UserError(f"{bench.name}: {len(responses)} responses but {len(golds)} gold answers")
    if not responses:
        raise UserError(f"{bench.name}: no responses to score")
    preds = [extract_answer(bench.name, response) for response in responses]
    flags = [is_correct(bench.name, pred, gold) for pred, gold in zip(preds, golds)]
    correct = sum(flags)
    return {
        "benchmark": bench.name,
        "n": len(flags),
        "correct": correct,
        "accuracy": correct / len(flags),
        "preds": preds,
        "flags": flags,
    }


def macro_average(accuracies: Mapping[str, float]) -> float:
    """Unweighted mean of per-benchmark accuracies (PERFT.md §7; README §5 "unweighted mean over datasets").

    Raises:
        UserError (a ValueError): empty mapping or a key that is not a registered benchmark.
    """
    if not accuracies:
        raise UserError("macro_average: no benchmark accuracies given")
    for name in accuracies:
        get_benchmark(name)
    return sum(accuracies.values()) / len(accuracies)
