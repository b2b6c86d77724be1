"""User-facing errors: the CLI turns these into a message and exit code 2."""


class GQAPruneError(Exception):
    """A problem with the user's input: names the input, what was wrong, and what to do.

    The CLI prints ``str(err)`` and exits with code 2. Library code raises this for
    every bad input it can recognise; anything else is a bug and keeps its traceback.
    """

    exit_code = 2


class Interrupted(Exception):
    """The user stopped a run (Ctrl-C) after its state was saved; the CLI says where and exits 130."""

    exit_code = 130

    def __init__(self, message: str, checkpoint: str | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint
