"""Specs for the LLM-Adapters prompt templates (data README §2, §3; PERFT.md §7)."""
from __future__ import annotations

import json
import pathlib
import re

import pytest
from testing_utils import imported_top_level_modules

from perft_jax.data import prompts
from perft_jax.data.prompts import (
    commonsense_eval_prompt,
    eval_prompt,
    math_eval_prompt,
    record_prompt_split,
    train_prompt,
    train_prompt_split,
)

SP16 = "                "  # 16 literal spaces, written out so the spec does not reuse the module's constant
NO_INPUT_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
INPUT_HEADER = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def test_sp16_is_sixteen_spaces():
    assert SP16 == " " * 16 and prompts.INDENT == SP16


# --- training template, README §2 -------------------------------------------------------------------


def test_train_prompt_without_input_byte_for_byte():
    got = train_prompt("Is the sky blue?", "the correct answer is true")
    want = (
        NO_INPUT_HEADER + "  \n"  # two trailing spaces
        "\n"  # one truly empty line
        "                ### Instruction:\n"
        "                Is the sky blue?\n"
        "                \n"  # separator line is 16 spaces
        "                ### Response:\n"
        "                the correct answer is true"  # nothing after the output
    )
    assert got == want


def test_train_prompt_with_input_byte_for_byte():
    got = train_prompt("Add the numbers.", "5", input_text="2 and 3")
    want = (
        INPUT_HEADER + " \n"  # one trailing space
        "\n"
        "                ### Instruction:\n"
        "                Add the numbers.\n"
        "                \n"
        "                ### Input:\n"
        "                2 and 3\n"
        "                \n"
        "                ### Response:\n"
        "                5"
    )
    assert got == want


@pytest.mark.parametrize("empty", ["", None])
def test_empty_input_selects_the_template_without_input(empty):
    assert train_prompt("Q", "A", input_text=empty) == train_prompt("Q", "A")
    assert eval_prompt("Q", "math", input_text=empty) == math_eval_prompt("Q")


def test_only_first_instruction_line_is_indented():
    text = train_prompt("line one\n\nline two", "out")
    assert SP16 + "line one\n\nline two\n" + SP16 + "\n" in text
    assert SP16 + "line two" not in text


def test_output_is_not_followed_by_newline_or_eos():
    assert train_prompt("Q", "The answer is 4.").endswith("### Response:\n" + SP16 + "The answer is 4.")


# --- prompt/response split for train_on_inputs=False, README §2 -------------------------------------


@pytest.mark.parametrize("input_text", ["", "some context"])
def test_train_prompt_split(input_text):
    split = train_prompt_split("Q?", "the correct answer is false", input_text)
    assert split.full == train_prompt("Q?", "the correct answer is false", input_text)
    assert split.prompt == train_prompt("Q?", "", input_text)
    assert split.prompt.endswith("### Response:\n" + SP16)
    assert split.full.startswith(split.prompt)
    assert split.full[len(split.prompt):] == "the correct answer is false"


def test_record_prompt_split_reads_the_schema_fields():
    record = {"instruction": "Q?", "input": "", "output": "out", "answer": "x"}
    assert record_prompt_split(record) == train_prompt_split("Q?", "out")
    assert record_prompt_split({"instruction": "Q?", "output": "out"}) == train_prompt_split("Q?", "out")


@pytest.mark.parametrize(
    "record, key",
    [
        ({"output": "o"}, "instruction"),
        ({"instruction": "i"}, "output"),
        ({"instruction": 3, "output": "o"}, "instruction"),
        ({"instruction": "i", "output": "o", "input": ["x"]}, "input"),
    ],
)
def test_record_prompt_split_rejects_malformed_records(record, key):
    with pytest.raises(ValueError, match=f"'{key}'") as info:
        record_prompt_split(record)
    assert "\n" not in str(info.value)


# --- evaluation templates, README §3 and PERFT.md §7 --------------------------------------------------


