"""One writer per output: the `<out>.lock` lock, stale locks, chunks of another computation,
and Ctrl-C, through the library and through the CLI."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jregfix.errors import JregfixError
from jregfix.io.lock import lock_path, output_lock
from jregfix.io.manifest import ChunkStore, stage_record
from tests.test_refine import SIZE, refine_inputs, world  # noqa: F401 - the refine test world fixture

REPO = Path(__file__).resolve().parents[1]


def start(code_or_args: list[str], fault: str, cwd: Path) -> subprocess.Popen:
    """A Python child (``-c CODE`` or ``-m jregfix ARGS``) with ``JREGFIX_FAULT=fault``; returns
    once it reports that it paused at the fault point."""
    env = {**os.environ, "JREGFIX_FAULT": fault, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps
    # it ignored: give the child the default handler so the Ctrl-C test means the same anywhere.
    proc = subprocess.Popen(
        [sys.executable, *code_or_args],
        env=env,
        cwd=cwd,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "paused at fault point" in line:
            return proc
    proc.wait()
    raise AssertionError(f"child ended (code {proc.returncode}) without pausing: {''.join(lines)}")


def hold_lock(out: Path, fault: str = "after-lock:pause") -> subprocess.Popen:
    code = f"from jregfix.io.lock import output_lock\nwith output_lock({str(out)!r}): pass"
    return start(["-c", code], fault, out.parent)


def test_second_writer_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "o.npz"
    holder = hold_lock(out)
    try:
        info = json.loads(lock_path(out).read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        t0 = time.monotonic()
        with pytest.raises(JregfixError) as err, output_lock(out):
            pass
        assert time.monotonic() - t0 < 3  # no waiting for the holder
        message = str(err.value)
        assert "\n" not in message
        assert f"pid {holder.pid} on {socket.gethostname()} since {info['started_utc']}" in message
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path):
    out = tmp_path / "o.npz"
    dead = subprocess.run(
        [
            sys.executable,
            "-c",
            (f"from jregfix.io.lock import output_lock\nwith output_lock({str(out)!r}): pass"),
        ],
        env={**os.environ, "JREGFIX_FAULT": "after-lock", "PYTHONPATH": str(REPO)},
    )
    assert dead.returncode == -signal.SIGKILL
    left = json.loads(lock_path(out).read_text())  # the dead holder's name stays behind
    assert left["pid"] != os.getpid() and left["host"] == socket.gethostname()
    said = []
    with output_lock(out, say=said.append):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert len(said) == 1 and "stale lock" in said[0] and "no longer running" in said[0]
    assert not lock_path(out).exists()  # removed on a clean exit
    with output_lock(out, say=said.append):  # nothing stale any more
        pass
    assert len(said) == 1


def test_same_process_cannot_lock_twice_and_no_lock_env_skips(tmp_path, monkeypatch):
    out = tmp_path / "o.npz"
    with (
        output_lock(out),
        pytest.raises(JregfixError, match="already being written by this process"),
        output_lock(out),
    ):
        pass
    monkeypatch.setenv("JREGFIX_NO_LOCK", "1")
    holder = None
    try:
        monkeypatch.delenv("JREGFIX_NO_LOCK")
        holder = hold_lock(out)
        monkeypatch.setenv("JREGFIX_NO_LOCK", "1")
        with output_lock(out):  # the documented escape hatch: no lock taken, no error
            pass
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()


def test_chunk_of_another_fingerprint_is_never_adopted(tmp_path):
    """Without a lock (JREGFIX_NO_LOCK, or a filesystem without locks) two runs could share a
    chunk directory: each chunk carries its computation's fingerprint, so neither adopts the
    other's chunks."""
    a = stage_record("refine", {}, {"iters": 30}, 0)
    b = stage_record("refine", {}, {"iters": 4}, 0)
    store_a = ChunkStore(tmp_path / "o.chunks", a)
    store_b = ChunkStore(tmp_path / "o.chunks", b)  # clears a's directory, tags it b
    store_a.save(1, x=np.ones(2))  # a, still running, writes its next chunk into it
    assert not store_b.done(1)
    assert not store_b.path(1).exists()  # discarded, not adopted
    store_b.save(1, x=np.zeros(2))
    assert store_b.done(1)
    np.testing.assert_array_equal(store_b.load(1)["x"], np.zeros(2))
    assert set(store_b.load(1)) == {"x"}


def refine_args(world, smpl_pkl, out, iters):  # noqa: F811
    return [
        *refine_inputs(world, smpl_pkl),
        "--out",
        str(out),
        "--iters",
        str(iters),
        "--batch-size",
        "2",
        "--image-size",
        str(SIZE),
    ]


@pytest.mark.slow
def test_two_concurrent_refines_on_one_output_through_the_cli(
    world,  # noqa: F811
    smpl_pkl,
    tmp_path,
    capsys,
):
    """The issue's repro: a second `refine` with another --iters, started once the first has
    written chunk 0, fails at once naming the first; after the first is killed, it takes the
    stale lock over, discards the other run's chunk and equals a clean run."""
    from jregfix.cli import main

    out = tmp_path / "o" / "r.npz"
    first = start(
        ["-m", "jregfix", *refine_args(world, smpl_pkl, out, 30)], "after-chunk:pause", tmp_path
    )
    try:
        chunk0 = out.with_name("r.npz.chunks") / "chunk_000000.npz"
        before = chunk0.read_bytes()
        assert main(refine_args(world, smpl_pkl, out, 4)) == 1
        err = capsys.readouterr().err
        assert f"is being written by pid {first.pid} on {socket.gethostname()}" in err
        assert chunk0.read_bytes() == before and not out.exists()
    finally:
        first.kill()
        first.wait()

    assert main(refine_args(world, smpl_pkl, out, 4)) == 0
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and str(first.pid) in err
    doc = json.loads(out.with_name("r.npz.manifest.json").read_text())
    assert doc["config"]["iters"] == 4 and doc["summary"]["resumed_chunks"] == 0
    clean = tmp_path / "clean.npz"
    assert main(refine_args(world, smpl_pkl, clean, 4)) == 0
    assert out.read_bytes() == clean.read_bytes()
    assert not lock_path(out).exists()


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_exits_130(world, smpl_pkl, tmp_path):  # noqa: F811
    out = tmp_path / "r.npz"
    proc = start(
        ["-m", "jregfix", *refine_args(world, smpl_pkl, out, 2)], "after-lock:pause", tmp_path
    )
    proc.send_signal(signal.SIGINT)
    try:
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    lines = rest.strip().splitlines()  # (the progress bar's last state comes first)
    assert lines[-1] == "interrupted; re-run the same command to resume"
    assert "Traceback" not in rest and sum("interrupted" in line for line in lines) == 1
    assert not lock_path(out).exists()  # released and removed on the way out


def test_demo_frames_zero_is_refused_like_negative(tmp_path, capsys):
    from jregfix.cli import main

    for frames in ("0", "-3"):
        assert main(["demo", "--frames", frames, "--out", str(tmp_path / "d")]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--frames" in err and frames in err
    assert not (tmp_path / "d").exists()
