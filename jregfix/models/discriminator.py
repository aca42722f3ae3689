"""Pose and shape discriminators for the online adversarial term (Hedlin et al.'s code).

The pose discriminator is HMR's factorised design on 6D rotations: a per-joint embedding shared
by all joints (two 1x1 convolutions, 6 -> 32 -> 32), one linear head per joint, and a global
head over all joint embeddings. Outputs are sigmoids, as in Hedlin et al.; training uses the
least-squares GAN objective (MSE to 1 for real, 0 for fake).
"""

from __future__ import annotations

import torch
from torch import nn


class PoseDiscriminator(nn.Module):
    """(B, J, 6) rotations -> (B, J + 1) scores in (0, 1); column 0 is the global head."""

    def __init__(self, num_joints: int = 24, embed: int = 32, hidden: int = 1024):
        super().__init__()
        self.num_joints = num_joints
        self.embed = nn.Sequential(
            nn.Conv2d(6, embed, 1), nn.ReLU(), nn.Conv2d(embed, embed, 1), nn.ReLU()
        )
        self.joint_heads = nn.ModuleList(nn.Linear(embed, 1) for _ in range(num_joints))
        self.global_head = nn.Sequential(
            nn.Linear(embed * num_joints, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, rot6d: torch.Tensor) -> torch.Tensor:
        b = rot6d.shape[0]
        x = rot6d.reshape(b, self.num_joints, 6).permute(0, 2, 1).unsqueeze(-1)  # (B,6,J,1)
        feats = self.embed(x).squeeze(-1).permute(0, 2, 1)  # (B,J,E)
        per_joint = torch.cat([head(feats[:, j]) for j, head in enumerate(self.joint_heads)], 1)
        glob = self.global_head(feats.reshape(b, -1))
        return torch.sigmoid(torch.cat([glob, per_joint], 1))


class ShapeDiscriminator(nn.Module):
    """(B, S) shape coefficients -> (B, 1) score in (0, 1)."""

    def __init__(self, num_betas: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_betas, 10), nn.ReLU(), nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1)
        )

    def forward(self, betas: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(betas))


def lsgan_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Least-squares GAN loss for the discriminator: real -> 1, fake -> 0."""
    return ((real - 1) ** 2).mean() + (fake**2).mean()


def lsgan_generator_loss(fake: torch.Tensor) -> torch.Tensor:
    """Per-sample ||1 - D(x)||² (mean over outputs): (B, K) -> (B,)."""
    return ((1 - fake) ** 2).mean(1)
