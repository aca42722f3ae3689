"""The device tracker itself: it must catch what a GPU would reject and count syncs exactly."""

import contextlib

import numpy as np
import pytest
import torch

from tests.device_tracker import DeviceMixError, DeviceTracker, DeviceTrackerError, HostReadError


def test_factories_moves_and_modules_are_tagged():
    with DeviceTracker(device_count=2) as t:
        assert torch.cuda.is_available() and torch.cuda.device_count() == 2
        x = torch.zeros(4, 3, device="cuda")
        y = torch.arange(5, device=torch.device("cuda", 1))
        z = torch.from_numpy(np.ones(3)).to("cuda", torch.float32)
        w = torch.ones(2).cuda()
        assert (x.device, y.device, z.device, w.device) == (
            torch.device("cuda", 0),
            torch.device("cuda", 1),
            torch.device("cuda", 0),
            torch.device("cuda", 0),
        )
        assert x.is_cuda and t.is_tagged(x[1:].t()) and t.is_tagged((x + 1).sum(0))
        host = x.cpu()
        assert host.device.type == "cpu" and not t.is_tagged(host) and t.is_tagged(x)
        assert torch.zeros(2, device=x.device).is_cuda  # the reported device round-trips
        m = torch.nn.Linear(3, 2).to("cuda")
        assert all(t.is_tagged(p) for p in m.parameters())
        assert m.weight.device.type == "cuda"
        torch.cuda.set_device(1)
        assert torch.zeros(1, device="cuda").device == torch.device("cuda", 1)
        torch.cuda.synchronize()
        kinds = [kind for kind, _ in t.sync_log]
        # z, w and the two Linear tensors were uploads; x.cpu() and synchronize() reads.
        assert kinds.count("upload") == 4 and kinds.count("read") == 2
    assert not torch.ones(1).is_cuda
    assert torch.cuda.is_available() is (torch._C._cuda_getDeviceCount() > 0)  # restored


def test_catches_a_cpu_gpu_mix():
    with pytest.raises(DeviceMixError, match="aten::mul"), DeviceTracker():
        a = torch.ones(3, device="cuda")
        b = torch.ones(3)  # forgot device=...
        a * b
    with pytest.raises(DeviceMixError, match=r"cuda:\[0, 1\]"), DeviceTracker(device_count=2):
        torch.ones(3, device="cuda:0") + torch.ones(3, device="cuda:1")
    with DeviceTracker() as t:  # 0-dim CPU tensors are fine on CUDA, as are CPU index tensors
        a = torch.ones(3, device="cuda")
        a * torch.tensor(2.0)
        a[torch.tensor([0, 2])]
        assert t.sync_log == [("upload", "aten::index.Tensor with CPU index tensors")]


def test_catches_numpy_on_a_gpu_tensor_even_if_swallowed():
    with pytest.raises(HostReadError, match="numpy"), DeviceTracker():
        torch.ones(3, device="cuda").numpy()
    with pytest.raises(HostReadError), DeviceTracker():
        np.asarray(torch.ones(3, device="cuda"))
    # code under test hiding the failure does not hide it from the test
    with pytest.raises(HostReadError), DeviceTracker(), contextlib.suppress(Exception):
        torch.ones(3, device="cuda").numpy()
    with DeviceTracker() as t:
        assert torch.ones(3, device="cuda").cpu().numpy().sum() == 3
        assert t.syncs == 1


def test_counts_syncs_of_a_toy_loop_exactly():
    with DeviceTracker() as t:
        x = torch.linspace(-1, 1, 50, device="cuda")
        t.reset()
        for _ in range(4):
            x = x * 0.9 + 0.01  # 2 launches, no sync
        assert t.syncs == 0 and t.launches == 8
        for _ in range(3):  # per iteration: item, float(), tolist, nonzero, bool mask: 5 syncs
            x.sum().item()
            float(x.max())
            x[:2].tolist()
            (x > 0).nonzero()
            x[x > 0]
        assert t.syncs == 15, t.summary()
        assert [k for k, _ in t.sync_log[:5]] == ["read", "read", "read", "shape", "shape"]
        t.reset()
        torch.repeat_interleave(torch.tensor([1, 2], device="cuda"), 2)
        reps = torch.tensor([1, 2], device="cuda")
        torch.repeat_interleave(reps)  # output size unknown: a sync
        torch.repeat_interleave(reps, output_size=3)  # known: none
        assert [k for k, _ in t.sync_log] == ["upload", "upload", "shape"]


def test_autograd_and_adam_stay_on_the_device_without_syncs():
    torch.manual_seed(0)
    with DeviceTracker() as t:
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
        ).cuda()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        data = torch.randn(16, 4, device="cuda")
        t.reset()
        for _ in range(3):
            opt.zero_grad()
            model(data).square().mean().backward()
            opt.step()
        assert t.syncs == 0, t.summary()
        assert all(t.is_tagged(p.grad) for p in model.parameters())
        assert all(t.is_tagged(s["exp_avg"]) for s in opt.state.values())


def test_deterministic_mode_rejects_ops_without_a_deterministic_cuda_kernel():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(DeviceTrackerError, match="histc"), DeviceTracker():
            torch.histc(torch.rand(10, device="cuda"), bins=4, min=0, max=1)
        with DeviceTracker():  # scatter_add_ has a deterministic CUDA path
            torch.zeros(3, device="cuda").scatter_add_(
                0, torch.tensor([0, 0, 2], device="cuda"), torch.ones(3, device="cuda")
            )
    finally:
        torch.use_deterministic_algorithms(before)
