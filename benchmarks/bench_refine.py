"""Refine throughput: frames/s for Adam iterations at 224² (batch 16) and where the time goes.

    .venv/bin/python benchmarks/bench_refine.py [--iters 10] [--batch 16] [--size 224]

Times one full `refine_batch` (joint + soft silhouette + adversarial terms) on the synthetic
SMPL-format model, then each component alone at the same batch (forward + backward): body model,
renderer, discriminator, Adam step. Projects the 312k-frame H36M training split at 100
iterations. The naive reference for the renderer is the dense all-pairs version measured in
benchmarks/bench_render.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jregfix.body.rotations import rot6d_to_rotmat, rotmat_to_rot6d  # noqa: E402
from jregfix.body.smpl import SMPLBody  # noqa: E402
from jregfix.body.synthetic import make_smpl_like_model, write_released_style_pickle  # noqa: E402
from jregfix.geometry.camera import PinholeCamera  # noqa: E402
from jregfix.render.silhouette import hard_silhouette, soft_silhouette  # noqa: E402
from jregfix.stages.refine import Batch, Discriminators, RefineConfig, refine_batch  # noqa: E402

TRAIN_FRAMES = 312_000


def timed(fn, repeats=3):
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    b, size = args.batch, args.size
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp())
    write_released_style_pickle(tmp / "smpl.pkl", make_smpl_like_model())
    body = SMPLBody(tmp / "smpl.pkl")
    aa = rng.normal(size=(b, 24, 3)) * 0.2
    aa[:, 0] = Rotation.from_matrix(np.diag([1.0, -1, -1])).as_rotvec()
    rot = torch.from_numpy(Rotation.from_rotvec(aa.reshape(-1, 3)).as_matrix()
                           .reshape(b, 24, 3, 3)).float()
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
    batch = Batch(rot, betas + 0.2, cam_t + torch.tensor([0.03, -0.03, 3.0]), gt - gt[:, :1],
                  masks, torch.ones(b, dtype=torch.bool))
    config = RefineConfig(iters=args.iters, batch_size=b, image_size=size)
    disc = Discriminators(24, 10, 1e-3)

    t = time.perf_counter()
    refine_batch(body, j_reg, batch, disc, config)
    total = time.perf_counter() - t
    per_iter = total / (args.iters + 1)  # + the final loss evaluation and metrics

    p6 = rotmat_to_rot6d(rot).requires_grad_()
    bt = betas.clone().requires_grad_()
    ct = cam_t.clone().requires_grad_()

    def body_step():
        body.vertices(rot6d_to_rotmat(p6), bt).sum().backward()

    v_fixed = verts.detach().requires_grad_()

    def render_step():
        soft_silhouette(v_fixed, body.faces, cam, size, cam_t=ct,
                        sigma=config.sigma).sum().backward()

    def disc_step():
        disc.generator_loss(p6, bt).sum().backward()

    opt = torch.optim.Adam([p6, bt, ct], lr=1e-2)

    def adam_step():
        opt.step()

    parts = {"body model": timed(body_step), "renderer": timed(render_step),
             "discriminator": timed(disc_step), "optimiser": timed(adam_step)}
    print(f"batch {b}, {size}x{size}, {args.iters} iterations, torch threads "
          f"{torch.get_num_threads()}")
    print(f"refine_batch: {total:.1f} s = {per_iter * 1000:.0f} ms/iteration = "
          f"{b / (per_iter * 100):.3f} frames/s at 100 iterations")
    for name, sec in parts.items():
        print(f"  {name:14s} {sec * 1000:8.1f} ms/iteration ({100 * sec / per_iter:5.1f}%)")
    fps = b / (per_iter * 100)
    print(f"projected 312k-frame training split at 100 iterations on this CPU: "
          f"{TRAIN_FRAMES / fps / 86400:.1f} days")


if __name__ == "__main__":
    main()
