"""The comparison loop's one error type: torch-free, so every eval module can raise it."""


class CompareError(ValueError):
    """A problem with the user's input; the CLI prints it as one line, without a traceback."""