def test_math_eval_prompt_without_input_byte_for_byte():
    want = (
        NO_INPUT_HEADER + " \n"  # ONE trailing space at evaluation
        "\n"
        "                ### Instruction:\n"
        "                What is 2+2?\n"
        "\n"  # separator truly empty at evaluation
        "                ### Response:\n"
        "                "  # the model continues after the indent
    )
    assert math_eval_prompt("What is 2+2?") == want
    assert eval_prompt("What is 2+2?", "math") == want


def test_commonsense_eval_prompt_continues_with_the_correct_answer_is():
    want = (
        NO_INPUT_HEADER + " \n"
        "\n"
        "                ### Instruction:\n"
        "                Q?\n"
        "\n"
        "                ### Response:\n"
        "                the correct answer is"  # PERFT.md §7: no trailing space; the model adds " true"
    )
    assert commonsense_eval_prompt("Q?") == want
    assert eval_prompt("Q?", "commonsense") == want


def test_eval_prompt_with_input_byte_for_byte():
    want = (
        INPUT_HEADER + "\n"  # no trailing space
        "\n"
        "                ### Instruction:\n"
        "                Add.\n"
        "\n"
        "                ### Input:\n"
        "                2 and 3\n"
        "\n"
        "                ### Response:\n"
        "                "
    )
    assert math_eval_prompt("Add.", "2 and 3") == want
    assert commonsense_eval_prompt("Add.", "2 and 3") == want + "the correct answer is"


def test_eval_and_train_whitespace_differ():
    train_prefix = train_prompt_split("Q", "").prompt
    assert train_prefix != math_eval_prompt("Q")
    relaxed = train_prefix.replace("request.  \n", "request. \n").replace(SP16 + "\n", "\n")
    assert relaxed == math_eval_prompt("Q")


def test_unknown_eval_family_raises():
    with pytest.raises(ValueError, match="'arithmetic'"):
        eval_prompt("Q", "arithmetic")


# --- the README's own code blocks ---------------------------------------------------------------------


def _readme_template_namespace(shared_dir: pathlib.Path, instruction: str, input_text: str, output: str):
    """Run the README's python template blocks (§2, §3) in order and return their variables."""
    readme = (shared_dir / "data" / "llm_adapters" / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 3, "README should hold the §2 (x2) and §3 template blocks"
    namespace = {"instruction": instruction, "input": input_text, "output": output}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - trusted spec text
    return namespace


@pytest.mark.parametrize(
    "instruction",
    [
        "Please answer the following question with true or false, question: is it?\n\n"
        "Answer format: true/false",
        " A problem with leading and trailing spaces. ",
    ],
)
def test_templates_match_the_readme_code_blocks(shared_dir, instruction):
    ns = _readme_template_namespace(shared_dir, instruction, "ctx", "the correct answer is true")
    assert train_prompt(instruction, "the correct answer is true") == ns["train_text"]
    assert train_prompt(instruction, "the correct answer is true", "ctx") == ns["train_text_with_input"]
    assert math_eval_prompt(instruction) == ns["eval_prompt"]
    assert math_eval_prompt(instruction, "ctx") == ns["eval_prompt_with_input"]
    assert commonsense_eval_prompt(instruction) == ns["eval_prompt"] + "the correct answer is"


def test_train_prompts_for_real_records(shared_dir):
    """Every commonsense eval record's output is the label sentence, and the split isolates it exactly."""
    path = shared_dir / "data" / "llm_adapters" / "piqa" / "test.json"
    records = json.loads(path.read_text())
    for record in records[:50]:
        split = record_prompt_split(record)
        assert split.full[len(split.prompt):] == "the correct answer is " + record["answer"]
        assert split.prompt.count("### Response:") == 1


def test_module_imports_no_jax():
    assert not imported_top_level_modules(prompts.__file__) & {"jax", "flax", "numpy", "transformers"}
