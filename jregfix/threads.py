"""How many CPU threads one process computes with.

PyTorch's CPU kernels run on an OpenMP pool whose threads spin while they wait for work. With
more busy threads than cores (several processes each sized for the whole machine, or a torchrun
job of N processes x all cores) they spin against each other and a kernel can slow down 10-40x.
So each process takes at most its share of the CPUs it may run on:

* ``OMP_NUM_THREADS`` set: that number, as given (PyTorch has already applied it);
* under torchrun with several processes on the node (``LOCAL_WORLD_SIZE`` > 1): one thread per
  process (what torchrun itself sets when it starts them; we do the same when another launcher
  starts them);
* otherwise: PyTorch's setting (by default the physical cores), but no more than the CPUs this
  process may run on (``sched_getaffinity``: taskset, cgroup cpusets, a SLURM allocation).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch


def default_threads(
    environ: Mapping[str, str] | None = None,
    cpus: int | None = None,
    torch_default: int | None = None,
) -> int:
    """The thread count for this process under the rules above (arguments: for testing)."""
    environ = os.environ if environ is None else environ
    given = environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    local = environ.get("LOCAL_WORLD_SIZE", "1").strip()
    if local.isdigit() and int(local) > 1:
        return 1
    if cpus is None:
        cpus = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    torch_default = torch.get_num_threads() if torch_default is None else torch_default
    return max(1, min(torch_default, cpus))


def configure_threads() -> int:
    """Apply :func:`default_threads` to PyTorch's intra-op pool; returns the count."""
    n = default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
