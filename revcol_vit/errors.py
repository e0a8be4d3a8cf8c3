"""The one error type the CLIs print as a line and exit on; every runtime module may raise it."""


class UsageError(ValueError):
    """Bad input the user can fix: the CLIs print it as one line and exit."""
