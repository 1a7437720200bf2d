"""Helpers for the fault tests: the CLIs run as users run them, and small real disks (tmpfs mounts) that are full
at a few KiB or read-only. Mounting needs root; without it (or where mounting is not permitted) the test skips
and says why."""
from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
# Progress bars of `datasets` would share stderr with the one line under test.
CLI_ENV = {"JAX_PLATFORMS": "cpu", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(script: str, *args: str, **popen) -> subprocess.CompletedProcess:
    """`python <script> args...` from the repository root; stdout and stderr as text."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO,
                          env={**os.environ, **CLI_ENV}, capture_output=True, text=True, timeout=600, **popen)


def error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single `error: ...` line a failed CLI printed on stderr (asserting there is nothing else)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def siblings(path: pathlib.Path) -> list[str]:
    """Names beside `path` that belong to it (itself, temporary `.name.*` siblings, `name.damaged-*`)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name == path.name or p.name.startswith(f".{path.name}.")
                  or p.name.startswith(f"{path.name}."))


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"mount {' '.join(args)} is not permitted here: {done.stderr.strip()}")


@contextlib.contextmanager
def small_disk(where: pathlib.Path, size: str = "1m", read_only: bool = False,
               folders: tuple[str, ...] = ()) -> Iterator[pathlib.Path]:
    """A tmpfs of `size` mounted at `where` (created), holding empty `folders`; remounted read-only if asked."""
    if os.geteuid() != 0:
        pytest.skip("a small tmpfs disk needs root to mount (id -u is not 0)")
    where.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
    try:
        for name in folders:
            (where / name).mkdir()
        if read_only:
            _mount("-o", "remount,ro", str(where))
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)
