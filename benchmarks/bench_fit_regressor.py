"""Benchmark `fit-regressor` at Human3.6M scale against the dense scipy approach.

Ours: N frames (default 50,000), V = 6890, 17 joints, default config (root-relative, sum-to-one
penalty, knn:128 support from a pilot fit): streaming Gram accumulation + active-set NNLS.
Dense: the explicitly stacked system [A; sqrt(lam) 1^T] (3N+1 x 6890) per joint through
scipy.optimize.nnls (absolute frame, the cheaper decoupled objective), at ``--dense-frames``;
its time is extrapolated linearly in N (optimistic for scipy) and its matrix size says where it
stops fitting in RAM.

Meshes: a pool of ``--pool`` synthetic-SMPL meshes (random poses and shapes), posed once and
timed separately; frame i is pool mesh i % pool under its own random rotation and translation,
so every frame is distinct. GT joints: a planted local regressor on those meshes, pelvis-centred,
plus 5 mm Gaussian noise. Each measurement runs in a fresh process; its peak RSS (VmHWM) is
reset just before the timed part (Linux /proc/self/clear_refs), so it is the fit's own peak
including what was already resident.

    .venv/bin/python benchmarks/bench_fit_regressor.py [--frames 50000] [--dense-frames 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time

import numpy as np


def build_pool(pool: int, seed: int = 0):
    """Pool meshes (P, V, 3) float32, template (V, 3), seconds spent posing them."""
    import torch

    from jregfix.body.base import batch_vertices
    from jregfix.body.smpl import SMPLBody
    from jregfix.body.synthetic import make_smpl_like_model

    torch.set_num_threads(2)
    body = SMPLBody(make_smpl_like_model(seed))
    gen = torch.Generator().manual_seed(seed)
    pose = torch.randn(pool, 72, generator=gen) * 0.4
    betas = torch.randn(pool, 10, generator=gen)
    t0 = time.perf_counter()
    verts = batch_vertices(body, pose, betas, chunk_size=500).numpy()
    return verts, body.template.double().numpy(), time.perf_counter() - t0


class PoolStream:
    """Frame i = R_i pool[i % P] + t_i: distinct frames without posing N bodies."""

    def __init__(self, pool: np.ndarray, frames: int, seed: int = 1):
        from scipy.spatial.transform import Rotation

        rng = np.random.default_rng(seed)
        self.pool, self.num_frames, self.num_vertices = pool, frames, pool.shape[1]
        self.rot = Rotation.random(frames, random_state=seed).as_matrix().astype(np.float32)
        self.trans = rng.normal(scale=0.5, size=(frames, 1, 3)).astype(np.float32)
        self.seconds = 0.0  # time spent producing meshes (stands in for posing bodies)

    def meshes(self, index: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        base = self.pool[index % len(self.pool)]
        rot = self.rot[index]
        out = self.trans[index] + base[:, :, :1] * rot[:, None, :, 0]
        for d in (1, 2):  # out[n, v] = R_n base[n, v], written as broadcasts (fast for 3x3)
            out += base[:, :, d:d + 1] * rot[:, None, :, d]
        self.seconds += time.perf_counter() - t0
        return out


def planted_joints(stream: PoolStream, template: np.ndarray, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = np.zeros((17, len(template)))
    for j, centre in enumerate(rng.choice(len(template), 17, replace=False)):
        near = np.argsort(np.linalg.norm(template - template[centre], axis=1))[:4]
        w[j, near] = rng.dirichlet(np.ones(4))
    pool_joints = np.einsum("kv,pvd->pkd", w, stream.pool.astype(np.float64))
    idx = np.arange(stream.num_frames)
    joints = np.einsum("nkd,ned->nke", pool_joints[idx % len(stream.pool)], stream.rot)
    joints -= joints[:, :1]
    return joints + rng.normal(scale=0.005, size=joints.shape)


def _reset_peak() -> float:
    """Reset this process's peak RSS (Linux clear_refs) and return the current RSS in MB."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    return _status_mb("VmHWM")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024.0


def prepare(pool: int, path: str, queue) -> None:
    verts, template, pose_s = build_pool(pool)
    np.savez(path, verts=verts, template=template)
    queue.put({"pose_pool_s": pose_s})


