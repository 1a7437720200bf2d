"""Readers of the run logs tests check: TensorBoard event files and W&B offline run files, back to plain values;
and `offline_wandb`, the environment every test that logs to W&B runs under.

Neither tensorboardX nor wandb (0.31) ships a reader, so these parse the two record formats directly: TFRecord
(TensorBoard: length, CRC, payload, CRC) of `Event` protos, and W&B's transaction log (LevelDB's log format
after a 7-byte `:W&B` header: 32 KiB blocks of chunks with a 7-byte header) of `Record` protos.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import struct
import sys
import time
from collections import defaultdict

import pytest

W_AND_B_HEADER = 7  # ":W&B", magic 0xBEE1, version
BLOCK = 32768
CHUNK_HEADER = 7  # crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def tensorboard_scalars(log_dir: str | pathlib.Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every scalar in the event files under `log_dir`."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = defaultdict(dict)
    for path in sorted(pathlib.Path(log_dir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out[value.tag][event.step] = value.simple_value
    return dict(out)


def _wandb_chunks(data: bytes):
    """The record payloads of one `.wandb` file, chunks of FIRST / MIDDLE / LAST joined."""
    pos, pending = W_AND_B_HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        payload = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            yield payload
        elif kind in (FIRST, MIDDLE):
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""
        else:  # zero-filled space after the last record
            return


def _wandb_records(path: pathlib.Path, timeout: float) -> list:
    """The records of one run file, once it holds the run's `exit` record: wandb-core (a separate process) writes
    the file out after `run.finish()` has returned."""
    from wandb.proto.wandb_internal_pb2 import Record

    deadline = time.monotonic() + timeout
    while True:
        records = [Record.FromString(payload) for payload in _wandb_chunks(path.read_bytes())]
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def wandb_history(wandb_dir: str | pathlib.Path, timeout: float = 60.0) -> list[dict]:
    """The rows a run logged (`run.log`), from every offline run file under `wandb_dir`, in file order."""
    rows = []
    for path in sorted(pathlib.Path(wandb_dir).rglob("run-*.wandb")):
        for record in _wandb_records(path, timeout):
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@contextlib.contextmanager
def offline_wandb(wandb_dir: str | pathlib.Path):
    """W&B forced offline and silent, its settings under `wandb_dir`; on exit the W&B service is shut down.

    `wandb.init` starts a service process and two threads in this process that outlive `run.finish()`; the
    rest of the suite need not run beside them. (They were first suspected of a CI segmentation fault, which
    turned out to be the memory-map limit: tests/conftest.py `_free_compiled_programs`.)
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")  # belt and braces: no test may reach a server
        patch.setenv("WANDB_DIR", str(wandb_dir))
        patch.setenv("WANDB_SILENT", "true")
        try:
            yield
        finally:
            if sys.modules.get("wandb") is not None:
                sys.modules["wandb"].teardown()
