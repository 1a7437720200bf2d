"""Specs for LLM-Adapters answer extraction and scoring (data README §3-§5; PERFT.md §7).

The decisive test replays the PERFT authors' own extracted labels (shared/data/perft_reference_outputs/):
our scorer must give the same `pred` and `flag` on every row and so the same accuracies.
"""
from __future__ import annotations

import json
import math
import pathlib

import pytest
from testing_utils import imported_top_level_modules

from perft_jax.data.prompts import commonsense_eval_prompt, math_eval_prompt
from perft_jax.eval import scoring
from perft_jax.eval.scoring import (
    BENCHMARKS,
    COMMONSENSE_BENCHMARKS,
    MATH_BENCHMARKS,
    extract_answer,
    extract_response,
    get_benchmark,
    is_correct,
    macro_average,
    score,
)

ALL_NAMES = [
    "boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa", "hellaswag",
    "gsm8k", "AddSub", "MultiArith", "SingleEq", "SVAMP", "AQuA", "mawps",
]
NUMERIC = ["gsm8k", "AddSub", "MultiArith", "SingleEq", "SVAMP", "mawps"]
ANSWER_SETS = ["social_i_qa", "ARC-Easy", "ARC-Challenge", "openbookqa"]

# --- registry ---------------------------------------------------------------------------------------------


def test_registry_names_and_families():
    assert sorted(BENCHMARKS) == sorted(ALL_NAMES + ["synthetic_compare"])  # + the demo's task
    assert sorted(COMMONSENSE_BENCHMARKS) == sorted(ALL_NAMES[:8])
    assert sorted(MATH_BENCHMARKS) == sorted(ALL_NAMES[8:])
    assert get_benchmark("AQuA").rule == "letter"
    assert all(get_benchmark(name).rule == "number" for name in NUMERIC)


def test_registry_matches_data_folders(shared_dir):
    root = shared_dir / "data" / "llm_adapters"
    folders = {p.parent.name for p in root.glob("*/test.json")}
    # README "Files": every eval set but hellaswag is present.
    assert folders | {"hellaswag"} == set(COMMONSENSE_BENCHMARKS + MATH_BENCHMARKS)


@pytest.mark.parametrize("bad", ["GSM8K", "arc-easy", "hellaswag ", "siqa", "", None])
def test_unknown_benchmark_raises_one_line_value_error(bad):
    for call in (
        lambda: get_benchmark(bad),
        lambda: extract_answer(bad, "x"),
        lambda: is_correct(bad, "x", "x"),
        lambda: score(bad, ["x"], ["x"]),
    ):
        with pytest.raises(ValueError, match="unknown benchmark") as info:
            call()
        assert repr(bad) in str(info.value) and "\n" not in str(info.value)


# --- response text, README §3 and PERFT.md §7 ------------------------------------------------------------


def test_extract_response_after_last_marker_by_default():
    generation = commonsense_eval_prompt("Q? ### Response: inside") + " answer2 \n"
    assert extract_response(generation) == "the correct answer is answer2"


def test_extract_response_first_is_upstream_split_index_one():
    generation = "prompt ### Response:\n  one  ### Response: two"
    assert extract_response(generation, which="first") == "one"
    assert extract_response(generation, which="last") == "two"
    assert extract_response(math_eval_prompt("2+2?") + "4</s>", which="first") == "4</s>"


def test_extract_response_errors():
    with pytest.raises(ValueError, match="### Response:"):
        extract_response("no marker here")
    with pytest.raises(ValueError, match="'middle'"):
        extract_response("### Response: x", which="middle")


