"""SPIN's HMR regressor (SPIN models/hmr.py, constants.py) with strict checkpoint loading.

The backbone is torchvision's ResNet-50 (stride on the 3x3 conv of each bottleneck, as in SPIN's
local copy) with its modules attached directly to :class:`HMR`, so parameter names equal the
official checkpoint's (``conv1.weight``, ``layer3.5.bn2.running_var``, ...). There is no ``fc``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from jregfix.body.rotations import rot6d_to_rotmat
from jregfix.errors import JregfixError
from jregfix.geometry.camera import IMG_RES
from jregfix.io.atomic import read_npz
from jregfix.io.budget import check_numbers

IMG_NORM_MEAN = (0.485, 0.456, 0.406)
IMG_NORM_STD = (0.229, 0.224, 0.225)
NUM_POSE_6D = 24 * 6
NUM_BETAS = 10
MEAN_BUFFERS = ("init_pose", "init_shape", "init_cam")


class HMROutput(NamedTuple):
    rotmat: torch.Tensor  # (B, 24, 3, 3)
    pose_6d: torch.Tensor  # (B, 144) SPIN interleaved 6D
    betas: torch.Tensor  # (B, 10)
    camera: torch.Tensor  # (B, 3) weak perspective (s, tx, ty)


class HMR(nn.Module):
    """ResNet-50 features + the 2205->1024->1024 iterative error-feedback head (3 iterations).

    ``init_pose`` (1,144), ``init_shape`` (1,10), ``init_cam`` (1,3) are buffers holding the
    starting estimate; build with :func:`build_hmr` to fill them from smpl_mean_params.npz.
    """

    init_pose: torch.Tensor
    init_shape: torch.Tensor
    init_cam: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50

        backbone = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = (
            backbone.conv1,
            backbone.bn1,
            backbone.relu,
            backbone.maxpool,
        )
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            backbone.layer1,
            backbone.layer2,
            backbone.layer3,
            backbone.layer4,
        )
        self.avgpool = nn.AvgPool2d(7, stride=1)  # SPIN's pooling: valid for 224x224 input only
        feat = 512 * 4
        self.fc1 = nn.Linear(feat + NUM_POSE_6D + NUM_BETAS + 3, 1024)
        self.drop1 = nn.Dropout()
        self.fc2 = nn.Linear(1024, 1024)
        self.drop2 = nn.Dropout()
        self.decpose = nn.Linear(1024, NUM_POSE_6D)
        self.decshape = nn.Linear(1024, NUM_BETAS)
        self.deccam = nn.Linear(1024, 3)
        for layer in (self.decpose, self.decshape, self.deccam):
            nn.init.xavier_uniform_(layer.weight, gain=0.01)
        self.register_buffer("init_pose", torch.zeros(1, NUM_POSE_6D))
        self.register_buffer("init_shape", torch.zeros(1, NUM_BETAS))
        self.register_buffer("init_cam", torch.zeros(1, 3))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) normalised images -> (B, 2048) pooled features."""
        if x.shape[-2:] != (IMG_RES, IMG_RES):
            raise ValueError(f"HMR expects {IMG_RES}x{IMG_RES} input, got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)

    def forward(self, x: torch.Tensor, n_iter: int = 3) -> HMROutput:
        """(B, 3, 224, 224) normalised images -> :class:`HMROutput`."""
        xf = self.features(x)
        b = xf.shape[0]
        pose = self.init_pose.expand(b, -1)
        shape = self.init_shape.expand(b, -1)
        cam = self.init_cam.expand(b, -1)
        for _ in range(n_iter):
            xc = torch.cat([xf, pose, shape, cam], 1)
            xc = self.drop2(self.fc2(self.drop1(self.fc1(xc))))
            pose = pose + self.decpose(xc)
            shape = shape + self.decshape(xc)
            cam = cam + self.deccam(xc)
        rotmat = rot6d_to_rotmat(pose.reshape(b, 24, 6))
        return HMROutput(rotmat, pose, shape, cam)


def normalize_images(crops: torch.Tensor) -> torch.Tensor:
    """uint8 crops (B, H, W, 3) RGB -> float (B, 3, H, W): /255 then ImageNet mean/std (SPIN)."""
    x = crops.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMG_NORM_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMG_NORM_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def load_mean_params(path: str | Path) -> dict[str, torch.Tensor]:
    """smpl_mean_params.npz -> {'init_pose' (1,144), 'init_shape' (1,10), 'init_cam' (1,3)}."""
    path = Path(path)
    arrays = read_npz(path, "mean-parameter file (SPIN's data/smpl_mean_params.npz)")
    out = {}
    for key, buf, size in (
        ("pose", "init_pose", 144),
        ("shape", "init_shape", 10),
        ("cam", "init_cam", 3),
    ):
        if key not in arrays:
            raise JregfixError(f"{path}: missing key '{key}'; found {sorted(arrays)}")
        if arrays[key].size != size:
            raise JregfixError(f"{path}: '{key}' has shape {arrays[key].shape}, expected ({size},)")
        check_numbers(arrays[key], f"{path}: '{key}'")
        out[buf] = torch.from_numpy(arrays[key].astype(np.float32).reshape(1, size))
    return out


@dataclass
class LoadReport:
    """What strict loading found; ``filled`` keys were absent and taken from elsewhere."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    filled: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def load_hmr_state(
    model: HMR,
    state: dict[str, torch.Tensor],
    mean_params: dict[str, torch.Tensor] | None = None,
    source: str = "<checkpoint>",
) -> LoadReport:
    """Load ``state`` strictly into ``model``; raise :class:`JregfixError` on any mismatch.

    Tolerated absences, reported in ``filled``: the mean buffers ``init_*`` (taken from
    ``mean_params``; whether the official file holds them is unconfirmed) and BN
    ``num_batches_tracked`` counters (never read in eval mode; absent in torch < 0.4.1 files).
    """
    expected = model.state_dict()
    report = LoadReport()
    merged = {}
    for key, ref in expected.items():
        if key in state:
            if tuple(state[key].shape) != tuple(ref.shape):
                report.mismatched.append(
                    f"{key}: {tuple(state[key].shape)} vs expected {tuple(ref.shape)}"
                )
            merged[key] = state[key]
        elif key in MEAN_BUFFERS and mean_params is not None:
            merged[key] = mean_params[key]
            report.filled[key] = "smpl_mean_params.npz"
        elif key.endswith("num_batches_tracked"):
            merged[key] = ref
            report.filled[key] = "zero (unused at inference)"
        else:
            report.missing.append(key)
    report.unexpected = [k for k in state if k not in expected]
    if not report.ok:
        parts = []
        for name, keys in (
            ("missing", report.missing),
            ("unexpected", report.unexpected),
            ("wrong shape", report.mismatched),
        ):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{len(keys)} {name}: {', '.join(keys[:5])}{more}")
        hint = ""
        if any(k in MEAN_BUFFERS for k in report.missing):
            hint = " (init_* buffers come from SPIN's smpl_mean_params.npz: pass --mean-params)"
        raise JregfixError(f"{source}: not an HMR checkpoint: " + "; ".join(parts) + hint)
    model.load_state_dict(merged, strict=True)
    return report


def build_hmr(
    checkpoint: str | Path | dict[str, torch.Tensor], mean_params: str | Path | None = None
) -> tuple[HMR, LoadReport]:
    """HMR in eval mode with weights from ``checkpoint`` (a file or a state_dict).

    The mean buffers come from the checkpoint when present, else from ``mean_params``.
    """
    from jregfix.io.checkpoint import load_state_dict_file

    model = HMR()
    means = load_mean_params(mean_params) if mean_params is not None else None
    if isinstance(checkpoint, dict):
        state, source = checkpoint, "<state_dict>"
    else:
        state, source = load_state_dict_file(checkpoint), str(checkpoint)
    report = load_hmr_state(model, state, means, source)
    return model.eval(), report
