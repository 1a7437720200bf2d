"""Training records: load, check, tokenise once, split off the validation set.

Implements shared/data/llm_adapters/README.md §1 (record schema: string `instruction` and `output`, optional
`input`) and §2 (training prompt, tokenisation, validation split), with shared/spec/PERFT.md §7 (a 120-row
validation split drawn with seed 42). Upstream `finetune.py` does `load_dataset("json", data_files=...)`, then
`train_test_split(test_size=val_set_size, shuffle=True, seed=42)`; this module uses the same `datasets` calls so
that the held-out rows are the same ones.

Rows are checked and tokenised before the split, so an error names the row of the file it came from. With no
malformed row this gives the same split as upstream, which splits first: `train_test_split`'s permutation depends
only on the row count and the seed.

A JSON file (a JSON array of records, or JSON Lines, as `load_dataset("json")` reads both) is first checked here:
UTF-8, not empty, every record an object; what `datasets` would turn into a traceback or a silently wrong table
(`[]`, `[1, 2]`, `{"data": [...]}`) is a one-line error naming the file and the row or line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib

import datasets
import numpy as np

from perft_jax.data.config import DataConfig
from perft_jax.data.prompts import record_prompt_split
from perft_jax.data.tokenize import Tokenizer, tokenize_batch
from perft_jax.errors import UserError
from perft_jax.hub import is_hub_name

log = logging.getLogger(__name__)

# Columns of a tokenised split: the rows for `batching.BatchIterator`, plus `row`, the index of the record in
# the concatenated input files (for tracing a batch back to its source).
TOKENIZED_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "row": datasets.Value("int64"),
})
_ERROR_COLUMN = "_error"
_MAP_BATCH = 1000


@dataclasses.dataclass(frozen=True)
class RecordSource:
    """The records of each input file, in the order of `data.train_files`.

    Files are kept apart (not concatenated) because their columns may differ, e.g. an extra key or a
    column `datasets` typed as JSON because one row holds a number; only the tokenised rows share a schema.

    Attributes:
        files: the input paths.
        parts: one `datasets.Dataset` of records per file.
    """

    files: tuple[str, ...]
    parts: tuple[datasets.Dataset, ...]

    @property
    def starts(self) -> tuple[int, ...]:
        """Index of each file's first row among all rows, in order."""
        return tuple(int(x) for x in np.cumsum([0] + [len(p) for p in self.parts[:-1]]))

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """The tokenised splits.

    Attributes:
        train: columns `input_ids` [T_i] int32, `labels` [T_i] int32 (-100 = ignored), `row` int64.
        val: the same columns, `val_set_size` rows; None when `val_set_size == 0`.
        num_skipped: malformed rows dropped under `skip_malformed` (0 otherwise).
        skipped: one `<file>: row <i>: <why>` line per dropped row.
    """

    train: datasets.Dataset
    val: datasets.Dataset | None
    num_skipped: int = 0
    skipped: tuple[str, ...] = ()


def _parse_json(path: str, text: str, where: str = ""):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: {where}not valid JSON ({err})") from None


def _json_records(path: str, text: str) -> list[tuple[str, object]]:
    """The records of a JSON array ("row <i>", 0-based) or of JSON Lines ("line <n>", as editors number them)."""
    body = text.lstrip()
    if body.startswith("["):
        return [(f"row {i}", record) for i, record in enumerate(_parse_json(path, text))]
    if body.startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:  # JSON Lines: one record per line
            lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
            return [(f"line {n}", _parse_json(path, line, f"line {n}: ")) for n, line in lines]
        if "instruction" not in whole:  # e.g. {"data": [...]}: `datasets` would read it as one row
            raise UserError(f"{path}: a JSON object with keys {sorted(whole)[:5]}; expected a JSON array of records "
                            "(README §1) or JSON Lines (one record per line)")
        return [("row 0", whole)]
    value = _parse_json(path, text)
    raise UserError(f"{path}: expected a JSON array of records (README §1), got {type(value).__name__}")


def _check_json_file(path: str) -> None:
    """A one-line error for a training file that is no JSON array (or JSON Lines) of objects, before `datasets`
    reads it: it fails on `[]` or an empty file with a traceback, reads `[1, 2]` as a "text" column and
    `{"data": [...]}` as one row."""
    file = pathlib.Path(path)
    if file.is_dir():
        raise UserError(f"{path}: a directory, but data.dataset_format=json reads JSON files (a "
                        "`datasets.save_to_disk` folder needs data.dataset_format=hf_disk)")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # `datasets` skips a BOM too
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); save it as "
                        "UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: empty file; expected a JSON array of records (README §1)")
    records = _json_records(path, text)
    if not records:
        raise UserError(f"{path}: an empty JSON array; expected at least one record (README §1)")
    for where, record in records:
        if not isinstance(record, dict):
            raise UserError(f"{path}: {where}: expected a JSON object with 'instruction' and 'output', "
                            f"got {type(record).__name__}")


