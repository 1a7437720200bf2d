"""LLM-Adapters prompt templates, reproduced byte for byte.

Source: shared/data/llm_adapters/README.md §2 "Training prompt" (LLM-Adapters `finetune.py`, the same
text as PERFT's `finetune_*.py`) and §3 "Evaluation prompt and generation" (`evaluate.py`,
`commonsense_evaluate.py`), plus shared/spec/PERFT.md §7: PERFT's commonsense evaluation prompt continues
with `the correct answer is`.

The upstream templates are indented triple-quoted f-strings, so their whitespace is accidental but
load-bearing: a model fine-tuned on one spacing is evaluated on another, and the published numbers depend on
both. Training
and evaluation therefore have separate templates here, and every space is spelled out.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from perft_jax.errors import UserError

# README §2: every template line after the header starts with the 16 spaces of the upstream source indent.
INDENT = " " * 16
HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
RESPONSE_MARKER = "### Response:"
# PERFT.md §7: the commonsense evaluation prompt ends with this text right after the indent; 4 tokens follow.
COMMONSENSE_CONTINUATION = "the correct answer is"
# Evaluation families (README §3 vs PERFT.md §7): what the prompt continues with after the final indent.
EVAL_CONTINUATIONS = {"commonsense": COMMONSENSE_CONTINUATION, "math": ""}


class PromptSplit(NamedTuple):
    """A training text and its prompt prefix, for `train_on_inputs=False` label masking (README §2).

    `full` always starts with `prompt`. The caller tokenizes `prompt` without EOS and masks that many leading
    label tokens; the prefix ends in spaces, so its token count can be one off the true boundary, and upstream
    keeps that count as it is.
    """

    prompt: str
    full: str


def train_prompt(instruction: str, output: str, input_text: str | None = "") -> str:
    """The training text: template plus target, with nothing (not even a newline) after `output`.

    Args:
        instruction: the record's `instruction`; only its first line gets the indent (README §2).
        output: the training target; `""` gives the prompt prefix used for label masking.
        input_text: the record's `input`; an empty value selects the template without input, as upstream's
            `if data_point["input"]` does.

    Returns:
        The text to tokenize (EOS is the tokenizer step's business, README §2).
    """
    if input_text:
        # README §2 "with input": the long header is followed by ONE space; separator lines are 16 spaces.
        return (
            HEADER_WITH_INPUT + " \n"
            "\n"
            + INDENT + "### Instruction:\n" + INDENT + instruction + "\n" + INDENT + "\n"
            + INDENT + "### Input:\n" + INDENT + input_text + "\n" + INDENT + "\n"
            + INDENT + RESPONSE_MARKER + "\n" + INDENT + output
        )
    # README §2 "without input": the header ends with TWO spaces; the separator line is 16 spaces, not empty.
    return (
        HEADER + "  \n"
        "\n"
        + INDENT + "### Instruction:\n" + INDENT + instruction + "\n" + INDENT + "\n"
        + INDENT + RESPONSE_MARKER + "\n" + INDENT + output
    )


def train_prompt_split(instruction: str, output: str, input_text: str | None = "") -> PromptSplit:
    """The prompt prefix and the full training text (README §2, `train_on_inputs=False`).

    The prefix is the same template with an empty output, so it ends with `"### Response:\\n" + INDENT`.
    """
    return PromptSplit(
        prompt=train_prompt(instruction, "", input_text),
        full=train_prompt(instruction, output, input_text),
    )


def record_prompt_split(record: Mapping[str, object]) -> PromptSplit:
    """`train_prompt_split` for one LLM-Adapters record (README §1 schema: instruction, input, output).

    Raises:
        UserError (a ValueError): a required key is missing or not a string; the message names the key.
    """
    fields = {}
    for key in ("instruction", "output"):
        if key not in record:
            raise UserError(f"training record has no {key!r} key (keys: {sorted(record)})")
        fields[key] = record[key]
    fields["input"] = record.get("input", "")
    for key, value in fields.items():
        if not (isinstance(value, str) or (key == "input" and value is None)):
            raise UserError(f"training record key {key!r} must be a string, got {type(value).__name__}")
    return train_prompt_split(fields["instruction"], fields["output"], fields["input"])


def eval_prompt(instruction: str, family: str, input_text: str | None = "") -> str:
    """The evaluation prompt the model continues from (README §3; PERFT.md §7 for commonsense).

    Its whitespace differs from training on purpose (upstream does): the no-input header ends with one space,
    the with-input header with none, and separator lines are truly empty. The 16-space indent before each
    section, the instruction and the final position is kept.

    Args:
        instruction: the record's `instruction`.
        family: "commonsense" (prompt continues with `the correct answer is`) or "math" (nothing added).
        input_text: the record's `input`; empty selects the template without input.

    Raises:
        UserError (a ValueError): unknown family.
    """
    if family not in EVAL_CONTINUATIONS:
        raise UserError(f"unknown evaluation family {family!r}; expected one of {sorted(EVAL_CONTINUATIONS)}")
    tail = INDENT + RESPONSE_MARKER + "\n" + INDENT + EVAL_CONTINUATIONS[family]
    if input_text:
        # README §3: with input, no trailing space after the header.
        return (
            HEADER_WITH_INPUT + "\n"
            "\n"
            + INDENT + "### Instruction:\n" + INDENT + instruction + "\n\n"
            + INDENT + "### Input:\n" + INDENT + input_text + "\n\n"
            + tail
        )
    # README §3: without input, the header ends with ONE space.
    return (
        HEADER + " \n"
        "\n"
        + INDENT + "### Instruction:\n" + INDENT + instruction + "\n\n"
        + tail
    )


def commonsense_eval_prompt(instruction: str, input_text: str | None = "") -> str:
    """PERFT's commonsense prompt: the evaluation template plus `the correct answer is` (PERFT.md §7)."""
    return eval_prompt(instruction, "commonsense", input_text)


def math_eval_prompt(instruction: str, input_text: str | None = "") -> str:
    """The math prompt: the evaluation template ending at the indent after `### Response:` (README §3)."""
    return eval_prompt(instruction, "math", input_text)
