"""Demo budget: world generation, and refine's cost per iteration on Anny (soft vs chamfer).

    ANNY_CACHE_DIR=... python benchmarks/bench_demo.py [--iters 3] [--full]

Prints the time to generate the quick and default worlds, the seconds per iteration of one
16-frame refine batch at the demo's crop size with the SoftRas silhouette loss (the paper's) and
with the chamfer loss (the demo's choice), their ratio, and with ``--full`` the whole
``demo --quick`` pipeline. The CPU may be shared: the load average is printed alongside.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def refine_seconds_per_iter(
    body, world: Path, j_spin: Path, loss: str, iters: int, size: int
) -> float:
    from jregfix.body.rotations import pose_to_rotmat
    from jregfix.io.h36m import load_h36m
    from jregfix.io.masks import load_silhouettes
    from jregfix.io.params import load_params
    from jregfix.io.regressors import load_regressor
    from jregfix.methods.refinement import Batch, Discriminators, RefineConfig, refine_batch

    p = load_params(world / "spin_train.npz")
    gt = load_h36m(world / "h36m_train.npz").joints17()
    masks = load_silhouettes(world / "silhouettes_train.npz").masks
    rows = np.arange(16)
    batch = Batch(
        pose_to_rotmat(torch.from_numpy(p.pose[rows]).float(), 24),
        torch.from_numpy(p.betas[rows]).float(),
        torch.from_numpy(p.cam_t[rows]).float(),
        torch.from_numpy(gt[rows] - gt[rows, :1]).float(),
        torch.from_numpy(masks[rows]).float(),
        torch.ones(16, dtype=torch.bool),
    )
    j = torch.from_numpy(load_regressor(j_spin)).float()
    config = RefineConfig(iters=iters, image_size=size, silhouette_loss=loss)
    disc = Discriminators(body.num_joints, body.num_betas, config.disc_lr)
    t0 = time.perf_counter()
    refine_batch(body, j, batch, disc, config)
    return (time.perf_counter() - t0) / (iters + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="also time demo --quick")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from jregfix.body.anny import AnnyBody
    from jregfix.synthetic.demo import demo_run_config, demo_world_config
    from jregfix.synthetic.world import generate_world

    print(f"load average: {os.getloadavg()}")
    t0 = time.perf_counter()
    body = AnnyBody()
    print(f"Anny load: {time.perf_counter() - t0:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in ("quick", "default"):
            t0 = time.perf_counter()
            generate_world(tmp / size, demo_world_config(size), body)
            print(f"{size} world: {time.perf_counter() - t0:.1f} s")
        world = tmp / "quick"
        crop = demo_world_config("quick").crop_size
        # J_standard stands in for J_spin: the regressor does not change the cost.
        soft = refine_seconds_per_iter(
            body, world, world / "J_standard.npy", "soft", args.iters, crop
        )
        chamfer = refine_seconds_per_iter(
            body, world, world / "J_standard.npy", "chamfer", args.iters, crop
        )
        print(
            f"refine, 16 frames at {crop} px, per iteration: soft {soft:.2f} s, chamfer "
            f"{chamfer:.2f} s, ratio soft/chamfer {soft / chamfer:.1f}"
        )
        if args.full:
            from jregfix.stages.run import run

            t0 = time.perf_counter()
            result = run(
                demo_run_config(world, tmp / "run", demo_world_config("quick"), "quick"), body=body
            )
            print(
                f"demo --quick pipeline after the world: {time.perf_counter() - t0:.1f} s "
                f"({', '.join(f'{k} {v:.1f} s' for k, v in result.summary['timings'].items())})"
            )
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
