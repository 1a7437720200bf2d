"""The one exception type that user-facing code raises for bad input, and the CLIs' policy for it.

CLIs catch :class:`UserError`, print its one-line message and exit with code 2, and do the same for an OSError
that names a file it could not read or write (`cli_error_line`); anything else is a bug and keeps its traceback.
`disk_errors(path)` turns a full disk or a missing write permission into such a line.
"""
import contextlib
import errno
import pathlib
import shutil
from collections.abc import Iterator


class UserError(ValueError):
    """Bad input from a user (a file, a config key, a tensor): the message names the culprit on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))


def run_cli(action) -> int:
    """Run a command-line action: a UserError (or an OSError `cli_error_line` explains) becomes one line
    `error: ...` on stderr and exit code 2."""
    import sys

    try:
        action()
    except (UserError, OSError) as e:
        line = cli_error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    return 0


def cli_error_line(err: BaseException) -> str | None:
    """What a command prints after `error: ` for `err`, or None for a bug (which keeps its traceback).

    A UserError's message; for an OSError that names its file, a missing permission, a read-only file system or
    a full disk (`disk_error_message`): the outside world, not a bug, when an edge did not say it itself. An
    OSError without a file name, or of another kind, stays a traceback: the edge that raised it must name it.
    """
    if isinstance(err, UserError):
        return str(err)
    if not isinstance(err, OSError) or not err.filename:
        return None
    if err.errno in (errno.EACCES, errno.EPERM):  # reading or writing: say only what was refused
        return f"{err.filename}: {_NOT_WRITABLE[err.errno]}"
    return disk_error_message(err.filename, err.errno)


# Disk and permission problems at the edges that write (converter output, run checkpoints): errno -> what it
# means for the user. A full disk also says how much space there is.
_DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}
_NOT_WRITABLE = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.EROFS: "read-only file system"}
DISK_ERRNOS = frozenset(_DISK_FULL) | frozenset(_NOT_WRITABLE)  # the errnos `disk_error_message` explains


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_error_message(path, code: int | None, needed: int | None = None) -> str | None:
    """The one line for OS error `code` (an errno) while writing `path`, or None when it is no disk-full or
    permission problem. A full disk reports the free space (`shutil.disk_usage` of the nearest existing folder)
    and, when known, the bytes the write `needed`."""
    if code in _DISK_FULL:
        where = pathlib.Path(path).absolute()
        while not where.exists():
            where = where.parent
        usage = shutil.disk_usage(where)
        need = f"about {format_bytes(needed)} needed, " if needed else ""
        return (f"{path}: {_DISK_FULL[code]} ({need}{format_bytes(usage.free)} free of {format_bytes(usage.total)}); "
                "free some space or write elsewhere")
    if code in _NOT_WRITABLE:
        return f"{path}: {_NOT_WRITABLE[code]}; choose a location you can write to"
    return None


def _writes_to(filename, path) -> bool:
    """Whether `filename` is `path`, inside it, or one of its hidden siblings `.name.*` (a temporary build)."""
    filename, path = str(pathlib.Path(filename).absolute()), pathlib.Path(path).absolute()
    return filename == str(path) or filename.startswith((f"{path}/", str(path.parent / f".{path.name}.")))


@contextlib.contextmanager
def disk_errors(path, needed: int | None = None) -> Iterator[None]:
    """Inside the block, an OSError for a full disk or a missing write permission becomes a one-line UserError
    naming `path` (and, for a full disk, the `needed` bytes and the free space); other errors pass unchanged.
    A permission error on another file (reading an input, say) names that file instead."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM) and e.filename and not _writes_to(e.filename, path):
            raise UserError(f"{e.filename}: {_NOT_WRITABLE[e.errno]}") from None
        message = disk_error_message(path, e.errno, needed)
        if message is None:
            raise
        raise UserError(message) from None
