"""Type checks of a user's run config against the defaults, naming the key at fault.

A config is hand-written JSON or TOML: ``"iters": "many"`` or ``"run_dir": 5`` must be refused
with the key's dotted name before any stage starts, not surface later as a Python TypeError.
A default's type is the expected type; a ``None`` default accepts a path string (``paths``) or
anything (left to the stage that reads it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping

from jregfix.errors import JregfixError


def _shown(value) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _number_problem(value, integer: bool) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "an integer" if integer else "a number"
    if integer and not isinstance(value, int):
        return "an integer"
    if not math.isfinite(value):
        return "a finite number"
    return None


def check_config_types(
    config, defaults: Mapping, paths: Collection[tuple[str, ...]] = (), where: tuple[str, ...] = ()
) -> None:
    """Raise ``JregfixError("refine.iters must be an integer, got \\"many\\"")``-style errors.

    ``config`` is the user's (partial) config, ``defaults`` the full default one; ``paths`` are
    the keys (as tuples) whose value is a file path (a string, or null). Unknown keys are left
    to the merge, which names them.
    """
    name = ".".join(where) or "the config"
    if not isinstance(config, Mapping):
        raise JregfixError(f"{name} must be an object (a table of keys), got {_shown(config)}")
    for key, value in config.items():
        if key not in defaults:
            continue
        at = (*where, key)
        default = defaults[key]
        expected = _expected(default, value, at in paths)
        if expected is not None:
            raise JregfixError(f"{'.'.join(at)} must be {expected}, got {_shown(value)}")
        if isinstance(default, Mapping) and default:
            check_config_types(value, default, paths, at)


def _expected(default, value, is_path: bool) -> str | None:
    """What ``value`` should have been, or None when it fits the default's type."""
    if is_path:
        return None if value is None or isinstance(value, str) else "a path (a string)"
    if default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return _number_problem(value, integer=True)
    if isinstance(default, float):
        return _number_problem(value, integer=False)
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, Mapping):
        return None if isinstance(value, Mapping) else "an object (a table of keys)"
    if isinstance(default, (list, tuple)):
        return None if isinstance(value, list) else "a list"
    return None