def _load(path: str, frames: int):
    with np.load(path) as z:
        verts, template = z["verts"], z["template"]
    stream = PoolStream(verts, frames)
    return stream, template, planted_joints(stream, template)


def run_ours(path: str, frames: int, queue) -> None:
    from jregfix.stages.fit_regressor import FitConfig, fit_regressor

    stream, template, joints = _load(path, frames)
    rss_before = _reset_peak()
    t0 = time.perf_counter()
    sol, support = fit_regressor(stream, joints, template, FitConfig())
    total = time.perf_counter() - t0
    d = sol.diagnostics
    queue.put({"rss_before_mb": rss_before, "peak_rss_mb": _peak_mb(), "total_s": total,
               "stream_s": stream.seconds, "time_s": d["time_s"],
               "rms_mm": d["rms_mm_all_joints"], "kkt_relative_max": d["kkt_relative_max"],
               "converged": d["converged"], "union": d["union_vertices"],
               "iterations": d["solver_iterations"], "support": support.source})


def run_dense(path: str, frames: int, queue) -> None:
    import scipy.optimize

    stream, _, joints = _load(path, frames)
    rss_before = _reset_peak()
    t0 = time.perf_counter()
    lam = 1.0 * frames
    a = stream.meshes(np.arange(frames)).astype(np.float64).transpose(0, 2, 1)
    a = np.vstack([a.reshape(3 * frames, -1), np.full((1, a.shape[2]), np.sqrt(lam))])
    for j in range(17):
        x = np.append(joints[:, j].reshape(-1), np.sqrt(lam))
        scipy.optimize.nnls(a, x, maxiter=100_000)
    queue.put({"total_s": time.perf_counter() - t0, "rss_before_mb": rss_before,
               "peak_rss_mb": _peak_mb(), "matrix_mb": a.nbytes / 2**20})


def measure(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50_000)
    parser.add_argument("--dense-frames", type=int, default=2_000)
    parser.add_argument("--pool", type=int, default=2_000)
    args = parser.parse_args()
    print(f"load before: {os.getloadavg()} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pool.npz")
        pose_s = measure(prepare, args.pool, path)["pose_pool_s"]
        ours = measure(run_ours, path, args.frames)
        dense = measure(run_dense, path, args.dense_frames)
    report(args, pose_s, ours, dense)


def report(args, pose_s: float, ours: dict, dense: dict) -> None:
    t = ours["time_s"]
    print(f"ours   N={args.frames}: {ours['total_s']:.1f} s (support/pilot {t['support']:.1f}, "
          f"accumulate {t['accumulate']:.1f}, solve {t['solve']:.1f}; of the total, "
          f"{ours['stream_s']:.1f} s producing meshes); peak RSS {ours['peak_rss_mb']:.0f} MB "
          f"({ours['rss_before_mb']:.0f} MB resident when the fit started: python, torch, "
          f"mesh pool)")
    print(f"       union {ours['union']} vertices, {ours['iterations']} active-set iterations, "
          f"KKT rel {ours['kkt_relative_max']:.1e}, converged {ours['converged']}, "
          f"RMS {ours['rms_mm']:.2f} mm (noise floor 5 mm * sqrt(3 * 16 / 17) = "
          f"{5 * np.sqrt(3 * 16 / 17):.2f} mm)")
    per_mesh = pose_s / args.pool
    print(f"posing meshes (not included): {per_mesh * 1e3:.2f} ms/frame -> "
          f"{per_mesh * args.frames:.0f} s for {args.frames} frames")

    scale = args.frames / args.dense_frames
    dense_mb_full = dense["matrix_mb"] * scale
    print(f"dense  N={args.dense_frames}: {dense['total_s']:.1f} s for 17 joints; stacked matrix "
          f"{dense['matrix_mb']:.0f} MB, peak RSS {dense['peak_rss_mb']:.0f} MB "
          f"({dense['rss_before_mb']:.0f} MB resident at its start)")
    max_n = int(2 * 1024 / (dense["matrix_mb"] / args.dense_frames))
    print(f"dense  at N={args.frames}: matrix {dense_mb_full / 1024:.1f} GB (> 2 GB beyond "
          f"N~{max_n}); extrapolated time {dense['total_s'] * scale:.0f} s")
    print(f"ratio (dense extrapolated / ours) at N={args.frames}: "
          f"{dense['total_s'] * scale / ours['total_s']:.1f}x")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