def _load_hub_dataset(name: str) -> datasets.Dataset:
    """The `train` split of hub dataset `name`, as `datasets.load_dataset(name, split="train")` loads it.

    It uses the user's datasets cache (HF_DATASETS_CACHE, else HF_HOME/datasets), not the run's, so that offline
    (HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1) it finds what an earlier online load prepared there.
    """
    where = "HF_DATASETS_OFFLINE=1" if datasets.config.HF_HUB_OFFLINE else "the hub cannot be reached"
    fetch = f"python -c \"import datasets; datasets.load_dataset('{name}', split='train')\""
    try:
        return datasets.load_dataset(name, split="train")
    except ConnectionError:
        raise UserError(f"{name}: no such file, and not a dataset in the local datasets cache ({where}): run `{fetch}` "
                        "on a machine with network (it fills HF_DATASETS_CACHE), or pass a local file "
                        "(data.train_files)") from None
    except datasets.exceptions.DatasetNotFoundError as err:
        raise UserError(f"{name}: no such file, and not a dataset on the hub ({err})") from None
    except ValueError as err:  # e.g. no split named train
        raise UserError(f"{name}: cannot load the hub dataset's 'train' split ({err})") from None


def _load_one(path: str, dataset_format: str, cache_dir: str | None) -> datasets.Dataset:
    if is_hub_name(path):
        return _load_hub_dataset(path)
    if not pathlib.Path(path).exists():
        raise UserError(f"{path}: training file not found (data.train_files)")
    if dataset_format == "json":
        _check_json_file(path)
        try:
            return datasets.load_dataset("json", data_files=[path], split="train", cache_dir=cache_dir)
        except datasets.exceptions.DatasetGenerationError as err:
            raise UserError(f"{path}: cannot load as LLM-Adapters JSON ({err.__cause__ or err})") from err
    if pathlib.Path(path).is_file():
        raise UserError(f"{path}: a file, but data.dataset_format=hf_disk reads `datasets.save_to_disk` folders (a "
                        "JSON file needs data.dataset_format=json)")
    try:
        loaded = datasets.load_from_disk(path)
    except (OSError, ValueError) as err:  # also a damaged one: pyarrow's read errors are OSError / ValueError
        raise UserError(f"{path}: not a readable `datasets.save_to_disk` folder ({err})") from err
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(f"{path}: a DatasetDict without a 'train' split (splits: {sorted(loaded)})")
        loaded = loaded["train"]
    return loaded


def load_records(cfg: DataConfig, cache_dir: str | None = None) -> RecordSource:
    """Reads every file of `cfg.train_files`.

    Args:
        cfg: uses `train_files` and `dataset_format`.
        cache_dir: the `datasets` cache for JSON loading (default: the HF datasets cache).

    Raises:
        UserError: no files, a missing or unreadable file, a row that is not an object.
    """
    if not cfg.train_files:
        raise UserError("data.train_files: expected at least one training file, got []")
    files = tuple(str(p) for p in cfg.train_files)
    return RecordSource(files, tuple(_load_one(path, cfg.dataset_format, cache_dir) for path in files))


def _check_record(record: dict) -> str:
    """Why a record cannot be trained on (README §1), or "" when it can."""
    for key in ("instruction", "output"):
        value = record.get(key)
        if value is None:
            # `datasets` fills a key absent from some rows with None, so absent and null look alike.
            return f"{key!r} is missing or null"
        if not isinstance(value, str):
            return f"{key!r} must be a string, got {type(value).__name__}"
    input_text = record.get("input")
    if input_text is not None and not isinstance(input_text, str):
        return f"'input' must be a string, got {type(input_text).__name__}"
    return ""


def _tokenize_map(batch: dict, indices: list[int], tokenizer: Tokenizer, cfg: DataConfig, start: int) -> dict:
    """`datasets.map` body: checks and tokenises a batch of records; bad rows get an `_error` and no tokens."""
    keys = list(batch)
    rows = [{k: batch[k][j] for k in keys} for j in range(len(indices))]
    errors = [_check_record(r) for r in rows]
    good = [j for j, e in enumerate(errors) if not e]
    splits = [record_prompt_split(rows[j]) for j in good]
    examples = tokenize_batch(tokenizer, [s.prompt for s in splits], [s.full for s in splits], cfg,
                              allow_empty=True)
    out = {"input_ids": [[] for _ in rows], "labels": [[] for _ in rows], "row": [start + i for i in indices],
           _ERROR_COLUMN: errors}
    for j, example in zip(good, examples):
        if not example.input_ids:
            out[_ERROR_COLUMN][j] = "the training text tokenises to no tokens"
        out["input_ids"][j], out["labels"][j] = example.input_ids, example.labels
    return out


