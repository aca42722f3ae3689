"""Pinned downloads: sha256-verified, written atomically, cached; nothing left on failure."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from jregfix.errors import JregfixError
from jregfix.io.atomic import atomic_path

CACHE_ENV = "JREGFIX_CACHE_DIR"


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
) -> Path:
    """Fetch ``url`` (http(s)://, file://, or a local path) to ``dest``, verifying ``sha256``.

    ``progress(done_bytes, total_bytes_or_None)`` is called as data arrives. On a hash mismatch
    or a transfer error, ``dest`` is left untouched.
    """
    dest = Path(dest)
    if "://" not in url:
        url = Path(url).resolve().as_uri()
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_path(dest) as tmp:
            total = response.headers.get("Content-Length")
            total = int(total) if total else None
            done = 0
            with open(tmp, "wb") as f:
                while block := response.read(1 << 16):
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
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        if isinstance(exc, JregfixError):
            raise
        raise JregfixError(f"could not download {url}: {getattr(exc, 'reason', exc)}") from None
    return dest
