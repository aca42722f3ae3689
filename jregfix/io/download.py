"""Pinned downloads: sha256-verified, written atomically, cached; nothing left on failure.

The temporary ``.part`` file is removed on every exit path, Ctrl-C included (the removal sits in
a ``finally``). Besides the per-read socket timeout an overall deadline applies: a server that
trickles a byte every few seconds would otherwise never time out.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from jregfix.errors import JregfixError
from jregfix.io.atomic import atomic_path

CACHE_ENV = "JREGFIX_CACHE_DIR"
DEADLINE_ENV = "JREGFIX_DOWNLOAD_TIMEOUT"
DEFAULT_DEADLINE_S = 900.0  # the largest pinned file is a few MB


def download_deadline() -> float:
    """Seconds a whole download may take: ``$JREGFIX_DOWNLOAD_TIMEOUT`` or 900."""
    text = os.environ.get(DEADLINE_ENV)
    if not text:
        return DEFAULT_DEADLINE_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise JregfixError(f"{DEADLINE_ENV}={text!r}: expected a positive number of seconds")
    return seconds


def cache_dir() -> Path:
    """``$JREGFIX_CACHE_DIR`` or the platform's user cache directory for jregfix."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("jregfix"))


def download(
    url: str,
    dest: str | Path,
    sha256: str | None,
    progress: Callable[[int, int | None], None] | None = None,
    timeout: float = 60.0,
    deadline: float | None = None,
) -> Path:
    """Fetch ``url`` (http(s)://, file://, or a local path) to ``dest``, verifying ``sha256``.

    ``progress(done_bytes, total_bytes_or_None)`` is called as data arrives. On a hash mismatch
    or a transfer error, ``dest`` is left untouched. ``timeout`` bounds each read, ``deadline``
    (default :func:`download_deadline`) the whole transfer, both in seconds.
    """
    dest = Path(dest)
    deadline = download_deadline() if deadline is None else deadline
    give_up = time.monotonic() + deadline
    if "://" not in url:
        url = Path(url).resolve().as_uri()
    digest = hashlib.sha256()
    try:
        with (
            urllib.request.urlopen(url, timeout=min(timeout, deadline)) as response,
            atomic_path(dest) as tmp,
        ):
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            # read1 returns what one read brings, so a trickle reaches the deadline check
            read = getattr(response, "read1", response.read)
            done = 0
            with open(tmp, "wb") as f:
                while block := read(1 << 16):
                    if time.monotonic() > give_up:
                        raise JregfixError(
                            f"could not download {url}: not finished after {deadline:g} s "
                            f"({done} bytes); raise {DEADLINE_ENV} on a slow connection"
                        )
                    f.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
            if sha256 is not None and digest.hexdigest() != sha256:
                raise JregfixError(
                    f"sha256 mismatch for {url}: got {digest.hexdigest()}, expected {sha256}; "
                    "the file was not saved"
                )
    except (
        urllib.error.URLError,
        http.client.HTTPException,
        TimeoutError,
        ConnectionError,
        OSError,
    ) as exc:
        if isinstance(exc, JregfixError):
            raise
        raise JregfixError(f"could not download {url}: {getattr(exc, 'reason', exc)}") from None
    return dest
