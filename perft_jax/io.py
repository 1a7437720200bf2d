"""Files in and out: JSON objects read with one-line errors, and directories that are never half-written.

    with atomic_directory(out) as tmp:   # a fresh hidden sibling `.out.tmp-<random>`
        write(tmp / "weights.safetensors")
    # renamed to `out` on success (an old `out` is removed only once the new one is there); removed on any error

The caller checks what may be replaced before it enters the block (nothing is created before that). A process
killed inside the block (kill -9, a lost node) leaves its sibling behind; the next `atomic_directory` on the same
`out` removes it, and says so, once it is provably stale: each sibling has an owner marker `.out.owner-<id>`
(pid, host), and it is stale when that process is gone from this host, or after `STALE_AFTER_S` otherwise.
A full disk or a read-only location inside the block is a one-line UserError naming `out` (errors.disk_errors).

`atomic_file(path)` does the same for one file (a hidden `.name.<pid>.tmp` beside it, renamed over `path`);
`write_text_atomic(path, text)` is its common use.

`set_aside(path)` renames a damaged file or directory to `<path>.damaged-<n>`, kept for inspection.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pathlib
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

from perft_jax.errors import UserError, disk_errors

STALE_AFTER_S = 24 * 3600  # a sibling whose owner cannot be checked (another host, no marker) is stale after this


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


def _alive_here(owner: dict) -> bool | None:
    """Whether the marker's process still runs; None when that cannot be known here (another host, bad marker)."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _age_s(path: pathlib.Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def remove_stale_siblings(out: pathlib.Path) -> list[pathlib.Path]:
    """Remove the temporary siblings of `out` (`.out.tmp-<id>`, `.out.old-<id>` and their marker) that a killed
    `atomic_directory` left, when provably stale; one line on stderr for each directory removed. Returns them."""
    out = pathlib.Path(out).absolute()
    prefix = out.parent / f".{out.name}."
    removed = []
    for path in sorted(glob.glob(glob.escape(str(prefix)) + "tmp-*") + glob.glob(glob.escape(str(prefix)) + "old-*")):
        path = pathlib.Path(path)
        marker = out.with_name(f".{out.name}.owner-{path.name.rsplit('-', 1)[-1]}")
        try:
            owner = json.loads(marker.read_text())
            owner = owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            owner = {}
        alive = _alive_here(owner)
        if alive or (alive is None and _age_s(marker if owner else path) < STALE_AFTER_S):
            continue
        why = (f"left by process {owner['pid']} on {owner['host']}, which is no longer running" if alive is False
               else f"untouched for over {STALE_AFTER_S // 3600} hours")
        if path.name.startswith(f".{out.name}.old-") and not out.exists():
            path.rename(out)  # killed between moving the old `out` aside and renaming the new one into place
            print(f"note: restored {out} from {path} ({why})", file=sys.stderr)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        print(f"note: removed the stale temporary directory {path} ({why})", file=sys.stderr)
    for marker in glob.glob(glob.escape(str(prefix)) + "owner-*"):
        uid = marker.rsplit("-", 1)[-1]
        if not any(pathlib.Path(f"{prefix}{kind}-{uid}").exists() for kind in ("tmp", "old")):
            pathlib.Path(marker).unlink(missing_ok=True)  # its directories are gone: a marker of nothing
    return removed


@contextlib.contextmanager
def atomic_directory(out: str | pathlib.Path, needed: int | None = None) -> Iterator[pathlib.Path]:
    """Build a directory in a fresh sibling, then rename it to `out`; on any exception the sibling is removed
    and `out` is left as it was. Stale siblings of an earlier, killed run are removed first. `needed`: about
    how many bytes the directory will hold, for the message when the disk is full."""
    out = pathlib.Path(out).absolute()
    uid = uuid.uuid4().hex[:12]
    marker = out.with_name(f".{out.name}.owner-{uid}")
    tmp = out.with_name(f".{out.name}.tmp-{uid}")
    with disk_errors(out, needed):
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(out)
        try:
            # The marker comes first: a sibling never exists without its owner on record.
            marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "created": time.time()}))
            tmp.mkdir()
            yield tmp
            if out.exists():
                old = out.with_name(f".{out.name}.old-{uid}")
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            marker.unlink(missing_ok=True)


def set_aside(path: str | pathlib.Path) -> pathlib.Path:
    """Rename a damaged file or directory to `<path>.damaged-<n>` (the first free n), for inspection; returns it."""
    path = pathlib.Path(path)
    n = 1
    while path.with_name(f"{path.name}.damaged-{n}").exists():
        n += 1
    aside = path.with_name(f"{path.name}.damaged-{n}")
    path.rename(aside)
    return aside


@contextlib.contextmanager
def atomic_file(path: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """Write a file through a hidden sibling `.name.<pid>.tmp` (the parents are created), renamed over `path` on
    success and removed on any exception: readers see the old file or the whole new one, never a part."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | pathlib.Path, text: str) -> None:
    """`path.write_text(text)`, never half-written (`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
