"""The fault battery's checks (issue 15): bad input ends in exit code 2, exactly one line `error: ...` on stderr
naming the culprit (a path, key, row or tensor), and nothing created or changed where the command would write.

    before = Tree(tmp_path)                                   # what is there now
    proc = call_main(params.main, ["--config", bad], capfd)   # in-process; faults.run_cli runs a script instead
    fails_cleanly(proc, bad, "row 3", untouched=before)       # exit 2, one line naming both, tmp_path unchanged
    raises_cleanly(lambda: load_adapters(model, d), d, untouched=Tree(d))   # the API: one UserError line

`call_main` returns what `faults.run_cli` returns (a CompletedProcess), so `faults.error_line` and
`fails_cleanly` read both. Progress bars of `datasets` are off, as `faults.CLI_ENV` turns them off for a script:
they are the one thing allowed to share stderr with the error line, and would hide whether anything else did.
"""
from __future__ import annotations

import pathlib
import subprocess
from collections.abc import Callable, Sequence

import datasets
import pytest

from perft_jax.errors import UserError
from tests.robustness.faults import error_line


class Tree:
    """Every path under `root`, with each file's size and modification time, to prove later that nothing changed
    (a folder's own time is not compared: a temporary file made and removed inside it changes it)."""

    def __init__(self, root: str | pathlib.Path):
        self.root = pathlib.Path(root)
        self.state = self._scan()

    def _scan(self) -> dict[str, tuple[bool, int, int]]:
        if not self.root.exists():
            return {}
        paths = [self.root, *self.root.rglob("*")]
        return {str(p.relative_to(self.root)): (True, 0, 0) if p.is_dir() else (False, p.stat().st_size,
                                                                                  p.stat().st_mtime_ns)
                for p in paths}

    def assert_unchanged(self) -> None:
        now = self._scan()
        created = sorted(set(now) - set(self.state))
        removed = sorted(set(self.state) - set(now))
        changed = sorted(p for p in set(now) & set(self.state) if now[p] != self.state[p])
        assert not (created or removed or changed), \
            f"{self.root}: created {created[:5]}, removed {removed[:5]}, changed {changed[:5]}"


def call_main(main: Callable[[list[str]], int], argv: Sequence[object], capfd) -> subprocess.CompletedProcess:
    """`main(argv)` in this process, as a command-line entry point; its exit code and what it printed (pytest's
    `capfd`: Python-level and file-descriptor-level output both)."""
    argv = [str(a) for a in argv]
    capfd.readouterr()  # what came before is not this command's output
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse and sys.exit
        code = exit_.code
    finally:
        if bars:
            datasets.enable_progress_bars()
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def _names(line: str, culprits: Sequence[object]) -> None:
    for culprit in culprits:
        assert str(culprit) in line, f"{culprit!s} is not named in: {line}"


def fails_cleanly(proc: subprocess.CompletedProcess, *culprits: object, code: int = 2,
                  untouched: Tree | Sequence[Tree] = ()) -> str:
    """Asserts the exit code, exactly one line on stderr starting with `error: ` (no traceback, no other output),
    each culprit (e.g. a path, `row 3`, a config key) named in it, and the `untouched` trees unchanged; returns
    the line."""
    line = error_line(proc, code)
    _names(line, culprits)
    for tree in [untouched] if isinstance(untouched, Tree) else untouched:
        tree.assert_unchanged()
    return line


def raises_cleanly(action: Callable[[], object], *culprits: object,
                   untouched: Tree | Sequence[Tree] = ()) -> str:
    """The API's form of `fails_cleanly`: `action()` raises a UserError whose message is one line naming each
    culprit, with the `untouched` trees unchanged; returns the message."""
    with pytest.raises(UserError) as info:
        action()
    message = str(info.value)
    assert "\n" not in message and message, message
    _names(message, culprits)
    for tree in [untouched] if isinstance(untouched, Tree) else untouched:
        tree.assert_unchanged()
    return message
