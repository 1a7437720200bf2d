"""The one exception type that user-facing code raises for bad input.

CLIs catch :class:`UserError`, print its one-line message and exit with code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from a user (a file, a config key, a tensor): the message names the culprit on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))
