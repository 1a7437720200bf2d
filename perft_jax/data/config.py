"""The `data` config section: which files to train on, how to tokenise them and how to batch them.

Defaults reproduce the published setup: shared/data/llm_adapters/README.md §2 (cutoff 256, EOS when there is room,
`train_on_inputs=True`, pad id 0 with left padding, padding to a multiple of 8) and shared/spec/PERFT.md §7
(a 120-example validation split drawn with seed 42, batch 16).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from perft_jax.errors import UserError

DatasetFormat = Literal["json", "hf_disk"]
DATASET_FORMATS = ("json", "hf_disk")


def _is_int(value: object) -> bool:
    # bool is an int subclass; `cutoff_len: true` in a YAML file is a typo, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Attributes:
    train_files: LLM-Adapters JSON files (`dataset_format: json`: arrays of instruction / input / output rows) or
        `datasets.save_to_disk` folders (`dataset_format: hf_disk`), concatenated in the order given; one alone
        needs no list (`data.train_files=train.json`). Spec: data README §1. An entry that is no
        existing path but is shaped `namespace/name` is a hub dataset: its `train` split, loaded with
        `datasets.load_dataset(name, split="train")` (the user's datasets cache; offline under
        HF_DATASETS_OFFLINE=1), whatever `dataset_format` says. `./namespace/name` is always a path.
    dataset_format: `json` (read with `datasets.load_dataset("json", ...)`) or `hf_disk`
        (`datasets.load_from_disk`).
    cutoff_len: truncation length in tokens, special tokens included. Spec: data README §2.
    train_on_inputs: True: the loss covers prompt and response; False: the prompt's tokens get label -100.
    add_eos: append EOS when the text was not truncated and does not already end in EOS. Spec: data README §2.
    val_set_size: rows held out for validation loss (the paper: 120); 0 disables the split.
    val_seed: seed of the validation split (upstream `train_test_split(..., seed=42)`).
    shuffle_seed: seed of the per-epoch training order (`numpy.random.default_rng((shuffle_seed, epoch))`).
    batch_size: global batch per optimizer micro-step, summed over all hosts.
    pad_to_multiple_of: without `length_buckets`, each batch is padded to the next multiple of this.
    length_buckets: fixed sequence lengths, increasing; a batch takes the smallest one that fits its longest row.
        Empty: the multiple-of rule above. The largest bucket must hold `cutoff_len` tokens.
    pad_id: token id put in padded positions (upstream LLM-Adapters pads with 0; the attention mask hides them).
    skip_malformed: drop (and count) rows that lack a string `instruction`/`output` or tokenise to nothing,
        instead of refusing the file.
    drop_last: drop each epoch's last partial batch; False fills it up with empty rows (all labels -100).
    """

    train_files: tuple[str, ...] = ()
    dataset_format: DatasetFormat = "json"
    cutoff_len: int = 256
    train_on_inputs: bool = True
    add_eos: bool = True
    val_set_size: int = 120
    val_seed: int = 42
    shuffle_seed: int = 0
    batch_size: int = 16
    pad_to_multiple_of: int = 8
    length_buckets: tuple[int, ...] = ()
    pad_id: int = 0
    skip_malformed: bool = False
    drop_last: bool = True

    def validate_config(self, prefix: str = "data") -> DataConfig:
        """Checks types and ranges once, at load time; returns self so calls can chain.

        Raises:
            UserError: naming the dotted key, what was expected and the value, e.g.
                `data.cutoff_len: expected a positive integer, got 0`.
        """

        def fail(key: str, expected: str) -> None:
            raise UserError(f"{prefix}.{key}: expected {expected}, got {getattr(self, key)!r}")

        if not isinstance(self.train_files, (tuple, list)) or not all(isinstance(f, str) for f in self.train_files):
            fail("train_files", "a list of file or folder paths")
        if self.dataset_format not in DATASET_FORMATS:
            fail("dataset_format", f"one of {list(DATASET_FORMATS)}")
        for key in ("cutoff_len", "batch_size", "pad_to_multiple_of"):
            value = getattr(self, key)
            if not _is_int(value) or value <= 0:
                fail(key, "a positive integer")
        for key in ("val_set_size", "val_seed", "shuffle_seed", "pad_id"):
            value = getattr(self, key)
            if not _is_int(value) or value < 0:
                fail(key, "an integer >= 0")
        for key in ("train_on_inputs", "add_eos", "skip_malformed", "drop_last"):
            if not isinstance(getattr(self, key), bool):
                fail(key, "true or false")
        buckets = self.length_buckets
        if not isinstance(buckets, (tuple, list)) or not all(_is_int(b) and b > 0 for b in buckets):
            fail("length_buckets", "a list of positive integers")
        if any(a >= b for a, b in zip(buckets, buckets[1:])):
            fail("length_buckets", "strictly increasing lengths")
        if buckets and buckets[-1] < self.cutoff_len:
            # Every tokenised row has at most cutoff_len tokens; a row no bucket can hold would stop training.
            fail("length_buckets", f"a largest bucket >= cutoff_len={self.cutoff_len}")
        return self
