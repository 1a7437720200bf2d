"""Files in and out: JSON objects read with one-line errors, and directories that are never half-written.

    with atomic_directory(out) as tmp:   # a fresh hidden sibling `.out.tmp-<random>`
        write(tmp / "weights.safetensors")
    # renamed to `out` on success (an old `out` is removed only once the new one is there); removed on any error

The caller checks what may be replaced before it enters the block (nothing is created before that).
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

from perft_jax.errors import UserError


def read_json_object(path: str | pathlib.Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; a one-line `UserError` naming the file (and `what` it should hold) otherwise."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing {what}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable {what} ({e.__class__.__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    return raw


@contextlib.contextmanager
def atomic_directory(out: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """Build a directory in a fresh sibling, then rename it to `out`; on any exception the sibling is removed
    and `out` is left as it was."""
    out = pathlib.Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:12]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
