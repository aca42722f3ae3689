"""One writer per output: an exclusive advisory lock on ``<out>.lock`` for a whole stage.

Two processes writing one output (or its ``.chunks/`` resume store) would mix their results, so
a stage takes the lock before it reads or clears anything and holds it until it returns. A
second writer fails at once with one line naming the holder (pid, host, start time, command),
which the holder writes into the lock file.

POSIX record locks (``fcntl.lockf``) are used, not ``flock``: they also work on NFS (through the
NFS lock manager, or NFSv4 itself) and on Lustre mounted with ``flock``/``localflock``, where old
kernels' ``flock`` is local to one client. The kernel drops the lock when its process dies,
however it dies, so a lock file left by a crash is *stale*: the next writer takes the lock, and
says whose it was. Record locks belong to a process, not to an open file, so a second lock on
the same file by the same process would silently succeed; an in-process registry refuses it.

The lock file is removed when the stage ends (also on an error or Ctrl-C), while still locked;
a writer that opened it just before then notices (its file is no longer the one at the path)
and opens the new one, so two writers can never hold locks on two different files of one name.
Only a killed process leaves its lock file behind.

Where the filesystem refuses locks (ENOLCK, EOPNOTSUPP: some NFS mounts without a lock
manager, some FUSE filesystems) the stage warns and runs unprotected; ``JREGFIX_NO_LOCK=1``
skips locking (and the warning) altogether.

Under torchrun all ranks of a job write one output together: rank 0 takes the lock for them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from jregfix.errors import JregfixError
from jregfix.io.atomic import fault_point

_held: set[str] = set()  # lock files this process holds (record locks don't see them)
_held_guard = threading.Lock()
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def lock_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".lock")


def _holder_text(info: dict) -> str:
    if not info:
        return "another process (it has not written its name yet)"
    return (
        f"pid {info.get('pid', '?')} on {info.get('host', '?')} since "
        f"{info.get('started_utc', '?')} ({info.get('command', '?')})"
    )


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        info = json.loads(os.read(fd, 1 << 16) or b"{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _stale_note(path: Path, info: dict) -> str:
    pid, host = info.get("pid"), info.get("host")
    alive = "?"
    if host == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
            alive = "its pid is now another process"
        except ProcessLookupError:
            alive = "no longer running"
        except PermissionError:
            alive = "its pid is now another user's process"
    else:
        alive = "it no longer holds the lock"
    return f"note: taking over the stale lock {path} of {_holder_text(info)}: {alive}"


def _open_locked(path: Path) -> int | None:
    """An fd of ``path`` holding its lock, or None when locks are unsupported here."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                time.sleep(0.2)  # the holder may be writing its name right now
                info = _read_holder(fd)
                os.close(fd)
                raise JregfixError(
                    f"{path.with_suffix('')} is being written by "
                    f"{_holder_text(info)}; wait for it to finish or choose "
                    "another output"
                ) from None
            os.close(fd)
            if exc.errno in UNSUPPORTED:
                return None
            raise
        try:  # the holder may have removed the file between our open and our lock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the exclusive lock of ``out`` (``<out>.lock``) for the block."""
    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    if os.environ.get("JREGFIX_NO_LOCK") == "1":
        yield
        return
    path = lock_path(out).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _held_guard:
        if str(path) in _held:
            raise JregfixError(
                f"{out} is already being written by this process; choose another output"
            )
        _held.add(str(path))
    try:
        fd = _open_locked(path)
        if fd is None:
            say(
                f"warning: {path.parent} does not support file locks; nothing stops another "
                f"process from writing {out} at the same time (JREGFIX_NO_LOCK=1 hides this)"
            )
            yield
            return
        try:
            previous = _read_holder(fd)
            if previous:
                say(_stale_note(path, previous))
            me = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": " ".join(sys.argv),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
            fault_point("after-lock")
            yield
        finally:
            path.unlink(missing_ok=True)  # still locked: see the module docstring
            os.close(fd)  # releases the lock
    finally:
        with _held_guard:
            _held.discard(str(path))


def locks_output(param: str = "out") -> Callable:
    """Decorate a stage so that it holds :func:`output_lock` on its ``param`` argument.

    With a distributed ``ranks`` argument only rank 0 locks: the ranks of one job write the
    output together. A rank 0 that is refused fails like any failing rank, and torchrun stops
    the job's other processes."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def stage(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            out, ranks = bound.get(param), bound.get("ranks")
            if out is None or (ranks is not None and not ranks.is_main):
                return fn(*args, **kwargs)
            with output_lock(out):
                return fn(*args, **kwargs)

        return stage

    return decorate
