"""A CPU stand-in for a GPU in tests: tags the tensors that would live on CUDA, flags device
mixing and host reads, and counts host syncs and kernel launches.

There is no GPU in CI. Inside ``with DeviceTracker() as t:`` CUDA *looks* available and every
tensor that would be on a GPU is a plain CPU tensor carrying a tag (its device index), so whole
stages run with ``device="cuda"`` and their device handling is checked:

* Tagged: results of factories given ``device="cuda"`` / ``"cuda:N"`` / ``torch.device("cuda")``
  (``zeros``, ``tensor``, ``as_tensor``, ``new_tensor``, ``arange``, ...), of ``Tensor.to``,
  ``Tensor.cuda`` (hence ``Module.to`` / ``Module.cuda``, parameters and buffers included),
  and of every aten op with a tagged input. Tags live on the storage, so views, ``.data``,
  ``p.data = x`` and in-place ops keep them. A tagged tensor reports ``device == cuda:N`` and
  ``is_cuda``; ``.cpu()`` / ``.to("cpu")`` return an untagged copy.
* Errors (:class:`DeviceMixError`, :class:`HostReadError`, both ``AssertionError``s, raised at
  the faulty call and again on exit if the code under test swallowed them):
  an op mixing tagged tensors with untagged ones of dimension >= 1 (0-dim CPU tensors are
  allowed, as on CUDA; so are CPU index tensors and ``copy_`` across devices, counted as
  uploads), tagged tensors of two different GPUs, ``.numpy()`` / ``np.asarray`` on a tagged
  tensor, and, when ``torch.use_deterministic_algorithms(True)`` is on, the ops that raise on
  CUDA in that mode (histc, bincount with weights, put_, ...).
* Counters. ``t.syncs``: host syncs, each also logged in ``t.sync_log`` as (kind, what) with
  kind ``read`` (``.item()``, ``float()/int()/bool()``, ``.tolist()``, ``.cpu()``, ``equal``,
  ``torch.cuda.synchronize()``), ``shape`` (ops whose output size depends on data: ``nonzero``,
  ``masked_select``, ``unique*``, boolean indexing, ``repeat_interleave`` without
  ``output_size``, ``bincount``) or ``upload`` (a blocking host-to-device copy, which waits
  for the stream on CUDA: ``torch.tensor(..., device=cuda)``, ``.to(cuda)`` of a CPU tensor,
  CPU index tensors). ``t.launches``: aten ops touching tagged tensors other than views and
  allocations (about one CUDA kernel each); ``t.ops`` counts them by name.
  ``t.reset()`` zeroes the counters, e.g. per Adam iteration.
* ``torch.cuda`` (and ``torch.accelerator``) is stubbed: ``is_available()`` is True,
  ``device_count()`` is ``device_count``, ``set_device`` / ``current_device`` / ``device(...)``
  track an index, ``synchronize`` counts a sync, seeding, memory statistics, ``empty_cache``
  and ``get_device_name`` / ``get_device_properties`` answer harmlessly. ``pin_memory`` is a
  no-op and DataLoader pinning passes batches through.

Not modelled: CUDA generators (``torch.Generator(device="cuda")``), ``torch.load`` with a CUDA
``map_location`` (load on the CPU and move), CUDA streams and events, autocast. Kernels are
the CPU's, so numbers equal a CPU run's, not a GPU's.

    from tests.device_tracker import DeviceTracker

    with DeviceTracker() as t:
        refine(..., device="cuda")
    assert t.syncs <= 10, t.sync_log
"""

from __future__ import annotations

import collections
import contextlib
import types
import weakref

import torch
import torch._dynamo
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

aten = torch.ops.aten


class DeviceTrackerError(AssertionError):
    """Code under the tracker did something that fails or misbehaves on a real GPU."""


class DeviceMixError(DeviceTrackerError):
    """An op mixed (would-be) GPU tensors with CPU tensors, or two GPUs."""


