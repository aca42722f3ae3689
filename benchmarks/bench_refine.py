"""Refine throughput: frames/s for Adam iterations at 224² (batch 16) and where the time goes.

    .venv/bin/python benchmarks/bench_refine.py [--iters 10] [--batch 16] [--size 224]
                                                [--backend torch|numba|both]

Times one full `refine_batch` (joint + soft silhouette + adversarial terms) on the synthetic
SMPL-format model, then each component alone at the same batch (forward + backward): body model,
renderer, discriminator, Adam step. By default twice, side by side: with the PyTorch renderer
(the previous CPU path) and with the numba kernels (the CPU default), and their ratio. Projects
the 312k-frame H36M training split at 100 iterations. The naive reference for the renderer is
the dense all-pairs version measured in benchmarks/bench_render.py. Warns when the machine is
busy (load average above the core count): such figures are not worth recording.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jregfix.body.rotations import rot6d_to_rotmat, rotmat_to_rot6d
from jregfix.body.smpl import SMPLBody
from jregfix.geometry.camera import PinholeCamera
from jregfix.io.smpl_write import write_released_style_pickle
from jregfix.methods.refinement import Batch, Discriminators, RefineConfig, refine_batch
from jregfix.render.silhouette import (
    BACKEND_ENV,
    hard_silhouette,
    soft_silhouette,
)
from jregfix.synthetic.body import make_smpl_like_model

TRAIN_FRAMES = 312_000


def timed(fn, repeats=3):
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def busy_warning() -> str | None:
    """A warning when other processes compete for the CPUs (load average above the cores)."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        return (
            f"WARNING: load average {load:.2f} > {cores} cores: the machine is busy and "
            "these timings are contaminated; do not record them"
        )
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument(
        "--backend",
        choices=("torch", "numba", "both"),
        default="both",
        help="renderer backend; 'both' runs the PyTorch path, then the kernels",
    )
    args = ap.parse_args()
    warning = busy_warning()
    if warning:
        print(warning)
    b, size = args.batch, args.size
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp())
    write_released_style_pickle(tmp / "smpl.pkl", make_smpl_like_model())
    body = SMPLBody(tmp / "smpl.pkl")
    aa = rng.normal(size=(b, 24, 3)) * 0.2
    aa[:, 0] = Rotation.from_matrix(np.diag([1.0, -1, -1])).as_rotvec()
    rot = torch.from_numpy(
        Rotation.from_rotvec(aa.reshape(-1, 3)).as_matrix().reshape(b, 24, 3, 3)
    ).float()
    betas = torch.from_numpy(rng.normal(size=(b, 10)) * 0.5).float()
    cam_t = torch.tensor([[0.0, 0.1, 45.0]]).repeat(b, 1)
    focal = 5000.0 * size / 224
    cam = PinholeCamera.spin_crop(b, focal, size)
    verts = body.vertices(rot, betas)
    masks = hard_silhouette(verts, body.faces, cam, size, cam_t=cam_t).float()
    j_reg = torch.zeros(17, 6890)
    for r in range(17):
        j_reg[r, torch.from_numpy(rng.choice(6890, 4, replace=False))] = 0.25
    gt = torch.einsum("kv,bvc->bkc", j_reg, verts)
    batch = Batch(
        rot,
        betas + 0.2,
        cam_t + torch.tensor([0.03, -0.03, 3.0]),
        gt - gt[:, :1],
        masks,
        torch.ones(b, dtype=torch.bool),
    )
    config = RefineConfig(iters=args.iters, batch_size=b, image_size=size)
    print(
        f"batch {b}, {size}x{size}, {args.iters} iterations, torch threads "
        f"{torch.get_num_threads()}, sigma {config.sigma} px^2"
    )

    per_iter = {}
    for backend in ("torch", "numba") if args.backend == "both" else (args.backend,):
        os.environ[BACKEND_ENV] = backend  # refine_batch renders with the default backend
        per_iter[backend] = profile(
            body, j_reg, batch, config, (rot, betas, cam_t, verts), cam, backend
        )
    if len(per_iter) == 2:
        print(
            f"\nnumba vs torch renderer: refine {per_iter['torch'] / per_iter['numba']:.2f}x "
            "faster per iteration"
        )
    warning = busy_warning()
    if warning:
        print(warning)


def profile(body, j_reg, batch, config, start, cam, backend) -> float:
    """Time refine_batch and its parts (at ``start`` = rotmats, betas, cam_t, vertices) with
    one renderer backend; print; -> seconds per iteration."""
    b, size = batch.rotmat.shape[0], config.image_size
    rot, betas, cam_t, verts = start
    disc = Discriminators(24, 10, 1e-3)
    p6 = rotmat_to_rot6d(rot).requires_grad_()
    bt = betas.clone().requires_grad_()
    ct = cam_t.clone().requires_grad_()
    v_fixed = verts.detach().requires_grad_()

    def render_step():
        soft_silhouette(
            v_fixed, body.faces, cam, size, cam_t=ct, sigma=config.sigma
        ).sum().backward()

    render_step()  # warm-up: loads (or compiles) the numba kernels
    t = time.perf_counter()
    refine_batch(body, j_reg, batch, disc, config)
    total = time.perf_counter() - t
    per_iter = total / (config.iters + 1)  # + the final loss evaluation and metrics

    def body_step():
        body.vertices(rot6d_to_rotmat(p6), bt).sum().backward()

    def disc_step():
        disc.generator_loss(p6, bt).sum().backward()

    opt = torch.optim.Adam([p6, bt, ct], lr=1e-2)

    def adam_step():
        opt.step()

    parts = {
        "body model": timed(body_step),
        "renderer": timed(render_step),
        "discriminator": timed(disc_step),
        "optimiser": timed(adam_step),
    }
    fps = b / (per_iter * 100)
    print(f"\nrenderer backend: {backend}")
    print(
        f"refine_batch: {total:.1f} s = {per_iter * 1000:.0f} ms/iteration = "
        f"{fps:.3f} frames/s at 100 iterations"
    )
    for name, sec in parts.items():
        print(f"  {name:14s} {sec * 1000:8.1f} ms/iteration ({100 * sec / per_iter:5.1f}%)")
    print(
        f"projected 312k-frame training split at 100 iterations on this CPU: "
        f"{TRAIN_FRAMES / fps / 86400:.1f} days"
    )
    return per_iter


if __name__ == "__main__":
    main()
