"""Specs for loading, checking, tokenising and splitting training records (data README §1, §2; PERFT.md §7)."""
from __future__ import annotations

import json

import datasets
import pytest
from testing_utils import CharTokenizer

from perft_jax.data.config import DataConfig
from perft_jax.data.dataset import build_training_data, load_records
from perft_jax.data.prompts import record_prompt_split
from perft_jax.data.tokenize import load_tokenizer, tokenize_example
from perft_jax.errors import UserError

datasets.disable_progress_bars()


class EmptyTokenizer(CharTokenizer):
    """Encodes everything to no tokens, like `LlamaTokenizer(vocab_file=...)` does (ENGINEERING.md §8)."""

    source = "empty"

    def encode(self, text, max_length=None):
        return []


def record(i):
    return {"instruction": f"question {i}?", "input": "", "output": f"answer {i}.", "answer": str(i)}


def write_json(path, rows):
    # README "Serialization": LLM-Adapters files are exactly json.dumps(records, indent=4).
    path.write_text(json.dumps(rows, indent=4))
    return str(path)


def build(tmp_path, files, tokenizer=None, **overrides):
    cfg = DataConfig(train_files=tuple(files), **{"val_set_size": 0, **overrides})
    return build_training_data(cfg, tokenizer or CharTokenizer(), cache_dir=str(tmp_path / "hf_cache"))


# --- malformed rows: refused with file and row, or skipped and counted ----------------------------------