class HostReadError(DeviceTrackerError):
    """A GPU tensor was handed to numpy."""


# Ops whose output size depends on the values: CUDA must copy a count back to the host.
_SHAPE_SYNC = {
    aten.nonzero.default,
    aten.nonzero_numpy.default,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
    aten.bincount.default,
}
# Ops returning a Python value computed from device data.
_READ_SYNC = {aten._local_scalar_dense.default, aten.equal.default}
# Ops that allocate or alias without running a kernel.
_NO_KERNEL = {
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten.lift_fresh.default,
    aten.detach.default,
    aten.set_.source_Storage_storage_offset,
    aten.resize_.default,
}
# Ops that raise on CUDA under torch.use_deterministic_algorithms(True) (torch's docs).
_NONDETERMINISTIC_ON_CUDA = {
    "aten::histc",
    "aten::put_",
    "aten::put",
    "aten::median.dim",
    "aten::nanmedian.dim",
    "aten::avg_pool3d_backward",
    "aten::_adaptive_avg_pool2d_backward",
    "aten::_adaptive_avg_pool3d_backward",
    "aten::adaptive_max_pool2d_backward",
    "aten::adaptive_max_pool3d_backward",
    "aten::fractional_max_pool2d_backward",
    "aten::fractional_max_pool3d_backward",
    "aten::max_unpool2d",
    "aten::max_unpool3d",
    "aten::upsample_linear1d_backward",
    "aten::upsample_bilinear2d_backward",
    "aten::upsample_bicubic2d_backward",
    "aten::upsample_trilinear3d_backward",
    "aten::reflection_pad1d_backward",
    "aten::reflection_pad2d_backward",
    "aten::reflection_pad3d_backward",
    "aten::nll_loss2d_forward",
    "aten::nll_loss_forward",
    "aten::grid_sampler_2d_backward",
    "aten::grid_sampler_3d_backward",
    "aten::_ctc_loss_backward",
    "aten::embedding_bag_backward",
}
# Factories whose data comes from the host (a copy to the device).
_UPLOADING = {"tensor", "as_tensor", "asarray", "new_tensor", "scalar_tensor"}


def _cuda_index(device, current: int) -> int | None:
    """The CUDA index a device argument names, or None for a non-CUDA device."""
    if device is None:
        return None
    if isinstance(device, int):  # a bare int means a CUDA index in torch's APIs
        return device
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return current if device.index is None else device.index


