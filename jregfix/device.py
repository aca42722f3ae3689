"""One device choice for every command, and the GPU numerics that make "same bytes" hold.

Every command takes ``--device auto|cpu|cuda|cuda:N`` (default ``auto``: the first visible GPU
when CUDA works, else the CPU) and resolves it here, so each fails the same way: one line, no
"Found no NVIDIA driver" traceback from deep inside torch.

On CUDA the numbers of a stage depend on kernel choices that CPU runs never see:

* cuDNN convolutions run in TF32 by default in torch (10-bit mantissa products), which moved
  HMR's outputs by up to 4e-3, far above the 1e-4 parity the project keeps; :func:`numerics`
  asks for full IEEE fp32 convolutions and matmuls instead.
* float atomics (``scatter_add_``, ``index_add_``) and cuBLAS's split reductions add in an
  order that changes from run to run; torch's deterministic mode swaps in ordered kernels, and
  cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment *before* it starts (the
  CLI sets it first thing, :func:`numerics` sets it when still unset).

Stages record :func:`numerics_record` in their manifests.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from jregfix.errors import JregfixError

DEFAULT_DEVICE = "auto"
DEVICE_HELP = "auto (a GPU when CUDA works, else the CPU), cpu, cuda or cuda:N."
CUBLAS_WORKSPACE = ":4096:8"  # one of the two settings NVIDIA documents as deterministic
_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")

F = TypeVar("F", bound=Callable)


def resolve_device(
    requested: str | torch.device, local_rank: int | None = None, option: str = "--device"
) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a usable torch.device, or a one-line error.

    ``local_rank``: this process's GPU in a torchrun job (see :func:`jregfix.distributed.
    local_rank`); then 'cuda' and 'auto' mean that GPU and an explicit 'cuda:N' is refused,
    because every rank would compute on GPU N while NCCL talks to the rank's own GPU.
    ``option`` names the setting in messages ('--device', or a config key).
    """
    text = str(requested)
    if not _SPEC.fullmatch(text):
        raise JregfixError(f"{option} {text!r} is not a device; use {DEVICE_HELP}")
    if local_rank is not None and text.startswith("cuda:"):
        raise JregfixError(
            f"{option} {text}: under torchrun every process uses the GPU of its "
            "LOCAL_RANK; pass cuda (or auto), and choose GPUs with "
            "CUDA_VISIBLE_DEVICES"
        )
    available = torch.cuda.is_available()
    if text == "cpu" or (text == "auto" and not available):
        return torch.device("cpu")
    if not available:
        raise JregfixError(
            f"{option} {text}: CUDA is not available here (no NVIDIA driver or "
            "GPU, or a CPU-only torch build); use cpu or auto"
        )
    if text.startswith("cuda:"):
        index = int(text[5:])
        count = torch.cuda.device_count()
        if index >= count:
            raise JregfixError(
                f"{option} {text}: only {count} GPU(s) visible (cuda:0.."
                f"cuda:{count - 1}); check CUDA_VISIBLE_DEVICES"
            )
        return torch.device("cuda", index)
    return torch.device("cuda", 0 if local_rank is None else local_rank)


def ensure_cublas_workspace() -> None:
    """Put the deterministic cuBLAS workspace setting in the environment unless the user chose
    one; it only takes effect if cuBLAS has not started yet, so call this early."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def _fp32_flags() -> dict[str, object]:
    """The switches that decide TF32 use, by name: torch >= 2.9's ``fp32_precision`` API, or
    the older ``allow_tf32`` flags (mixing the two APIs is an error in new torch)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return {
            "cudnn.conv.fp32_precision": conv.fp32_precision,
            "cuda.matmul.fp32_precision": torch.backends.cuda.matmul.fp32_precision,
        }
    return {
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def _set_fp32_flags(flags: dict[str, object]) -> None:
    for name, value in flags.items():
        *path, attr = name.split(".")
        setattr(functools.reduce(getattr, path, torch.backends), attr, value)


def _ieee(flags: dict[str, object]) -> dict[str, object]:
    return {k: "ieee" if k.endswith("fp32_precision") else False for k in flags}


@contextlib.contextmanager
def numerics(device: torch.device, deterministic: bool = True) -> Iterator[None]:
    """Within the block, on CUDA: IEEE fp32 convolutions and matmuls (no TF32) and, with
    ``deterministic``, torch's deterministic algorithms (ops without one raise). The previous
    settings come back on exit. On the CPU nothing changes (no TF32; kernels are ordered)."""
    if device.type != "cuda":
        yield
        return
    before_flags = _fp32_flags()
    before_det = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if deterministic:
        ensure_cublas_workspace()
        torch.use_deterministic_algorithms(True)
    _set_fp32_flags(_ieee(before_flags))
    try:
        yield
    finally:
        _set_fp32_flags(before_flags)
        torch.use_deterministic_algorithms(before_det[0], warn_only=before_det[1])


def numerics_record(device: torch.device) -> dict:
    """What decided this run's GPU numbers, for a manifest (call inside :func:`numerics`)."""
    record: dict[str, object] = {"device_type": device.type}
    if device.type != "cuda":
        return record
    record |= {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        **_fp32_flags(),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        record |= {
            "gpu": torch.cuda.get_device_name(device),
            "cudnn": torch.backends.cudnn.version(),
        }
    return record


def device_stage(deterministic: bool = True) -> Callable[[F], F]:
    """Decorate a stage function with a ``device`` argument: the argument is resolved (so
    library callers may pass 'auto' too) and the call runs under :func:`numerics`."""

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            device = resolve_device(bound.arguments["device"])
            bound.arguments["device"] = device
            with numerics(device, deterministic):
                return fn(*bound.args, **bound.kwargs)

        return call  # type: ignore[return-value]

    return wrap