MALFORMED = {
    "missing_instruction": ({"input": "", "output": "x"}, "'instruction' is missing or null"),
    "missing_output": ({"instruction": "q", "input": ""}, "'output' is missing or null"),
    "null_output": ({"instruction": "q", "input": "", "output": None}, "'output' is missing or null"),
    "int_output": ({"instruction": "q", "input": "", "output": 5}, "'output' must be a string, got int"),
    "list_instruction": ({"instruction": ["q"], "input": "", "output": "x"}, "'instruction' must be a string"),
    "int_input": ({"instruction": "q", "input": 7, "output": "x"}, "'input' must be a string"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_row_is_refused_naming_file_and_row(tmp_path, kind):
    bad, why = MALFORMED[kind]
    path = write_json(tmp_path / "train.json", [record(0), record(1), record(2), bad, record(4)])
    with pytest.raises(UserError) as err:
        build(tmp_path, [path])
    assert str(err.value).startswith(f"{path}: row 3: {why}")


def test_row_that_is_not_an_object_is_refused_naming_file_and_row(tmp_path):
    path = write_json(tmp_path / "train.json", [record(0), record(1), 5])
    with pytest.raises(UserError, match=rf"^{path}: row 2: expected a JSON object"):
        build(tmp_path, [path])


def test_row_that_tokenises_to_nothing_is_refused(tmp_path):
    path = write_json(tmp_path / "train.json", [record(0), record(1)])
    with pytest.raises(UserError, match=rf"^{path}: row 0: the training text tokenises to no tokens \(1 more"):
        build(tmp_path, [path], tokenizer=EmptyTokenizer())


def test_error_in_second_file_names_that_file_and_its_own_row(tmp_path):
    first = write_json(tmp_path / "a.json", [record(i) for i in range(4)])
    second = write_json(tmp_path / "b.json", [record(0), {"instruction": "q", "output": 1}])
    with pytest.raises(UserError, match=rf"^{second}: row 1: 'output' must be a string"):
        build(tmp_path, [first, second])


def test_skip_malformed_drops_and_counts_every_kind(tmp_path):
    rows = [record(0)] + [bad for bad, _ in MALFORMED.values()] + [record(1), record(2)]
    path = write_json(tmp_path / "train.json", rows)
    data = build(tmp_path, [path], skip_malformed=True)
    assert data.num_skipped == len(MALFORMED) == len(data.skipped)
    assert len(data.train) == 3
    assert sorted(data.train["row"]) == [0, len(rows) - 2, len(rows) - 1]
    assert data.skipped[0].startswith(f"{path}: row 1: ")


def test_clean_data_skips_nothing(tmp_path):
    data = build(tmp_path, [write_json(tmp_path / "t.json", [record(i) for i in range(5)])], skip_malformed=True)
    assert (data.num_skipped, data.skipped, len(data.train)) == (0, (), 5)


# --- tokenisation and validation split --------------------------------------------------------------------


def test_rows_are_tokenised_as_tokenize_example(tmp_path):
    rows = [record(i) for i in range(6)]
    cfg = DataConfig(train_on_inputs=False, cutoff_len=150)
    data = build(tmp_path, [write_json(tmp_path / "t.json", rows)], train_on_inputs=False, cutoff_len=150)
    for got in data.train:
        split = record_prompt_split(rows[got["row"]])
        want = tokenize_example(CharTokenizer(), split.prompt, split.full, cfg)
        assert (got["input_ids"], got["labels"]) == (want.input_ids, want.labels)


def test_validation_split_is_upstreams_train_test_split(tmp_path):
    rows = [record(i) for i in range(50)]
    path = write_json(tmp_path / "t.json", rows)
    data = build(tmp_path, [path], val_set_size=12)
    assert (len(data.train), len(data.val)) == (38, 12)
    assert sorted(list(data.train["row"]) + list(data.val["row"])) == list(range(50))
    # Upstream finetune.py: load_dataset("json") then train_test_split(test_size=n, shuffle=True, seed=42).
    raw = datasets.load_dataset("json", data_files=path, split="train", cache_dir=str(tmp_path / "hf_cache"))
    upstream = raw.train_test_split(test_size=12, shuffle=True, seed=42)
    assert [rows[r]["instruction"] for r in data.val["row"]] == upstream["test"]["instruction"]
    assert [rows[r]["instruction"] for r in data.train["row"]] == upstream["train"]["instruction"]


def test_validation_split_is_deterministic_and_follows_the_seed(tmp_path):
    path = write_json(tmp_path / "t.json", [record(i) for i in range(50)])
    a = build(tmp_path, [path], val_set_size=10)
    b = build(tmp_path, [path], val_set_size=10)
    c = build(tmp_path, [path], val_set_size=10, val_seed=7)
    assert a.val["row"] == b.val["row"] and a.val["input_ids"] == b.val["input_ids"]
    assert a.val["row"] != c.val["row"]


def test_val_set_size_zero_and_too_large(tmp_path):
    path = write_json(tmp_path / "t.json", [record(i) for i in range(5)])
    assert build(tmp_path, [path]).val is None
    with pytest.raises(UserError, match="data.val_set_size: expected fewer than the 5 usable training rows"):
        build(tmp_path, [path], val_set_size=5)


def test_real_files_with_olmoe(tmp_path, shared_dir):
    root = shared_dir / "data" / "llm_adapters"
    math = json.loads((root / "ft-training_set" / "math_data.json").read_text())[:60]
    arc = json.loads((root / "ARC-Challenge" / "train.json").read_text())[:60]
    files = [write_json(tmp_path / "math.json", math), write_json(tmp_path / "arc.json", arc)]
    tok = load_tokenizer(shared_dir / "tokenizers" / "olmoe_tokenizer.json")
    data = build(tmp_path, files, tokenizer=tok, val_set_size=20, train_on_inputs=False)
    assert (len(data.train), len(data.val), data.num_skipped) == (100, 20, 0)
    rows = math + arc
    for got in list(data.train)[:10]:
        split = record_prompt_split(rows[got["row"]])
        want = tokenize_example(tok, split.prompt, split.full, DataConfig(train_on_inputs=False))
        assert (got["input_ids"], got["labels"]) == (want.input_ids, want.labels)


# --- datasets.load_from_disk input ------------------------------------------------------------------------


def test_hf_disk_input_matches_json_input(tmp_path):
    rows = [record(i) for i in range(20)]
    json_path = write_json(tmp_path / "t.json", rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "disk_dict"))
    want = build(tmp_path, [json_path], val_set_size=4)
    for folder in ("disk", "disk_dict"):
        got = build(tmp_path, [str(tmp_path / folder)], dataset_format="hf_disk", val_set_size=4)
        assert got.val["row"] == want.val["row"]
        assert got.train["input_ids"] == want.train["input_ids"]


def test_hf_disk_errors_name_the_folder_and_row(tmp_path):
    folder = str(tmp_path / "disk")
    datasets.Dataset.from_list([record(0), {"instruction": "q", "output": None}]).save_to_disk(folder)
    with pytest.raises(UserError, match=rf"^{folder}: row 1: 'output' is missing"):
        build(tmp_path, [folder], dataset_format="hf_disk")
    datasets.DatasetDict({"test": datasets.Dataset.from_list([record(0)])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match="without a 'train' split"):
        build(tmp_path, [str(tmp_path / "dd")], dataset_format="hf_disk")


# --- files and config -------------------------------------------------------------------------------------


def test_missing_or_no_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="data.train_files: expected at least one"):
        load_records(DataConfig())
    with pytest.raises(UserError, match="nope.json: training file not found"):
        build(tmp_path, [str(tmp_path / "nope.json")])


def test_invalid_json_is_a_user_error(tmp_path):
    (tmp_path / "bad.json").write_text('[{"instruction": "q", "output": ')
    with pytest.raises(UserError, match="bad.json"):
        build(tmp_path, [str(tmp_path / "bad.json")])


def test_config_defaults_are_the_published_setup():
    cfg = DataConfig().validate_config()
    assert (cfg.cutoff_len, cfg.train_on_inputs, cfg.add_eos, cfg.val_set_size, cfg.val_seed) == (256, True, True,
                                                                                                  120, 42)
    assert (cfg.batch_size, cfg.pad_to_multiple_of, cfg.pad_id, cfg.length_buckets) == (16, 8, 0, ())


@pytest.mark.parametrize("overrides, message", [
    ({"cutoff_len": 0}, "data.cutoff_len: expected a positive integer, got 0"),
    ({"cutoff_len": True}, "data.cutoff_len: expected a positive integer, got True"),
    ({"batch_size": -1}, "data.batch_size: expected a positive integer, got -1"),
    ({"val_set_size": -1}, "data.val_set_size: expected an integer >= 0, got -1"),
    ({"dataset_format": "csv"}, "data.dataset_format: expected one of ['json', 'hf_disk'], got 'csv'"),
    ({"train_on_inputs": "no"}, "data.train_on_inputs: expected true or false, got 'no'"),
    ({"length_buckets": (128, 64, 256)}, "data.length_buckets: expected strictly increasing lengths"),
    ({"length_buckets": (64, 128)}, "data.length_buckets: expected a largest bucket >= cutoff_len=256"),
    ({"train_files": "a.json"}, "data.train_files: expected a list of file or folder paths"),
])
def test_config_validation_names_key_expectation_and_value(overrides, message):
    with pytest.raises(UserError) as err:
        DataConfig(**overrides).validate_config()
    assert str(err.value).startswith(message)