class DeviceTracker:
    """See the module docstring. ``device_count``: how many GPUs ``torch.cuda`` reports."""

    def __init__(self, device_count: int = 1):
        self.device_count = device_count
        self.current = 0
        self._tags: dict[int, tuple[weakref.ref, int]] = {}
        self._quiet = 0
        self._factory: int | None = None
        self.violations: list[DeviceTrackerError] = []
        self._stack = contextlib.ExitStack()
        self.reset()

    # -- public API --------------------------------------------------------------------------
    def reset(self) -> None:
        """Zero the sync and launch counters (tags and violations stay)."""
        self.sync_log: list[tuple[str, str]] = []
        self.ops: collections.Counter[str] = collections.Counter()
        self.launches = 0

    @property
    def syncs(self) -> int:
        return len(self.sync_log)

    def device_of(self, t: torch.Tensor) -> int | None:
        """CUDA index of a tagged tensor, None for a CPU one."""
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        entry = self._tags.get(id(storage))
        if entry is None or entry[0]() is not storage:
            return None
        return entry[1]

    def is_tagged(self, t: torch.Tensor) -> bool:
        return self.device_of(t) is not None

    def summary(self, top: int = 15) -> str:
        """A readable digest of the counters, for assertion messages."""
        kinds = collections.Counter(kind for kind, _ in self.sync_log)
        reasons = collections.Counter(self.sync_log).most_common(top)
        return (
            f"{self.launches} launches, {self.syncs} syncs {dict(kinds)}; top syncs "
            f"{reasons}; top ops {self.ops.most_common(top)}"
        )

    # -- tagging -----------------------------------------------------------------------------
    def _tag(self, t: torch.Tensor, index: int) -> torch.Tensor:
        storage = t.untyped_storage()
        key = id(storage)
        self._tags[key] = (weakref.ref(storage, lambda _, k=key: self._tags.pop(k, None)), index)
        return t

    def _tag_all(self, out, index: int):
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._tag(t, index)
        return out

    def _sync(self, kind: str, what: str) -> None:
        self.sync_log.append((kind, what))

    def _fail(self, error: DeviceTrackerError):
        self.violations.append(error)
        raise error

    @contextlib.contextmanager
    def _untracked(self):
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def _copy(self, t: torch.Tensor, **to_kwargs) -> torch.Tensor:
        """A fresh (untagged) copy of t, cast by ``to_kwargs``, invisible to the counters."""
        with self._untracked():
            out = t.to(**to_kwargs) if to_kwargs else t
            return out.clone() if out.untyped_storage() is t.untyped_storage() else out

    # -- context -----------------------------------------------------------------------------
    def __enter__(self) -> DeviceTracker:
        self._stack.enter_context(self._patched_cuda())
        self._stack.enter_context(_FunctionMode(self))
        self._stack.enter_context(_DispatchMode(self))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stack.close()
        if exc_type is None and self.violations:
            raise self.violations[0]

    @contextlib.contextmanager
    def _patched_cuda(self):
        tracker = self

        class _Device:  # torch.cuda.device(i) / device_of as a context manager
            def __init__(self, device):
                self.index = _cuda_index(device, tracker.current)

            def __enter__(self):
                self.prev, tracker.current = (
                    tracker.current,
                    (tracker.current if self.index is None or self.index < 0 else self.index),
                )

            def __exit__(self, *exc):
                tracker.current = self.prev

        def set_device(device):
            index = _cuda_index(device, self.current)
            if index is None or not 0 <= index < self.device_count:
                raise RuntimeError(f"invalid device ordinal {device!r}")
            self.current = index

        def synchronize(device=None):
            self._sync("read", "torch.cuda.synchronize")

        props = types.SimpleNamespace(
            name="tracked GPU", total_memory=16 << 30, major=8, minor=0, multi_processor_count=80
        )
        zero, nothing = (lambda *a, **k: 0), (lambda *a, **k: None)
        stream = types.SimpleNamespace(
            is_capturing=lambda: False,
            query=lambda: True,
            synchronize=synchronize,
            wait_stream=nothing,
        )
        cuda = {
            "is_available": lambda: True,
            "device_count": lambda: self.device_count,
            "current_device": lambda: self.current,
            "set_device": set_device,
            "device": _Device,
            "synchronize": synchronize,
            "is_initialized": lambda: True,
            "init": nothing,
            "manual_seed": nothing,
            "manual_seed_all": nothing,
            "seed": nothing,
            "seed_all": nothing,
            "empty_cache": nothing,
            "get_device_name": lambda *a, **k: props.name,
            "get_device_properties": lambda *a, **k: props,
            "get_device_capability": lambda *a, **k: (props.major, props.minor),
            "memory_allocated": zero,
            "max_memory_allocated": zero,
            "memory_reserved": zero,
            "max_memory_reserved": zero,
            "reset_peak_memory_stats": nothing,
            "reset_accumulated_memory_stats": nothing,
            "memory_stats": lambda *a, **k: {},
            "mem_get_info": lambda *a, **k: (props.total_memory, props.total_memory),
            "is_bf16_supported": lambda *a, **k: True,
            "current_stream": lambda *a, **k: stream,
            "default_stream": lambda *a, **k: stream,
            "is_current_stream_capturing": lambda: False,
        }
        accelerator = {
            "is_available": lambda: True,
            "device_count": lambda: self.device_count,
            "current_accelerator": lambda *a, **k: torch.device("cuda"),
            "current_device_index": lambda: self.current,
            "current_device_idx": lambda: self.current,
            "set_device_index": set_device,
            "set_device_idx": set_device,
            "synchronize": synchronize,
            "empty_cache": nothing,
            "current_stream": lambda *a, **k: stream,
        }
        pin = torch.utils.data._utils.pin_memory
        patches = [(torch.cuda, k, v) for k, v in cuda.items()]
        patches += [(torch.accelerator, k, v) for k, v in accelerator.items()]
        patches += [(pin, "pin_memory", lambda data, device=None: data)]
        saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
        try:
            for mod, name, value in patches:
                setattr(mod, name, value)
            yield
        finally:
            for mod, name, value in saved:
                setattr(mod, name, value)


