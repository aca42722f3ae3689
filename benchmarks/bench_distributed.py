"""1 vs 2 processes (torch.distributed, gloo) for fit-regressor accumulation and for refine.

    .venv/bin/python benchmarks/bench_distributed.py [--frames 4000] [--refine-frames 16]

Each configuration runs in fresh processes started like torchrun would (RANK, WORLD_SIZE,
MASTER_* in the environment, then ``init_from_env``):

* 1 process x 2 threads: what one process gets on this 2-core machine (the baseline);
* 1 process x 1 thread: the per-process budget of the 2-process run;
* 2 processes x 1 thread: the distributed run.

fit-regressor: the accumulation stage on meshes posed by the synthetic SMPL-format body (posing
included, as a rank does it), knn:128 support around a planted regressor, chunks of 512 frames;
the time runs from a barrier after setup to the end of the all-reduce. The sums of every
configuration are checked to be bit-identical. Also reported: the cost of the exact
(order-free) summation against the chunk's Gram product.

refine: ``refine()`` end to end on ``--refine-frames`` frames at 224² (batch 4, 10 iterations,
all three terms), i.e. with the per-group discriminator gather; outputs of the 1- and
2-process runs with the same grouping are checked to be byte-identical.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jregfix.distributed import init_from_env, shutdown


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(fn, processes: int, threads: int, *args) -> None:
    mp.spawn(_entry, args=(fn, processes, threads, _port(), args), nprocs=processes, join=True)


def _entry(rank, fn, processes, threads, port, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(processes),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(threads)
    ranks = init_from_env("cpu")
    try:
        fn(ranks, *args)
    finally:
        shutdown()


# ----------------------------------------------------------------------------- fit-regressor


def fit_job(ranks, root: Path, frames: int, tag: str) -> None:
    from jregfix.body.smpl import SMPLBody
    from jregfix.io.regressors import effective_regressor
    from jregfix.methods.fitting import BodyMeshes, accumulate, candidate_rows

    body = SMPLBody(root / "smpl.pkl")
    with np.load(root / "fit.npz") as z:
        pose, betas, joints, w = z["pose"][:frames], z["betas"][:frames], z["joints"], z["w"]
    template = body.template.double().numpy()
    rows = candidate_rows(template, effective_regressor(w) @ template, "knn:128")
    union = np.unique(np.concatenate(rows))
    source = BodyMeshes(body, pose, betas)
    ranks.barrier()
    t0 = time.perf_counter()
    acc = accumulate(source, joints[:frames], union, True, np.arange(frames), 512, ranks=ranks)
    seconds = time.perf_counter() - t0
    if ranks.is_main:
        np.savez(root / f"fit_{tag}.npz", seconds=seconds, gram=acc.gram, cross=acc.cross)


def exact_sum_cost(u: int = 2176, frames: int = 512) -> tuple[float, float]:
    """Seconds for one chunk's Gram product (U x 3n) and for its exact split into limbs."""
    from jregfix.geometry.exact_sum import split_limbs

    a = np.random.default_rng(0).normal(size=(u, 3 * frames)) * 0.3
    t0 = time.perf_counter()
    g = a @ a.T
    t1 = time.perf_counter()
    split_limbs(g)
    return t1 - t0, time.perf_counter() - t1


def fit_inputs(root: Path, frames: int) -> None:
    from jregfix.body.base import batch_vertices
    from jregfix.body.smpl import SMPLBody

    body = SMPLBody(root / "smpl.pkl")
    rng = np.random.default_rng(0)
    pose = rng.normal(size=(frames, 72)) * 0.4
    betas = rng.normal(size=(frames, 10))
    w = np.zeros((17, 6890))
    for j in range(17):
        w[j, rng.choice(6890, 4, replace=False)] = 0.25
    verts = (
        batch_vertices(
            body, torch.from_numpy(pose).float(), torch.from_numpy(betas).float(), chunk_size=500
        )
        .double()
        .numpy()
    )
    joints = np.einsum("kv,nvc->nkc", w, verts)
    np.savez(root / "fit.npz", pose=pose, betas=betas, joints=joints - joints[:, :1], w=w)


# ----------------------------------------------------------------------------- refine


