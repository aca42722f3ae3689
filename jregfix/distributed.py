"""torch.distributed plumbing shared by the stages: who am I, my share of the work, collectives.

A stage never starts processes itself: torchrun (single node, multi-node or under SLURM) or the
caller's ``torch.multiprocessing`` does, and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init_from_env` joins that process group (gloo for
CPU, NCCL for CUDA) once; an already initialised default group is used as it is; without either
every helper degrades to the single-process case, so stage code has one path.

Each process computes on one GPU, :func:`local_rank`: ``LOCAL_RANK`` (torchrun), else
``SLURM_LOCALID`` (srun starting the processes itself), else the global rank, taken modulo
the number of visible GPUs, so that SLURM's one-GPU-per-task binding (each process sees one
device, index 0) works as well as one process seeing all the node's GPUs.

Work is split by index, never by timing: :meth:`Ranks.owns` hands out chunks round-robin and
:meth:`Ranks.split` gives contiguous blocks, so a re-run with the same world size (or a
single-process re-run) finds the same chunks where the first run left them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from jregfix.device import resolve_device
from jregfix.errors import JregfixError

# A rank waiting for a dead peer gives up after this long (torchrun usually kills it first).
DEFAULT_TIMEOUT_S = float(os.environ.get("JREGFIX_DIST_TIMEOUT", 1800))


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world_size`` (1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def label(self, name: str) -> str:
        """'spin' -> 'spin (rank 0 of 4)' in a distributed job (for progress bars)."""
        return f"{name} (rank {self.rank} of {self.world_size})" if self.distributed else name

    def owns(self, index: int) -> bool:
        """Round-robin ownership of chunk ``index``."""
        return index % self.world_size == self.rank

    def split(self, items: np.ndarray) -> np.ndarray:
        """This rank's contiguous block of ``items`` (``np.array_split`` over the ranks)."""
        return np.array_split(np.asarray(items), self.world_size)[self.rank]

    def device(self, requested: str | torch.device) -> torch.device:
        """Resolve ``--device`` (:func:`jregfix.device.resolve_device`); in a distributed job
        'cuda' and 'auto' mean this rank's GPU (``cuda:local_rank``) and 'cuda:N' is refused."""
        return resolve_device(requested, self.local_rank if self.distributed else None)

    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (and return it)."""
        if self.distributed:
            moved = tensor.to(self._comm_device())
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            if moved is not tensor:
                tensor.copy_(moved)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(…) on every rank -> (world_size, …), row r from rank r, on ``tensor``'s device."""
        if not self.distributed:
            return tensor.unsqueeze(0)
        flat = tensor.contiguous().to(self._comm_device()).reshape(-1)
        out = torch.empty(self.world_size * flat.numel(), dtype=flat.dtype, device=flat.device)
        # torch >= 2.14 renames all_gather_into_tensor (and deprecates the old name)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, flat)
        return out.reshape(self.world_size, *tensor.shape).to(tensor.device)

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank (a vote, e.g. 'my output is current')."""
        votes = torch.tensor([0 if flag else 1], dtype=torch.int64)
        return int(self.all_reduce_sum(votes)) == 0

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block before the others (e.g. it clears a stale chunk directory).

        If it fails there, the other ranks raise too instead of waiting for it forever.
        """
        if self.is_main:
            try:
                yield
            except BaseException:
                self.all_true(False)
                raise
            self.all_true(True)
        else:
            if not self.all_true(True):
                raise JregfixError("rank 0 failed before this rank could start (see its error)")
            yield

    def _comm_device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu")


def current() -> Ranks:
    """The process group this process is in (the default group), or the single-process one."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank(), dist.get_backend())


def local_rank() -> int:
    """This process's GPU index on its node (see the module docstring); without CUDA the
    launcher's local rank as it is."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID", "RANK"):
        value = os.environ.get(key)
        if value is not None:
            break
    else:
        return 0
    try:
        index = int(value)
    except ValueError:
        raise JregfixError(f"{key}={value!r} is not an integer (set by the launcher)") from None
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return index % visible if visible else index


def init_from_env(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """Join the job torchrun describes in the environment (no-op without ``WORLD_SIZE`` > 1).

    The backend follows the device: NCCL when the stage runs on CUDA, gloo otherwise. An
    explicit 'cuda:N' is refused before joining (each rank uses its :func:`local_rank` GPU).
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    local = local_rank()
    wants_cuda = resolve_device(device, local).type == "cuda"
    if not dist.is_available():
        raise JregfixError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise JregfixError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
            "torchrun (see the README's 'Scaling out' section)"
        )
    backend = "nccl" if wants_cuda else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return current()


def shutdown() -> None:
    """Leave the process group (if this process is in one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