_TENSOR = torch._C.TensorBase


class _FunctionMode(TorchFunctionMode):
    """Python-level view: device properties, moves, factories, numpy and tolist."""

    def __init__(self, tracker: DeviceTracker):
        super().__init__()
        self.t = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        t = self.t
        name = getattr(func, "__name__", "")
        owner = getattr(func, "__self__", None)
        first = args[0] if args else None
        tagged = isinstance(first, torch.Tensor) and t.device_of(first)

        if name == "__get__" and owner is not None:  # tensor properties
            if owner is _TENSOR.device:
                return torch.device("cuda", tagged) if tagged is not None else func(*args)
            if owner is _TENSOR.is_cuda:
                return tagged is not None
            if owner is _TENSOR.is_cpu:
                return tagged is None and func(*args)
            return func(*args, **kwargs)
        if name == "get_device" and isinstance(first, torch.Tensor):
            return tagged if tagged is not None else -1
        if name in ("numpy", "__array__") and tagged is not None:
            t._fail(
                HostReadError(
                    f"Tensor.{name}() on a cuda:{tagged} tensor "
                    f"{tuple(first.shape)}: move it with .cpu() first"
                )
            )
        if name == "tolist" and tagged is not None:
            t._sync("read", "Tensor.tolist")
            return func(*args, **kwargs)
        if name == "pin_memory":
            return first
        if name == "is_pinned":
            return False
        if name in ("to", "cuda", "cpu") and isinstance(first, torch.Tensor) and owner is None:
            return self._move(func, name, first, args[1:], kwargs)
        kwargs.pop("pin_memory", None)
        if name == "new_tensor" and tagged is not None and kwargs.get("device") is None:
            kwargs["device"] = torch.device("cuda", tagged)  # inherits self's device
        index = _cuda_index(kwargs.get("device"), t.current) if "device" in kwargs else None
        if index is not None:  # a factory asked for a GPU tensor
            kwargs["device"] = "cpu"
            source = args[1] if name == "new_tensor" else first
            if name in _UPLOADING and not (
                isinstance(source, torch.Tensor) and t.device_of(source) == index
            ):
                t._sync("upload", f"torch.{name}(..., device=cuda)")
            t._factory, prev = index, t._factory
            try:
                out = func(*args, **kwargs)
            finally:
                t._factory = prev
            return t._tag_all(out, index)
        return func(*args, **kwargs)

    def _move(self, func, name, x, rest, kwargs):
        """Tensor.to / .cuda / .cpu: uploads get tagged copies, downloads untagged copies."""
        t = self.t
        non_blocking, conv = kwargs.get("non_blocking", False), {}
        if name == "cpu":
            dst, to_host = None, True
        elif name == "cuda":
            device = rest[0] if rest else kwargs.get("device")
            dst = t.current if device is None else _cuda_index(device, t.current)
            to_host = False
        elif rest and isinstance(rest[0], torch.Tensor):  # x.to(other): other's device, dtype
            dst, conv = t.device_of(rest[0]), {"dtype": rest[0].dtype}
            to_host = dst is None
        else:
            device, dtype, non_blocking, fmt = torch._C._nn._parse_to(*rest, **kwargs)
            dst = _cuda_index(device, t.current)
            to_host = device is not None and dst is None
            conv = {k: v for k, v in (("dtype", dtype), ("memory_format", fmt)) if v is not None}
        src = t.device_of(x)
        if dst is None and (not to_host or src is None):  # no device change
            return func(x, *rest, **kwargs)
        if dst is None:  # to the host
            t._sync("read", f"Tensor.{name}() to the host")
            return t._copy(x, **conv)
        if src == dst:  # already there: a cast on the device (or nothing)
            out = x.to(copy=kwargs.get("copy", False), **conv)
            return out if out is x else t._tag(out, dst)
        if src is None and not non_blocking:
            t._sync("upload", f"Tensor.{name}(cuda) of a CPU tensor {tuple(x.shape)}")
        out = t._copy(x, **conv)
        t.launches += 1
        t.ops["copy (device move)"] += 1
        return t._tag(out, dst)