def refine_world(root: Path, n: int, size: int) -> None:
    from scipy.spatial.transform import Rotation

    from jregfix.body.base import batch_vertices
    from jregfix.body.smpl import SMPLBody
    from jregfix.geometry.camera import PinholeCamera, spin_focal
    from jregfix.io.h36m import h36m_imgname, joints17_to_s24, save_h36m
    from jregfix.io.masks import save_silhouettes
    from jregfix.render.silhouette import hard_silhouette

    body = SMPLBody(root / "smpl.pkl")
    rng = np.random.default_rng(1)
    aa = rng.normal(size=(n, 24, 3)) * 0.2
    aa[:, 0] = Rotation.from_matrix(np.diag([1.0, -1, -1])).as_rotvec()
    betas = rng.normal(size=(n, 10)) * 0.5
    cam_t = np.tile([0.0, 0.1, 45.0], (n, 1))
    verts = batch_vertices(
        body, torch.from_numpy(aa.reshape(n, 72)).float(), torch.from_numpy(betas).float()
    )
    w = np.load(root / "fit.npz")["w"]
    np.save(root / "J.npy", w)
    names = np.array([h36m_imgname("S1", "Walking_1", "54138969", i + 1) for i in range(n)])
    gt = np.einsum("kv,nvc->nkc", w, verts.double().numpy())
    save_h36m(root / "gt.npz", names, np.full((n, 2), 500.0), np.full(n, 2.0), joints17_to_s24(gt))
    cam = PinholeCamera.spin_crop(n, spin_focal(size), size)
    masks = hard_silhouette(
        verts, body.faces, cam, size, cam_t=torch.from_numpy(cam_t).float()
    ).numpy()
    save_silhouettes(root / "sil.npz", masks, np.ones(n), np.ones(n, bool), names)
    np.savez(
        root / "init.npz",
        pose=(aa + rng.normal(size=aa.shape) * 0.1).reshape(n, 72),
        betas=betas + 0.3,
        cam_t=cam_t + [0.03, -0.03, 3.0],
        imgname=names,
    )


def refine_job(ranks, root: Path, size: int, group: int, tag: str) -> None:
    from jregfix.body.smpl import SMPLBody
    from jregfix.methods.refinement import RefineConfig
    from jregfix.stages.refine import refine

    body = SMPLBody(root / "smpl.pkl")
    config = RefineConfig(iters=10, batch_size=4, image_size=size, batches_per_disc_step=group)
    ranks.barrier()
    t0 = time.perf_counter()
    refine(
        root / "init.npz",
        root / "gt.npz",
        root / "sil.npz",
        body,
        root / "J.npy",
        root / f"refined_{tag}.npz",
        config,
        ranks=ranks,
    )
    if ranks.is_main:
        np.save(root / f"refine_{tag}.npy", time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=4000)
    ap.add_argument("--refine-frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    from jregfix.io.smpl_write import write_released_style_pickle
    from jregfix.synthetic.body import make_smpl_like_model

    root = Path(tempfile.mkdtemp())
    write_released_style_pickle(root / "smpl.pkl", make_smpl_like_model())
    fit_inputs(root, args.frames)
    configs = [("1x2", 1, 2), ("1x1", 1, 1), ("2x1", 2, 1)]

    print(f"fit-regressor accumulation, {args.frames} frames, knn:128 support, chunks of 512")
    for tag, procs, threads in configs:
        run(fit_job, procs, threads, root, args.frames, tag)
    fit = {tag: np.load(root / f"fit_{tag}.npz") for tag, _, _ in configs}
    same = all(
        np.array_equal(fit[t]["gram"], fit["1x2"]["gram"])
        and np.array_equal(fit[t]["cross"], fit["1x2"]["cross"])
        for t in fit
    )
    for tag, procs, threads in configs:
        s = float(fit[tag]["seconds"])
        print(
            f"  {procs} process(es) x {threads} thread(s): {s:6.1f} s  "
            f"{args.frames / s:6.0f} frames/s"
        )
    f12, f11, f21 = (float(fit[t]["seconds"]) for t in ("1x2", "1x1", "2x1"))
    print(
        f"  speed-up of 2 processes: {f12 / f21:.2f}x over 1 process x 2 threads, "
        f"{f11 / f21:.2f}x over 1 x 1; sums bit-identical across runs: {same}"
    )
    gemm, split = exact_sum_cost()
    print(
        f"  exact summation of one chunk's Gram (2176^2, 512 frames): {split * 1e3:.0f} ms "
        f"vs {gemm * 1e3:.0f} ms for the product itself"
    )

    n, size = args.refine_frames, args.size
    refine_world(root, n, size)
    print(f"refine, {n} frames at {size}^2, batch 4, 10 iterations, 2 batches per D step")
    for tag, procs, threads in configs:
        run(refine_job, procs, threads, root, size, 2, tag)
    times = {tag: float(np.load(root / f"refine_{tag}.npy")) for tag, _, _ in configs}
    for tag, procs, threads in configs:
        print(
            f"  {procs} process(es) x {threads} thread(s): {times[tag]:6.1f} s  "
            f"{n / times[tag]:.2f} frames/s"
        )
    same = (root / "refined_2x1.npz").read_bytes() == (root / "refined_1x1.npz").read_bytes()
    print(
        f"  speed-up of 2 processes: {times['1x2'] / times['2x1']:.2f}x over 1 process x 2 "
        f"threads, {times['1x1'] / times['2x1']:.2f}x over 1 x 1; output of 2x1 identical "
        f"to 1x1: {same}"
    )


if __name__ == "__main__":
    main()
