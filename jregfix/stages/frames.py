"""Shared plumbing of the per-frame stages: prefetched image batches, chunking, and the split
of chunks over the processes of a distributed job."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from jregfix.distributed import Ranks
from jregfix.errors import JregfixError
from jregfix.geometry.crop import crop_image
from jregfix.io.h36m import H36MData
from jregfix.io.images import read_image, resolve_image
from jregfix.io.manifest import ChunkStore
from jregfix.stages.result import Progress, Step

T = TypeVar("T")


def default_workers() -> int:
    """Image decoding threads per process: the CPUs this process may run on, shared by the
    processes of a torchrun job on the node (``LOCAL_WORLD_SIZE``). Decoding and cropping a
    1000² frame takes 15-30 ms, so a GPU needs several threads to be kept busy."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def prefetch_batches(
    fn: Callable[[int], T], rows: Sequence[int], batch_size: int, workers: int = 2, ahead: int = 2
) -> Iterator[tuple[list[int], list[T]]]:
    """Yield ``(rows, [fn(r) for r in rows])`` batch by batch, decoding ``ahead`` batches early
    in a thread pool (image decoding releases the GIL, so it overlaps the network)."""
    batches = [list(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        queue: deque[tuple[list[int], list]] = deque()
        for batch in batches:
            queue.append((batch, [pool.submit(fn, r) for r in batch]))
            if len(queue) > ahead:
                done, futures = queue.popleft()
                yield done, [f.result() for f in futures]
        while queue:
            done, futures = queue.popleft()
            yield done, [f.result() for f in futures]


def frame_reader(
    data: H36MData, images: str | Path, skip_unreadable: bool, crop: bool
) -> Callable[[int], np.ndarray | None]:
    """Row -> SPIN crop (224,224,3) uint8 (``crop``) or full RGB image; None if unreadable and
    ``skip_unreadable``."""

    def read(row: int) -> np.ndarray | None:
        try:
            img = read_image(resolve_image(images, data.imgname[row]))
        except JregfixError:
            if skip_unreadable:
                return None
            raise
        return crop_image(img, data.center[row], data.scale[row]) if crop else img

    return read


def chunk_dir(out: str | Path) -> Path:
    """Where a stage writing ``out`` keeps its resumable chunks: ``<out>.chunks/``."""
    out = Path(out)
    return out.with_name(out.name + ".chunks")


def owned_chunks(store: ChunkStore, count: int, ranks: Ranks) -> tuple[list[int], int]:
    """Chunk indices this rank must still compute (round-robin ownership, finished chunks
    skipped) and how many of its chunks an earlier run already finished."""
    mine = [ci for ci in range(count) if ranks.owns(ci)]
    todo = [ci for ci in mine if not store.done(ci)]
    return todo, len(mine) - len(todo)


def merged_chunks(store: ChunkStore, count: int, ranks: Ranks) -> dict[str, np.ndarray] | None:
    """Wait for every rank's chunks; rank 0 gets them concatenated in chunk order, others None."""
    ranks.barrier()
    if not ranks.is_main:
        return None
    missing = [i for i in range(count) if not store.done(i)]
    if missing and ranks.distributed:
        raise JregfixError(
            f"rank 0 does not see chunks {missing[:5]} that other ranks wrote "
            f"under {store.directory}: --out must be on a filesystem shared by "
            "every node"
        )
    return store.concatenate(count)


def compute_frame_chunks(
    stage: str,
    store: ChunkStore,
    ranges: list[tuple[int, int]],
    ranks: Ranks,
    read: Callable[[int], np.ndarray | None],
    present: np.ndarray,
    imgname: np.ndarray,
    batch_size: int,
    workers: int,
    process: Callable[[list[int], list[np.ndarray]], dict[str, np.ndarray]],
    empty: Callable[[], dict[str, np.ndarray]],
    progress: Progress | None = None,
) -> int:
    """Compute and save this rank's unfinished chunks of a per-frame stage; return how many of
    its chunks an earlier run had finished.

    ``process(rows, frames)`` maps a batch of readable frames to per-frame arrays; ``empty()``
    gives the arrays of a chunk without readable frames. Each chunk also stores ``imgname``,
    ``gt_row`` (the rows kept) and ``skipped_row`` (missing or unreadable images).
    ``progress`` gets a :class:`Step` of ``stage`` (this rank's frames) after every batch and
    again, with the same count, once a chunk is saved.
    """
    todo, resumed = owned_chunks(store, len(ranges), ranks)
    total = sum(stop - start for ci, (start, stop) in enumerate(ranges) if ranks.owns(ci))
    done_frames = total - sum(ranges[ci][1] - ranges[ci][0] for ci in todo)
    for ci in todo:
        start, stop = ranges[ci]
        parts, kept, skipped = [], [], [r for r in range(start, stop) if not present[r]]
        rows = [r for r in range(start, stop) if present[r]]
        # enough batches in flight to keep every decoding thread busy
        ahead = max(2, -(-workers // batch_size))
        for batch_rows, frames in prefetch_batches(read, rows, batch_size, workers, ahead):
            readable = [f for f in frames if f is not None]
            ok = [r for r, f in zip(batch_rows, frames, strict=True) if f is not None]
            skipped += [r for r, f in zip(batch_rows, frames, strict=True) if f is None]
            if ok:
                parts.append(process(ok, readable))
                kept += ok
            if progress:
                progress(Step(stage, done_frames + len(kept) + len(skipped), total))
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else empty()
        kept_rows = np.asarray(kept, dtype=np.int64)
        store.save(
            ci,
            **arrays,
            imgname=imgname[kept_rows].astype(str),
            gt_row=kept_rows,
            skipped_row=np.asarray(sorted(skipped), np.int64),
        )
        done_frames += stop - start
        if progress:
            progress(Step(stage, done_frames, total, message=f"chunk {ci + 1} saved"))
    return resumed


def merged_frame_chunks(
    store: ChunkStore, count: int, ranks: Ranks, imgname: np.ndarray, source: str
) -> tuple[dict[str, np.ndarray] | None, list[str]]:
    """:func:`merged_chunks` of a per-frame stage: rank 0 gets the arrays (``skipped_row``
    removed) and the names of the skipped images; an output without any frame is an error."""
    merged = merged_chunks(store, count, ranks)
    if merged is None:
        return None, []
    skipped_rows = merged.pop("skipped_row")
    if len(merged["gt_row"]) == 0:
        raise JregfixError(f"no readable images for any frame of {source}")
    return merged, [str(imgname[r]) for r in skipped_rows]