class _DispatchMode(TorchDispatchMode):
    """aten-level view: propagate tags, check devices, count syncs and launches."""

    def __init__(self, tracker: DeviceTracker):
        super().__init__()
        self.t = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = self.t
        if t._quiet:
            return func(*args, **kwargs)
        tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        devices = [t.device_of(x) for x in tensors]
        on_gpu = {d for d in devices if d is not None}
        index = t._factory if t._factory is not None else min(on_gpu, default=None)
        if index is None:
            return func(*args, **kwargs)
        op = func._schema.name + (
            "." + func._overloadname if func._overloadname != "default" else ""
        )
        if len(on_gpu) > 1:
            t._fail(DeviceMixError(f"{op} mixes tensors on cuda:{sorted(on_gpu)}"))
        cpu = [x for x, d in zip(tensors, devices, strict=True) if d is None and x.dim() > 0]
        if cpu:
            if func in (
                aten.index.Tensor,
                aten.index_put_.default,
                aten.index_put.default,
                aten._index_put_impl_.default,
            ) and all(not x.is_floating_point() for x in cpu):
                t._sync("upload", f"{op} with CPU index tensors")
            elif func is aten.copy_.default:
                dst_on_gpu = devices[0] is not None
                t._sync("upload" if dst_on_gpu else "read", f"{op} across devices")
                if not dst_on_gpu:
                    return func(*args, **kwargs)
            elif t._factory is None:
                shapes = [tuple(x.shape) for x in cpu]
                t._fail(
                    DeviceMixError(
                        f"{op} mixes cuda:{index} tensors with CPU tensors of "
                        f"shapes {shapes}: move them to the device"
                    )
                )
        if torch.are_deterministic_algorithms_enabled() and (
            func._schema.name in _NONDETERMINISTIC_ON_CUDA
            or op in _NONDETERMINISTIC_ON_CUDA
            or (func is aten.bincount.default and kwargs.get("weights", None) is not None)
        ):
            t._fail(
                DeviceTrackerError(
                    f"{op} has no deterministic CUDA kernel and raises "
                    "under torch.use_deterministic_algorithms(True)"
                )
            )
        if func in _READ_SYNC:
            t._sync("read", op)
        elif func in _SHAPE_SYNC or self._data_dependent(func, args, kwargs):
            t._sync("shape", op)
            t.launches += 1
            t.ops[op] += 1
        elif func not in _NO_KERNEL and not func.is_view:
            t.launches += 1
            t.ops[op] += 1
        out = func(*args, **kwargs)
        return tree_map_only(torch.Tensor, lambda x: t._tag(x, index), out)

    @staticmethod
    def _data_dependent(func, args, kwargs) -> bool:
        if func in (
            aten.index.Tensor,
            aten.index_put_.default,
            aten.index_put.default,
            aten._index_put_impl_.default,
        ):
            return any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in args[1]
            )
        if func is aten.repeat_interleave.Tensor or func is aten.repeat_interleave.self_Tensor:
            return kwargs.get("output_size") is None
        return False