# --- commonsense, README §4 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "benchmark, response, pred",
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "  the correct answer is false  ", "false"),
        ("boolq", "the correct answer is True", ""),  # lowercase only
        ("boolq", "the correct answer is untrue", "true"),  # no word boundaries
        ("boolq", "false, not true", "false"),  # first by position, not by label order
        ("boolq", "the correct answer is", ""),
        ("piqa", "the correct answer is solution2", "solution2"),
        ("piqa", "the correct answer is Solution1", ""),  # capitalised option name never matches
        ("piqa", "solution3 or solution1", "solution1"),
        ("social_i_qa", "the correct answer is answer3", "answer3"),
        ("social_i_qa", "answer5", "answer5"),  # answer1..answer5 are searched even with 3 options
        ("ARC-Easy", "the correct answer is answer5", "answer5"),
        ("ARC-Challenge", "answer12", "answer1"),  # substring: answer12 contains answer1
        ("ARC-Challenge", "Answer4 then answer2", "answer2"),
        ("openbookqa", "the correct answer is answer4answer1", "answer4"),
        ("openbookqa", "answer6", ""),
        ("winogrande", "the correct answer is option2", "option2"),
        ("winogrande", "Option1", ""),
        ("winogrande", "option2 option1", "option2"),
        ("hellaswag", "the correct answer is ending4", "ending4"),
        ("hellaswag", "ending5 ending0", ""),
        ("hellaswag", "Ending2 ending3", "ending3"),
    ],
)
def test_commonsense_extraction(benchmark, response, pred):
    assert extract_answer(benchmark, response) == pred


def test_commonsense_correctness_is_exact_string_equality():
    assert is_correct("boolq", "true", "true")
    assert not is_correct("boolq", "false", "true")
    assert not is_correct("boolq", "", "false")  # no match counts as wrong
    assert is_correct("ARC-Easy", "answer5", "answer5")
    with pytest.raises(ValueError, match="boolq.*'True'"):
        is_correct("boolq", "true", "True")  # a gold outside the label set is misaligned data


# --- math, README §5 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("benchmark", NUMERIC)
@pytest.mark.parametrize(
    "response, pred",
    [
        ("The answer is 18.", 18.0),
        ("She pays $1,000 in total. The answer is 1,000", 1000.0),  # commas removed
        ("3/4", 4.0),  # last number of a fraction
        ("5-3", -3.0),  # hyphen before a digit is a minus sign
        ("-15.0 degrees", -15.0),
        ("The answer is 5.", 5.0),  # '.' followed by zero digits
        ("1.2.3", 3.0),  # '1.2' then '3'
        ("12 apples and 7 pears; so 19 fruit in all.", 19.0),
        ("It costs $18.50 per item", 18.5),
        ("The answer is forty-two.", math.inf),  # no number: +inf
        ("", math.inf),
    ],
)
def test_numeric_extraction(benchmark, response, pred):
    assert extract_answer(benchmark, response) == pred


@pytest.mark.parametrize(
    "pred, gold, ok",
    [
        (576.0, "576.0", True),
        (4.0, "4", True),
        (-15.0, "-15.0", True),
        (1.833, "1.8333333333333335", True),  # |diff| = 3.3e-4
        (1.83, "1.8333333333333335", False),  # |diff| = 3.3e-3
        (0.5009, "0.5", True),
        (0.5011, "0.5", False),
        (1_000_000.002, "1000000", False),  # absolute, not relative, tolerance
        (math.inf, "576.0", False),
        (math.nan, "1", False),
        ("18", 18.0, True),  # a stored prediction string and a numeric gold are accepted
    ],
)
def test_numeric_correctness_absolute_tolerance(pred, gold, ok):
    assert is_correct("gsm8k", pred, gold) is ok


def test_numeric_bad_gold_or_pred_raises():
    with pytest.raises(ValueError, match="gsm8k.*'twelve'"):
        is_correct("gsm8k", 12.0, "twelve")
    with pytest.raises(ValueError, match="SVAMP.*prediction"):
        is_correct("SVAMP", "n/a", "3")


@pytest.mark.parametrize(
    "response, pred",
    [
        ("The answer is (C).", "C"),  # 'T', 'h' ... are not A-E; the first A-E is the C
        ("A: the train is faster", "A"),  # leading "A:" wins
        ("Each person pays 5. The answer is (B).", "E"),  # a capitalised word before the choice wins
        ("Rationale: 5 + 3 = 8. The answer is (D).", "D"),  # "Rationale:" avoids the trap
        ("the answer is (c)", ""),  # lowercase never matches
        ("Rationale: xyz", ""),
        ("(F) is not a choice; (A) is", "A"),
    ],
)
def test_aqua_first_capital_letter(response, pred):
    assert extract_answer("AQuA", response) == pred


