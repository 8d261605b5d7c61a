"""The one exception type for problems a user can cause (bad input, bad files, bad options)."""


class TlpersonaError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with code 2."""
