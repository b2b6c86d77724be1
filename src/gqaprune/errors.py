"""User-facing errors: the CLI turns these into a message and exit code 2."""


class GQAPruneError(Exception):
    """A problem with the user's input: names the input, what was wrong, and what to do.

    The CLI prints ``str(err)`` and exits with code 2. Library code raises this for
    every bad input it can recognise; anything else is a bug and keeps its traceback.
    """

    exit_code = 2
