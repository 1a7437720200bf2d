"""Specs for deterministic, resumable, fixed-shape batching (data README §2 "Batching")."""
from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from perft_jax.data.batching import (
    BatchIterator,
    RaggedRows,
    batch_length,
    collate,
    eval_batches,
    process_slice,
)
from perft_jax.data.config import DataConfig
from perft_jax.errors import UserError

KEYS = ("input_ids", "labels", "attention_mask")


def make_rows(n=37, seed=0, max_len=60):
    """n rows of random lengths in [1, max_len]; ids are 1000 * row + position so every token names its row, and
    labels mask the first two tokens so labels differ from ids."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, size=n)
    ids = [[1000 * (r + 1) + t for t in range(k)] for r, k in enumerate(lengths)]
    labels = [[-100 if t < 2 else x for t, x in enumerate(row)] for row in ids]
    return ids, labels


def unpad(batch, b):
    """Row b of a batch without its left padding (ids, labels)."""
    keep = batch["attention_mask"][b].astype(bool)
    return batch["input_ids"][b][keep].tolist(), batch["labels"][b][keep].tolist()


def cfg_for(**overrides):
    return DataConfig(**{"batch_size": 8, "cutoff_len": 64, **overrides}).validate_config()


def batches_equal(a, b):
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


# --- shapes and padding -------------------------------------------------------------------------------------


def test_batches_have_fixed_shapes_left_padding_and_masked_labels():
    ids, labels = make_rows()
    cfg = cfg_for()
    it = BatchIterator(RaggedRows.from_lists(ids, labels), cfg)
    for _ in range(it.steps_per_epoch):
        batch = next(it)
        assert tuple(batch) == KEYS
        B, L = batch["input_ids"].shape
        assert B == 8 and L % 8 == 0
        lengths = batch["attention_mask"].sum(axis=1)
        assert L == -(-lengths.max() // 8) * 8  # the smallest multiple of 8 that fits the longest row
        for k in KEYS:
            assert batch[k].dtype == np.int32 and batch[k].shape == (B, L)
        for b in range(B):
            n = lengths[b]
            # Left padding: pad id 0 and attention 0 first, then the row's tokens up to the last column.
            assert batch["attention_mask"][b].tolist() == [0] * (L - n) + [1] * n
            assert (batch["input_ids"][b, :L - n] == 0).all() and (batch["labels"][b, :L - n] == -100).all()
            row = batch["input_ids"][b, -1] // 1000 - 1
            assert unpad(batch, b) == (ids[row], labels[row])


def test_pad_id_comes_from_config_or_argument():
    ids, labels = make_rows(n=8)
    rows = RaggedRows.from_lists(ids, labels)
    batch = next(BatchIterator(rows, cfg_for(pad_id=5)))
    short = int(batch["attention_mask"].sum(axis=1).argmin())
    assert batch["input_ids"][short, 0] == 5
    assert next(BatchIterator(rows, cfg_for(pad_id=5), pad_id=1))["input_ids"][short, 0] == 1


def test_length_buckets_pick_the_smallest_that_fits():
    cfg = cfg_for(length_buckets=(16, 40, 64))
    assert [batch_length(n, cfg) for n in (1, 16, 17, 40, 41, 64)] == [16, 16, 40, 40, 64, 64]
    ids, labels = make_rows(n=64)
    it = BatchIterator(RaggedRows.from_lists(ids, labels), cfg)
    assert {next(it)["input_ids"].shape[1] for _ in range(it.steps_per_epoch)} <= {16, 40, 64}
    with pytest.raises(UserError, match="largest bucket 64"):
        batch_length(65, cfg)


def test_multiple_of_rule():
    cfg = cfg_for(cutoff_len=256)
    assert [batch_length(n, cfg) for n in (1, 8, 9, 250, 256)] == [8, 8, 16, 256, 256]


# --- epochs, order, drop_last -------------------------------------------------------------------------------


def rows_of(batch):
    keep = batch["attention_mask"].any(axis=1)
    return (batch["input_ids"][keep, -1] // 1000 - 1).tolist()


def test_each_epoch_visits_distinct_rows_and_drops_the_remainder():
    ids, labels = make_rows(n=37)
    it = BatchIterator(RaggedRows.from_lists(ids, labels), cfg_for())
    assert it.steps_per_epoch == 4
    epochs = [[r for _ in range(4) for r in rows_of(next(it))] for _ in range(2)]
    for seen in epochs:
        assert len(seen) == len(set(seen)) == 32
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert epochs[0] == np.random.default_rng((0, 0)).permutation(37)[:32].tolist()


def test_drop_last_false_fills_the_last_batch_with_empty_rows():
    ids, labels = make_rows(n=37)
    it = BatchIterator(RaggedRows.from_lists(ids, labels), cfg_for(drop_last=False))
    assert it.steps_per_epoch == 5
    batches = [next(it) for _ in range(5)]
    assert sorted(r for b in batches for r in rows_of(b)) == list(range(37))
    last = batches[-1]
    assert last["input_ids"].shape[0] == 8
    assert not last["attention_mask"][5:].any() and (last["labels"][5:] == -100).all()
    assert it.state()["epoch"] == 1


def test_same_seed_same_batches_other_seed_other_order():
    ids, labels = make_rows()
    rows = RaggedRows.from_lists(ids, labels)
    a, b, c = (BatchIterator(rows, cfg_for(shuffle_seed=s)) for s in (3, 3, 4))
    first = [next(a) for _ in range(6)]
    assert batches_equal(first, [next(b) for _ in range(6)])
    assert not batches_equal(first, [next(c) for _ in range(6)])


# --- exact resume -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("consumed", [0, 3, 4, 6, 9])  # steps_per_epoch is 4: before, at and after boundaries
def test_restore_continues_exactly_across_epoch_boundaries(consumed):
    ids, labels = make_rows()
    rows = RaggedRows.from_lists(ids, labels)
    cfg = cfg_for(shuffle_seed=11)
    reference = BatchIterator(rows, cfg)
    want = [next(reference) for _ in range(consumed + 7)][consumed:]

    interrupted = BatchIterator(rows, cfg)
    for _ in range(consumed):
        next(interrupted)
    saved = json.loads(json.dumps(interrupted.state()))  # what a checkpoint stores
    assert saved["epoch"] * 4 + saved["index"] == consumed

    resumed = BatchIterator(RaggedRows.from_lists(ids, labels), cfg)
    resumed.restore(saved)
    assert batches_equal([next(resumed) for _ in range(7)], want)


def test_restore_refuses_other_data_or_settings():
    ids, labels = make_rows()
    it = BatchIterator(RaggedRows.from_lists(ids, labels), cfg_for())
    state = it.state()
    with pytest.raises(UserError, match="batch_size=8, but now batch_size=4"):
        BatchIterator(RaggedRows.from_lists(ids, labels), cfg_for(batch_size=4)).restore(state)
    with pytest.raises(UserError, match="num_rows=37, but now num_rows=36"):
        BatchIterator(RaggedRows.from_lists(ids[:36], labels[:36]), cfg_for()).restore(state)
    with pytest.raises(UserError, match="past the epoch"):
        it.restore({"epoch": 0, "index": 4})
    with pytest.raises(UserError, match="'index'"):
        it.restore({"epoch": 0})


# --- multi-host slicing -------------------------------------------------------------------------------------


def test_process_slices_partition_the_global_batch():
    ids, labels = make_rows()
    batch = next(BatchIterator(RaggedRows.from_lists(ids, labels), cfg_for()))
    slices = [process_slice(batch, p, 4) for p in range(4)]
    for p, part in enumerate(slices):
        for k in KEYS:
            assert part[k].shape == (2, batch[k].shape[1])
            assert np.array_equal(part[k], batch[k][p::4])
    assert sorted(r for part in slices for r in rows_of(part)) == sorted(rows_of(batch))
    with pytest.raises(UserError, match="multiple of the 3 processes"):
        process_slice(batch, 0, 3)
    with pytest.raises(UserError, match="process_index 4"):
        process_slice(batch, 4, 4)


# --- inputs and errors --------------------------------------------------------------------------------------


def test_rows_from_a_split_dataset_equal_rows_from_lists():
    ids, labels = make_rows(n=30)
    ds = datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})
    part = ds.train_test_split(test_size=7, shuffle=True, seed=42)["train"]  # an indices mapping, not a copy
    got = RaggedRows.from_dataset(part)
    want = RaggedRows.from_lists(list(part["input_ids"]), list(part["labels"]))
    for field in ("input_ids", "labels", "offsets"):
        assert np.array_equal(getattr(got, field), getattr(want, field))
    assert got.input_ids.dtype == np.int32 and len(got) == 23
    sliced = RaggedRows.from_dataset(ds.select(range(5, 9)))
    assert sliced.input_ids.tolist() == [t for row in ids[5:9] for t in row]


def test_iterator_accepts_a_dataset():
    ids, labels = make_rows(n=16)
    ds = datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})
    assert batches_equal([next(BatchIterator(ds, cfg_for()))],
                         [next(BatchIterator(RaggedRows.from_lists(ids, labels), cfg_for()))])


def test_eval_batches_cover_all_rows_in_order():
    ids, labels = make_rows(n=21)
    batches = list(eval_batches(RaggedRows.from_lists(ids, labels), cfg_for()))
    assert [b["input_ids"].shape[0] for b in batches] == [8, 8, 8]
    assert [r for b in batches for r in rows_of(b)] == list(range(21))


def test_rows_longer_than_cutoff_or_too_few_rows_are_refused():
    ids, labels = make_rows(n=10, max_len=60)
    with pytest.raises(UserError, match="more than data.cutoff_len=16"):
        BatchIterator(RaggedRows.from_lists(ids, labels), cfg_for(cutoff_len=16))
    with pytest.raises(UserError, match="10 training rows give no full batch of 16"):
        BatchIterator(RaggedRows.from_lists(ids, labels), cfg_for(batch_size=16))
    with pytest.raises(UserError, match="do not fit"):
        collate(RaggedRows.from_lists(ids, labels), range(10), 8, cfg_for(), 0)


def test_ragged_rows_refuse_mismatched_lengths():
    with pytest.raises(UserError, match="differ in length"):
        RaggedRows.from_lists([[1, 2]], [[1]])