def _tokenize_part(path: str, records: datasets.Dataset, start: int, tokenizer: Tokenizer,
                   cfg: DataConfig) -> tuple[datasets.Dataset, list[str]]:
    """One file's rows, tokenised, with one `<file>: row <i>: <why>` line per malformed row."""
    # The tokenizer is not hashable by `datasets`; the fingerprint only labels this in-memory result.
    fingerprint = hashlib.sha256(repr((records._fingerprint, getattr(tokenizer, "source", type(tokenizer)), start,
                                       cfg.cutoff_len, cfg.add_eos, cfg.train_on_inputs)).encode()).hexdigest()
    tokenized = records.map(
        _tokenize_map, fn_kwargs={"tokenizer": tokenizer, "cfg": cfg, "start": start}, with_indices=True,
        batched=True, batch_size=_MAP_BATCH, remove_columns=records.column_names, keep_in_memory=True,
        features=datasets.Features({**TOKENIZED_FEATURES, _ERROR_COLUMN: datasets.Value("string")}),
        new_fingerprint=fingerprint[:32], desc=f"tokenizing {pathlib.Path(path).name}")
    errors = tokenized[_ERROR_COLUMN][:]
    bad = [i for i, e in enumerate(errors) if e]
    if bad:
        keep = np.setdiff1d(np.arange(len(errors)), np.asarray(bad))
        tokenized = tokenized.select(keep, keep_in_memory=True)
    return tokenized.remove_columns(_ERROR_COLUMN), [f"{path}: row {i}: {errors[i]}" for i in bad]


def tokenize_records(source: RecordSource, tokenizer: Tokenizer, cfg: DataConfig) -> tuple[datasets.Dataset,
                                                                                              tuple[str, ...]]:
    """Checks and tokenises every record once (README §2).

    Returns:
        The tokenised rows (TOKENIZED_FEATURES, in file and row order, malformed rows left out; `row` counts
        across all files) and one `<file>: row <i>: <why>` line per malformed row (0-based within its file).

    Raises:
        UserError: the first malformed row, naming its file and row, unless `cfg.skip_malformed`; no usable row.
    """
    parts, messages = [], []
    for path, records, start in zip(source.files, source.parts, source.starts):
        part, bad = _tokenize_part(path, records, start, tokenizer, cfg)
        if bad and not cfg.skip_malformed:
            more = f" ({len(bad) - 1} more malformed rows in this file; data.skip_malformed=true drops them)"
            raise UserError(bad[0] + (more if len(bad) > 1 else ""))
        parts.append(part)
        messages.extend(bad)
    if messages:
        for message in messages[:10]:
            log.warning("skipping malformed row: %s", message)
        log.warning("skipped %d malformed rows of %d (data.skip_malformed)", len(messages), len(source))
    tokenized = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(tokenized) == 0:
        found = f"all {len(source)} rows are malformed (first: {messages[0]})" if messages else "they hold no rows"
        raise UserError(f"data.train_files: no usable training row in {list(source.files)}: {found}")
    return tokenized, tuple(messages)


def split_validation(tokenized: datasets.Dataset, cfg: DataConfig) -> tuple[datasets.Dataset,
                                                                            datasets.Dataset | None]:
    """Holds out `cfg.val_set_size` rows, as upstream's `train_test_split(test_size=n, shuffle=True, seed=42)`.

    Returns:
        (train, val); val is None when `val_set_size == 0`. Train rows come in the split's permuted order; the
        batch iterator reshuffles them every epoch anyway.

    Raises:
        UserError: fewer rows than `val_set_size + 1`.
    """
    if cfg.val_set_size == 0:
        return tokenized, None
    if cfg.val_set_size >= len(tokenized):
        raise UserError(f"data.val_set_size: expected fewer than the {len(tokenized)} usable training rows, "
                        f"got {cfg.val_set_size}")
    parts = tokenized.train_test_split(test_size=cfg.val_set_size, shuffle=True, seed=cfg.val_seed,
                                       keep_in_memory=True)
    return parts["train"], parts["test"]


def build_training_data(cfg: DataConfig, tokenizer: Tokenizer, cache_dir: str | None = None) -> TrainingData:
    """Loads `cfg.train_files`, checks and tokenises every row once, and splits off the validation rows.

    Args:
        cfg: the `data` section (validated here).
        tokenizer: from `tokenize.load_tokenizer`.
        cache_dir: the `datasets` cache for JSON loading (default: the HF datasets cache).

    Raises:
        UserError: a bad config value, file or row (named with its file and 0-based row index).
    """
    cfg.validate_config()
    source = load_records(cfg, cache_dir=cache_dir)
    tokenized, skipped = tokenize_records(source, tokenizer, cfg)
    train, val = split_validation(tokenized, cfg)
    return TrainingData(train=train, val=val, num_skipped=len(skipped), skipped=skipped)
