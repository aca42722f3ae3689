"""The one project error type: its message is what the user reads (no traceback unless --debug)."""


class JregfixError(Exception):
    """An error the user can act on: bad input file, wrong shape, missing weights, ..."""
