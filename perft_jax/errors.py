"""The one exception type that user-facing code raises for bad input, and the CLIs' policy for it.

CLIs catch :class:`UserError`, print its one-line message and exit with code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from a user (a file, a config key, a tensor): the message names the culprit on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))


def run_cli(action) -> int:
    """Run a command-line action: a UserError becomes one line `error: ...` on stderr and exit code 2."""
    import sys

    try:
        action()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
