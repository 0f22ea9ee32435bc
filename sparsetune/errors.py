"""The one error type the CLI turns into a one-line message and exit code 2."""


class SparsetuneError(Exception):
    """Bad input or an impossible request. The message names the problem and the fix."""