def test_aqua_correctness():
    assert is_correct("AQuA", "C", "C")
    assert not is_correct("AQuA", "", "C")
    assert not is_correct("AQuA", "c", "C")
    with pytest.raises(ValueError, match="AQuA.*'F'"):
        is_correct("AQuA", "F", "F")


# --- score and macro average -----------------------------------------------------------------------------


def test_score_counts_and_per_row_results():
    result = score(
        "gsm8k",
        ["The answer is 1,000.", "no idea", "It is 2.0004", "5-3"],
        ["1000.0", "7", "2", "3"],
    )
    assert result["benchmark"] == "gsm8k"
    assert result["n"] == 4 and result["correct"] == 2
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["preds"] == [1000.0, math.inf, 2.0004, -3.0]
    assert result["flags"] == [True, False, True, False]


def test_score_commonsense():
    result = score("winogrande", ["the correct answer is option1", "Option2", "option2"], ["option1"] * 3)
    assert result["preds"] == ["option1", "", "option2"]
    assert result["flags"] == [True, False, False]
    assert result["correct"] == 1 and result["accuracy"] == pytest.approx(1 / 3)


def test_score_rejects_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="piqa: 2 responses but 1 gold"):
        score("piqa", ["solution1", "solution2"], ["solution1"])
    with pytest.raises(ValueError, match="piqa: no responses"):
        score("piqa", [], [])
    with pytest.raises(ValueError, match="response must be a string"):
        score("piqa", [None], ["solution1"])


def test_macro_average_is_unweighted():
    assert macro_average({"boolq": 0.5, "piqa": 1.0, "AQuA": 0.0}) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="'BoolQ'"):
        macro_average({"BoolQ": 0.5})
    with pytest.raises(ValueError, match="no benchmark"):
        macro_average({})


def test_module_imports_no_jax():
    assert not imported_top_level_modules(scoring.__file__) & {"jax", "flax", "transformers"}


# --- eval-set files, README "Files" and §1 --------------------------------------------------------------

ROWS = {
    "AQuA": 254, "ARC-Challenge": 1172, "ARC-Easy": 2376, "AddSub": 395, "MultiArith": 600, "SVAMP": 1000,
    "SingleEq": 508, "boolq": 3270, "gsm8k": 1319, "mawps": 238, "openbookqa": 500, "piqa": 1838,
    "social_i_qa": 1954, "winogrande": 1267,
}


def _load(shared_dir: pathlib.Path, name: str, file: str = "test.json") -> list[dict]:
    return json.loads((shared_dir / "data" / "llm_adapters" / name / file).read_text())


@pytest.mark.parametrize("name", sorted(ROWS))
def test_eval_set_rows_have_what_the_scorer_needs(shared_dir, name):
    rows = _load(shared_dir, name)
    assert len(rows) == ROWS[name]
    bench = get_benchmark(name)
    for i, row in enumerate(rows):
        assert set(row) == {"instruction", "input", "output", "answer"}, (name, i)
        assert isinstance(row["instruction"], str) and row["instruction"].strip(), (name, i)
        assert row["input"] == "", (name, i)  # README §1: the with-input templates are never used
        gold = row["answer"]
        assert isinstance(gold, str), (name, i)
        if bench.rule == "number":
            assert math.isfinite(float(gold)), (name, i)
            assert is_correct(name, float(gold), gold)
        else:
            assert gold in bench.labels, (name, i)
        if bench.family == "commonsense":
            # README §1: the commonsense target is exactly the label sentence, and the scorer reads it back.
            assert row["output"] == "the correct answer is " + gold, (name, i)
            assert extract_answer(name, row["output"]) == gold, (name, i)


# README "Caveat": rows whose (non-gold) rationale's final answer agrees with `answer`.
AGREEING = {"gsm8k": (771, 1313), "AddSub": (370, 395), "MultiArith": (560, 600), "SingleEq": (484, 508),
            "SVAMP": (803, 1000)}


