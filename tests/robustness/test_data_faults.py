"""Bad training data for `perft-train` (issue 15): every malformed file ends in one line naming the file (and the
row or line), exit code 2, before the run directory (or a `datasets` cache) exists."""
from __future__ import annotations

import json

import datasets
import pytest

from perft_jax.cli import train_main
from tests.robustness.battery import Tree, call_main, fails_cleanly

GOOD = {"instruction": "Is 3 greater than 2?", "input": "", "output": "the correct answer is true"}

# name -> (file contents, what the line must say besides the file's path)
BAD_FILES = {
    "empty_array.json": (b"[]", "an empty JSON array"),
    "wrapped.json": (json.dumps({"data": [GOOD]}).encode(), "a JSON object with keys ['data']"),
    "empty.json": (b"", "empty file"),
    "blank.json": (b"  \n\n ", "empty file"),
    "latin1.json": ('[{"instruction": "café", "output": "b"}]'.encode("latin-1"), "not UTF-8 text (byte 0xe9"),
    "truncated.json": (json.dumps([GOOD, GOOD])[:-20].encode(), "not valid JSON"),
    "numbers.json": (b"[1, 2]", "row 0: expected a JSON object"),
    "string.json": (b'"rows"', "expected a JSON array of records (README §1), got str"),
    "broken_line.jsonl": (f"{json.dumps(GOOD)}\n{json.dumps(GOOD)[:-3]}\n".encode(), "line 2: not valid JSON"),
    "list_line.jsonl": (f"{json.dumps(GOOD)}\n\n[1]\n".encode(), "line 3: expected a JSON object"),
    "number_output.json": (json.dumps([GOOD, {**GOOD, "output": 42}]).encode(), "row 1: 'output' must be a string"),
    "no_instruction.json": (json.dumps([{"output": "x"}]).encode(), "row 0: 'instruction' is missing or null"),
    "list_input.json": (json.dumps([GOOD, GOOD, {**GOOD, "input": ["a"]}]).encode(),
                        "row 2: 'input' must be a string, got list"),
    "two_rows.jsonl": ((json.dumps(GOOD) + "\n") * 2, "data.batch_size: 2 training rows give no full batch of 32"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_training_file(run_config, work, capfd, name):
    contents, says = BAD_FILES[name]
    bad = work / name
    bad.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    config = run_config(f"data.train_files=[{bad}]")
    before = Tree(work)
    # The batch-size error names the key, not the file; every other one names the file.
    culprits = (says,) if says.startswith("data.") else (bad, says)
    fails_cleanly(call_main(train_main, ["--config", config], capfd), *culprits, untouched=before)


def _folder_of_json(work):
    (work / "folder").mkdir()
    (work / "folder" / "rows.json").write_text(json.dumps([GOOD]))
    return work / "folder"


def _json_file(work):
    (work / "rows.json").write_text(json.dumps([GOOD]))
    return work / "rows.json"


def _damaged_disk_folder(work):
    datasets.Dataset.from_list([GOOD] * 100).save_to_disk(str(work / "disk"))
    arrow = next((work / "disk").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:500])  # a copy cut short
    return work / "disk"


# name -> (make the path in the test's folder, data.dataset_format, what the line must say besides the path)
BAD_PATHS = {
    "missing file": (lambda work: work / "nope.json", "json", "training file not found"),
    "folder for a json file": (_folder_of_json, "json", "data.dataset_format=hf_disk"),
    "folder that is no dataset": (_folder_of_json, "hf_disk", "not a readable `datasets.save_to_disk` folder"),
    "json file for hf_disk": (_json_file, "hf_disk", "data.dataset_format=json"),
    "damaged dataset folder": (_damaged_disk_folder, "hf_disk", "not a readable `datasets.save_to_disk` folder"),
}


@pytest.mark.parametrize("case", BAD_PATHS)
def test_bad_training_path(run_config, work, capfd, case):
    make, dataset_format, says = BAD_PATHS[case]
    path = make(work)
    config = run_config(f"data.train_files=[{path}]", f"data.dataset_format={dataset_format}")
    before = Tree(work)
    fails_cleanly(call_main(train_main, ["--config", config], capfd), path, says, untouched=before)


def test_every_row_malformed_leaves_no_usable_row(run_config, work, capfd):
    bad = work / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": 1}, {"output": "b"}]))
    config = run_config(f"data.train_files=[{bad}]", "data.skip_malformed=true")
    before = Tree(work)
    fails_cleanly(call_main(train_main, ["--config", config], capfd), "no usable training row",
                  f"{bad}: row 0: 'output' must be a string", untouched=before)


def test_too_few_rows_for_the_validation_split(run_config, work, capfd):
    rows = work / "rows.json"
    rows.write_text(json.dumps([GOOD] * 10))
    config = run_config(f"data.train_files=[{rows}]", "data.val_set_size=10")
    before = Tree(work)
    fails_cleanly(call_main(train_main, ["--config", config], capfd), "data.val_set_size", "10 usable training rows",
                  untouched=before)
