"""The one project error type, and the one-line wording of every other failure the CLI shows.

A JregfixError's message is what the user reads (no traceback unless --debug). Errors raised by
Python, numpy or torch on bad input (a read-only directory, a full disk, an absurd declared
size, a malformed array) are worded by :func:`one_line` in the same style.
"""

from __future__ import annotations

import errno

DEBUG_HINT = "run with --debug for the traceback"
MAX_CHARS = 400  # a library message can embed a whole array or a multi-page torch text


class JregfixError(Exception):
    """An error the user can act on: bad input file, wrong shape, missing weights, ..."""


def _first_line(text: object) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= MAX_CHARS else line[: MAX_CHARS - 3] + "..."


def _os_error(exc: OSError) -> str:
    what = exc.strerror or _first_line(exc) or type(exc).__name__
    # os.replace(temporary, output) reports the output as filename2: name what the user gave
    target = exc.filename2 or exc.filename
    where = f"{target}: " if target else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}{what}: free some space or write the output elsewhere"
    if isinstance(exc, PermissionError):
        return f"{where}{what}: check the file's permissions or choose another path"
    if isinstance(exc, IsADirectoryError):
        return f"{where}{what}: give a file path, not a directory"
    if isinstance(exc, NotADirectoryError):
        return f"{where}{what}: a parent of this path is a file"
    if isinstance(exc, FileNotFoundError):
        return f"{where}{what}"
    return f"{where}{what} ({type(exc).__name__}); {DEBUG_HINT}"


def one_line(exc: BaseException) -> str:
    """The single line the CLI prints for ``exc`` (without the ``error:`` prefix)."""
    if isinstance(exc, JregfixError):
        lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
        return "; ".join(lines)
    if isinstance(exc, MemoryError):
        return (
            "out of memory: an input declares a size too large for this machine (or the "
            f"batch is too big); check the inputs' shapes; {DEBUG_HINT}"
        )
    if isinstance(exc, OSError):
        return _os_error(exc)
    name = type(exc).__name__
    text = _first_line(exc)
    detail = f"{name}: {text}" if text else name
    if isinstance(exc, (ValueError, TypeError, IndexError, KeyError, ArithmeticError)):
        return f"invalid input data ({detail}); check the input files' contents; {DEBUG_HINT}"
    if "out of memory" in text.lower():  # torch.OutOfMemoryError and allocator RuntimeErrors
        return f"out of memory ({detail}); lower --batch-size; {DEBUG_HINT}"
    return f"unexpected error ({detail}); {DEBUG_HINT}"
