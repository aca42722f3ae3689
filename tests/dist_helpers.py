"""Launch a function on N gloo processes (torch.multiprocessing), the way torchrun would.

Workers live here, not in a test module, so the spawned interpreters import little. Every
worker runs with one thread, and single-process references are launched the same way
(N = 1), so results can be compared bit for bit.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from jregfix.distributed import Ranks, init_from_env, shutdown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn, world_size: int, *args) -> None:
    """Run ``fn(ranks, *args)`` on ``world_size`` processes; raises if any of them fails."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    ranks = init_from_env("cpu", timeout_s=120)
    try:
        fn(ranks, *args)
    finally:
        shutdown()


def die_after(ranks: Ranks, rank: int, calls: int, is_saved):
    """A progress callback that SIGKILLs ``rank`` at the ``calls``-th call for which
    ``is_saved(*args)`` says a chunk was just saved."""
    seen = {"n": 0}

    def progress(*args):
        if ranks.rank == rank and is_saved(*args):
            seen["n"] += 1
            if seen["n"] == calls:
                os.kill(os.getpid(), signal.SIGKILL)

    return progress


def refine_worker(
    ranks: Ranks,
    smpl: Path,
    inputs: tuple,
    out: Path,
    config,
    log: Path,
    kill: tuple[int, int] | None = None,
) -> None:
    """refine() on this rank; ``log`` (per rank) records which batches were optimised."""
    from jregfix.body.smpl import SMPLBody
    from jregfix.stages.refine import refine

    started = []
    # refine reports a Step without info right after saving a batch's chunk
    killer = die_after(ranks, *kill, lambda step: not step.info) if kill else None

    def progress(step):
        if step.info.get("iter") == 0:
            started.append(step.done)
        if killer:
            killer(step)

    summary = refine(
        *inputs[:3], SMPLBody(smpl), inputs[3], out, config, progress=progress, ranks=ranks
    ).summary
    np.save(
        log.with_name(f"{log.stem}_rank{ranks.rank}.npy"),
        np.array([len(started), summary.get("resumed_chunks", -1)]),
    )


def fit_worker(ranks: Ranks, data: Path, config, out: Path) -> None:
    """fit_regressor() on meshes and joints stored in ``data`` (npz)."""
    from jregfix.methods.fitting import ArrayMeshes, fit_regressor

    with np.load(data) as z:
        verts, joints, cand = z["verts"], z["joints"], z["candidates"]
    sol = fit_regressor(
        ArrayMeshes(verts), joints, verts[0], config, candidates=list(cand), ranks=ranks
    )
    np.save(out.with_name(f"{out.stem}_rank{ranks.rank}.npy"), sol.regressor)


def spin_worker(
    ranks: Ranks, kwargs: dict, config, kill: tuple[int, int] | None = None, log: Path | None = None
) -> None:
    """run_spin() on this rank; with one-frame chunks and batches, spin reports a frame count
    twice (batch done, then chunk saved): the second report means the chunk is on disk."""
    from jregfix.stages.spin import run_spin

    reports: list[int] = []

    def saved(step):
        reports.append(step.done)
        return reports.count(step.done) == 2

    progress = die_after(ranks, *kill, saved) if kill else None
    result = run_spin(**kwargs, config=config, progress=progress, ranks=ranks)
    if log is not None and ranks.is_main:
        np.save(log, np.array([result.summary["resumed_chunks"], result.summary["frames"]]))


def silhouettes_worker(ranks: Ranks, data: Path, config) -> None:
    from jregfix.stages.silhouettes import run_silhouettes
    from tests.test_silhouettes_stage import fake_detector

    run_silhouettes(
        data / "gt.npz",
        data / "h36m",
        data / "sil.npz",
        config,
        detector=fake_detector([]),
        ranks=ranks,
    )
