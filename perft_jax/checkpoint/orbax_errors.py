"""What a failed orbax read or write means for the user, and the noise around it held back.

orbax surfaces a damaged checkpoint, a full disk or a read-only one as a tensorstore `ValueError`
(`DATA_LOSS: ...`, `RESOURCE_EXHAUSTED: ... [os_error_code='28'] [tensorstore_spec=...]`), an `OSError`, a JSON
decoding error, or a bare `Exception("Encountered error while reading array index ...")` wrapping one of those.
`problem(e)` sorts them into a :class:`Problem` (disk full / not writable, by errno, or damaged) with a short
one-line detail; anything else is not recognised and keeps its traceback (a bug).

It also *reports* the same failure many times over on stderr (283 and 740 lines in issue 15): absl ERROR logs
with tracebacks from each of its worker threads, asyncio's "exception was never retrieved", and tensorstore
callbacks failing with "Event loop is closed" once orbax's event loop is gone. `HeldLogs` holds orbax's (and
asyncio's) ERROR records while an operation may still fail: dropped once its failure has become the one-line
`UserError`, emitted as usual otherwise. Late leftovers (unraisable "Event loop is closed", orbax coroutines that
raised after their caller gave up, asyncio's "exception was never retrieved" for orbax futures) are dropped once a
`HeldLogs` was installed.
"""
from __future__ import annotations

import errno
import json
import logging
import pathlib
import re
import sys
from typing import NamedTuple

import orbax.checkpoint

from perft_jax.errors import DISK_ERRNOS

ORBAX_DIR = str(pathlib.Path(orbax.checkpoint.__file__).parent)
_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")
_STATUS = re.compile(r"^([A-Z_]+): ")
# tensorstore status codes without an os_error_code: the errno they stand for, and the ones that mean the stored
# bytes are not what was written (missing, truncated, corrupt).
_STATUS_ERRNO = {"RESOURCE_EXHAUSTED": errno.ENOSPC, "PERMISSION_DENIED": errno.EACCES}
_DAMAGE_STATUSES = {"DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION"}
_DETAIL_CHARS = 240


class Problem(NamedTuple):
    """A recognised orbax failure: `kind` "disk" (then `errno` says which) or "damaged"; `detail`: one short line."""

    kind: str
    detail: str
    errno: int | None = None


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _detail(e: BaseException) -> str:
    """The first line of the message, without tensorstore's spec dump, at most `_DETAIL_CHARS` long."""
    text = " ".join(str(e).split(" [tensorstore_spec=")[0].split())
    text = text.split(" See full TensorStore details:")[0]
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS - 3] + "..."


def _errno(e: BaseException) -> int | None:
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    if isinstance(e, ValueError):
        code = _OS_ERROR_CODE.search(str(e))
        if code:
            return int(code.group(1))
        status = _STATUS.match(str(e))
        return _STATUS_ERRNO.get(status.group(1)) if status else None
    return None


def _is_damage(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)):
        return True
    if type(e) is ValueError:  # tensorstore's errors are plain ValueErrors
        status = _STATUS.match(str(e))
        return (status.group(1) in _DAMAGE_STATUSES) if status else "OCDBT database" in str(e)
    return False


def problem(e: BaseException) -> Problem | None:
    """What `e` (raised by an orbax read or write) means, or None for an unrecognised error (a bug)."""
    chain = _chain(e)
    for err in chain:
        code = _errno(err)
        if code in DISK_ERRNOS:
            return Problem("disk", _detail(err), code)
    for err in chain:
        if _is_damage(err):
            return Problem("damaged", _detail(err))
    return None


def _is_leftover(unraisable) -> bool:
    """A late echo of a failed orbax operation: a tensorstore callback finding orbax's loop closed, or an orbax
    coroutine (or one of our handlers' coroutines) that raised after its caller gave up."""
    exc, obj = unraisable.exc_value, unraisable.object
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    code = getattr(obj, "cr_code", None)
    return code is not None and (code.co_filename.startswith(ORBAX_DIR) or __package__.replace(".", "/")
                                 in code.co_filename)


_previous_unraisablehook = None


def _drop_leftovers(unraisable) -> None:
    if not _is_leftover(unraisable):
        _previous_unraisablehook(unraisable)


def _raised_in_orbax(e: BaseException) -> bool:
    for err in _chain(e):
        tb = err.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.startswith(ORBAX_DIR):
                return True
            tb = tb.tb_next
    return False


class _UnretrievedOrbaxFutures(logging.Filter):
    """asyncio's "... exception was never retrieved", logged when a future of a failed orbax operation is garbage
    collected, possibly long after the failure was reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and "never retrieved" in record.getMessage() and _raised_in_orbax(exc))


class HeldLogs(logging.Filter):
    """Holds ERROR records of orbax (absl logger, orbax source files) and asyncio until the outcome is known.

    `install()` first; then `drop()` what was held once a failure became a UserError, or `emit()` it (an
    unrecognised failure, or none); `uninstall()` at the end. As a context manager: install, then emit + uninstall.
    """

    LOGGERS = ("absl", "asyncio")

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and (record.name == "asyncio" or record.pathname.startswith(ORBAX_DIR)):
            self.records.append(record)
            return False
        return True

    def install(self) -> HeldLogs:
        """Hold from now on; and, for the rest of the process, drop the late leftovers of failed orbax operations
        (they can come before the failure is known, and are noise whatever the outcome)."""
        global _previous_unraisablehook
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        if _previous_unraisablehook is None:
            _previous_unraisablehook, sys.unraisablehook = sys.unraisablehook, _drop_leftovers
            logging.getLogger("asyncio").addFilter(_UnretrievedOrbaxFutures())
        return self

    def uninstall(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)

    def emit(self) -> None:
        records, self.records = self.records, []
        for record in records:  # past the loggers' filters (this one), to their handlers as usual
            logging.getLogger(record.name).callHandlers(record)

    def drop(self) -> None:
        """Forget what was held (the failure it reports became a UserError)."""
        self.records = []

    def __enter__(self) -> HeldLogs:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.emit()
        self.uninstall()