@pytest.mark.parametrize("name", sorted(AGREEING))
def test_numeric_rule_reproduces_readme_agreement_counts(shared_dir, name):
    rows = [r for r in _load(shared_dir, name) if r["output"].strip()]
    result = score(name, [r["output"] for r in rows], [r["answer"] for r in rows])
    assert (result["correct"], result["n"]) == AGREEING[name]


def test_numeric_rule_reproduces_math_data_agreement(shared_dir):
    rows = _load(shared_dir, "ft-training_set", "math_data.json")
    numeric = [r for r in rows if r["answer"] not in ("A", "B", "C", "D", "E")]
    assert (len(rows), len(numeric)) == (3260, 3057)
    result = score("gsm8k", [r["output"] for r in numeric], [r["answer"] for r in numeric])
    assert result["correct"] == 2399  # README: "agrees with answer in 2399 of the 3057 numeric rows"


def test_aqua_scorer_uses_first_letter_not_the_final_choice(shared_dir):
    """README counts 123/254 AQuA rationales whose *final* choice agrees; the §5 scoring rule (first A-E
    anywhere) credits only 109 of them, because words such as "Each" or "A" come before "(X)"."""
    rows = _load(shared_dir, "AQuA")
    outputs, golds = [r["output"] for r in rows], [r["answer"] for r in rows]
    assert score("AQuA", outputs, golds)["correct"] == 109
    final_choice = [o.rstrip(").").rsplit("(", 1)[-1] if "answer is (" in o else "" for o in outputs]
    assert sum(p == g for p, g in zip(final_choice, golds)) == 123


# --- PERFT authors' reference generations ----------------------------------------------------------------

REFERENCE_ACCURACY = {  # perft_reference_outputs/README.md table, percent
    "Mixtral-8x7B.lora_16.1": [75.11, 90.26, 81.63, 84.85, 92.85, 81.40, 87.60],
    "Mixtral-8x7B.lora_8.e": [74.13, 90.21, 80.81, 86.42, 92.21, 81.06, 88.60],
    "OLMoE-1B-7B.lora_4.e": [64.80, 79.49, 74.36, 72.69, 75.00, 58.45, 72.20],
    "OLMoE-1B-7B.qvlora_8": [63.73, 74.32, 64.07, 51.70, 77.69, 55.97, 57.60],
}
REFERENCE_TASKS = ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]


@pytest.mark.parametrize("run", sorted(REFERENCE_ACCURACY))
def test_reproduces_perft_reference_preds_flags_and_accuracies(shared_dir, run):
    path = shared_dir / "data" / "perft_reference_outputs" / f"{run}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) == 12377  # README: 12,377 rows per run
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    assert list(by_task) == REFERENCE_TASKS

    for task, expected_pct in zip(REFERENCE_TASKS, REFERENCE_ACCURACY[run]):
        task_rows = by_task[task]
        assert [r["index"] for r in task_rows] == list(range(ROWS[task]))
        result = score(task, [r["output_pred"] for r in task_rows], [r["answer"] for r in task_rows])
        mismatches = [
            (r["index"], r["output_pred"], r["pred"], pred)
            for r, pred, flag in zip(task_rows, result["preds"], result["flags"])
            if pred != r["pred"] or flag != r["flag"]
        ]
        assert not mismatches, f"{run}/{task}: {len(mismatches)} rows differ, e.g. {mismatches[:3]}"
        assert round(100 * result["accuracy"], 2) == expected_pct, (run, task)


def test_reference_golds_match_the_eval_sets(shared_dir):
    """Each reference row's `answer` is the gold of row `index` in our test.json, so scores compare."""
    golds = {task: [r["answer"] for r in _load(shared_dir, task)] for task in REFERENCE_TASKS}
    for path in sorted((shared_dir / "data" / "perft_reference_outputs").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            assert golds[row["task"]][row["index"]] == row["answer"], (path.name, row["task"], row["index"])
