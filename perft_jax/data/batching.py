"""Deterministic, resumable batches of fixed shapes (data README §2 "Batching").

Upstream pads each batch with a seq2seq collator: pad id 0 on the LEFT, labels padded with -100, the length
rounded up to a multiple of 8. The same is done here, with two changes for a jitted step:

- every batch has exactly `batch_size` rows (a short last batch is dropped, or filled with empty rows), and
  its length is either the next multiple of `pad_to_multiple_of` or one of a few fixed `length_buckets`, so
  the step compiles once per length rather than once per batch;
- the order is a pure function of `(shuffle_seed, epoch)`, so the iterator's position is two integers that a
  checkpoint can store, and a restored iterator yields exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from perft_jax.data.config import DataConfig
from perft_jax.errors import UserError
from perft_jax.labels import IGNORE_INDEX

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class RaggedRows:
    """Tokenised rows of different lengths, stored flat so that gathering a batch is cheap.

    Attributes:
        input_ids: [N_tokens] int32, all rows concatenated.
        labels: [N_tokens] int32, aligned with input_ids.
        offsets: [N + 1] int64; row i is `input_ids[offsets[i]:offsets[i + 1]]`.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_lists(cls, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> RaggedRows:
        """From per-row lists, e.g. `TokenizedExample`s; row i's ids and labels must have the same length."""
        if len(input_ids) != len(labels):
            raise UserError(f"{len(input_ids)} rows of input_ids but {len(labels)} rows of labels")
        lengths = np.asarray([len(r) for r in input_ids], dtype=np.int64)
        if not np.array_equal(lengths, [len(r) for r in labels]):
            raise UserError("input_ids and labels rows differ in length")
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

        def flat(rows: Sequence[Sequence[int]]) -> np.ndarray:
            return np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))

        return cls(flat(input_ids), flat(labels), offsets)

    @classmethod
    def from_dataset(cls, dataset) -> RaggedRows:
        """From a `datasets.Dataset` with list columns `input_ids` and `labels` (as `dataset.py` builds them).

        Reads the Arrow columns directly: one copy, no Python loop over rows.
        """
        table = dataset.select_columns(["input_ids", "labels"]).with_format("arrow")[:]
        columns = []
        for name in ("input_ids", "labels"):
            array = table.column(name).combine_chunks()
            offsets = np.asarray(array.offsets, dtype=np.int64)
            # combine_chunks rebases offsets to 0 today; rebasing again is free and guards a zero-copy slice.
            columns.append((np.asarray(array.flatten(), dtype=np.int32), offsets - offsets[0]))
        (ids, offsets), (labels, label_offsets) = columns
        if not np.array_equal(offsets, label_offsets):
            raise UserError("input_ids and labels rows differ in length")
        return cls(ids, labels, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """[N] int64 tokens per row."""
        return np.diff(self.offsets)


def batch_length(longest: int, cfg: DataConfig) -> int:
    """Padded length L of a batch whose longest row has `longest` tokens.

    The smallest of `cfg.length_buckets` that holds it, or else `longest` rounded up to a multiple of
    `cfg.pad_to_multiple_of` (README §2: the collator pads to a multiple of 8).
    """
    if cfg.length_buckets:
        for bucket in cfg.length_buckets:
            if bucket >= longest:
                return bucket
        raise UserError(f"data.length_buckets: a row has {longest} tokens, more than the largest bucket "
                        f"{cfg.length_buckets[-1]}")
    m = cfg.pad_to_multiple_of
    return -(-longest // m) * m


def collate(rows: RaggedRows, indices: Sequence[int], batch_size: int, cfg: DataConfig, pad_id: int) -> Batch:
    """Left-pads the given rows into one fixed-shape batch (README §2: pad id 0, left padding).

    Args:
        rows: the tokenised rows.
        indices: up to batch_size row indices; missing rows are filled with empty rows (all padding,
            attention 0, labels -100), which add nothing to a token-averaged loss.
        batch_size: B.
        cfg: sets the length rule (`length_buckets` / `pad_to_multiple_of`).
        pad_id: the id written in padded positions.

    Returns:
        `input_ids`, `labels`, `attention_mask`: each [B, L] int32; labels are -100 on padding.
    """
    if len(indices) > batch_size:
        raise UserError(f"{len(indices)} rows do not fit a batch of {batch_size}")
    lengths = rows.lengths[np.asarray(indices, dtype=np.int64)] if len(indices) else np.zeros(1, np.int64)
    L = batch_length(int(max(lengths.max(), 1)), cfg)
    input_ids = np.full((batch_size, L), pad_id, dtype=np.int32)
    labels = np.full((batch_size, L), IGNORE_INDEX, dtype=np.int32)
    attention_mask = np.zeros((batch_size, L), dtype=np.int32)
    for b, i in enumerate(indices):
        start, end = rows.offsets[i], rows.offsets[i + 1]
        n = end - start
        # README §2: upstream pads on the left; the model takes positions from attention_mask, not the column.
        input_ids[b, L - n:] = rows.input_ids[start:end]
        labels[b, L - n:] = rows.labels[start:end]
        attention_mask[b, L - n:] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def process_slice(batch: Mapping[str, np.ndarray], process_index: int, process_count: int) -> Batch:
    """This host's rows `[process_index::process_count]` of a global batch (multi-host data loading).

    Every host runs the same iterator and keeps its own strided share; since L is chosen from the whole global
    batch, all hosts agree on the shape.

    Args:
        batch: a global batch, arrays [B, L].
        process_index, process_count: `jax.process_index()`, `jax.process_count()`.

    Returns:
        The same keys, arrays [B // process_count, L].
    """
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, {process_count})")
    B = next(iter(batch.values())).shape[0]
    if B % process_count:
        raise UserError(f"data.batch_size: expected a multiple of the {process_count} processes, got {B}")
    return {k: v[process_index::process_count] for k, v in batch.items()}


class BatchIterator:
    """Endless training batches, epoch after epoch, in a reproducible and resumable order.

    Epoch e visits the rows in the order `numpy.random.default_rng((shuffle_seed, e)).permutation(N)`, cut into
    `steps_per_epoch` batches of `batch_size` rows; see `collate` for the padding. The position is
    `state() == {"epoch": e, "index": i, ...}`: batch i of epoch e is next.
    """

    def __init__(self, rows: RaggedRows, cfg: DataConfig, pad_id: int | None = None):
        """Args:
        rows: the training rows (`RaggedRows`, or a `datasets.Dataset` with `input_ids` / `labels`).
        cfg: uses `batch_size`, `shuffle_seed`, `drop_last`, `cutoff_len` and the length rule.
        pad_id: the id of padded positions; defaults to `cfg.pad_id` (0, as upstream).
        """
        if not isinstance(rows, RaggedRows):
            rows = RaggedRows.from_dataset(rows)
        self.rows, self.cfg = rows, cfg
        self.pad_id = cfg.pad_id if pad_id is None else pad_id
        n, B = len(rows), cfg.batch_size
        if n and rows.lengths.max() > cfg.cutoff_len:
            raise UserError(f"row {int(rows.lengths.argmax())} has {rows.lengths.max()} tokens, more than "
                            f"data.cutoff_len={cfg.cutoff_len}; tokenise with the same config")
        self.steps_per_epoch = n // B if cfg.drop_last else -(-n // B)
        if self.steps_per_epoch == 0:
            raise UserError(f"data.batch_size: {n} training rows give no full batch of {B} (data.drop_last=true)")
        self._epoch, self._index = 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """[N] int64: the row order of `epoch`, a function of (shuffle_seed, epoch) only."""
        if epoch != self._order_epoch:
            rng = np.random.default_rng((self.cfg.shuffle_seed, epoch))
            self._order, self._order_epoch = rng.permutation(len(self.rows)), epoch
        return self._order

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        B = self.cfg.batch_size
        indices = self.epoch_order(self._epoch)[self._index * B:(self._index + 1) * B]
        batch = collate(self.rows, indices, B, self.cfg, self.pad_id)
        self._index += 1
        if self._index == self.steps_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return batch

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self._epoch

    def state(self) -> dict[str, int]:
        """The position, as a JSON-able dict; `num_rows`, `batch_size` and `shuffle_seed` guard `restore`."""
        return {"epoch": self._epoch, "index": self._index, "num_rows": len(self.rows),
                "batch_size": self.cfg.batch_size, "shuffle_seed": self.cfg.shuffle_seed}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continues from a `state()`: the next batches equal those an uninterrupted iterator yields.

        Raises:
            UserError: the state is malformed or was taken with other data, batch size or seed.
        """
        for key in ("epoch", "index"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise UserError(f"data iterator state: expected a non-negative integer {key!r}, got {state!r}")
        current = self.state()
        for key in ("num_rows", "batch_size", "shuffle_seed"):
            if key in state and state[key] != current[key]:
                raise UserError(f"data iterator state: saved with {key}={state[key]}, but now {key}={current[key]}")
        if state["index"] >= self.steps_per_epoch:
            raise UserError(f"data iterator state: index {state['index']} is past the epoch's "
                            f"{self.steps_per_epoch} batches")
        self._epoch, self._index = int(state["epoch"]), int(state["index"])


def eval_batches(rows: RaggedRows, cfg: DataConfig, pad_id: int | None = None) -> Iterator[Batch]:
    """All rows once, in order, in fixed-shape batches; the last one is filled with empty rows (labels -100).

    For validation loss: no shuffling, nothing dropped.
    """
    if not isinstance(rows, RaggedRows):
        rows = RaggedRows.from_dataset(rows)
    pad_id = cfg.pad_id if pad_id is None else pad_id
    B = cfg.batch_size
    for start in range(0, len(rows), B):
        yield collate(rows, range(start, min(start + B, len(rows))), B, cfg, pad_id)
