"""Benchmark `fit-regressor` at Human3.6M scale: certified vs support-only, and dense scipy.

Ours: N frames (default 50,000), V = 6890, 17 joints, default config (root-relative, sum-to-one
penalty, knn:128 support from a pilot fit): streaming Gram accumulation + active-set NNLS, run
twice in the same invocation: support-only (``certify=False``, the fit before certification)
and certified over all V vertices (the default: residual passes + column generation). Time and
peak RSS are printed side by side with their ratio, and extrapolated to 50,000 frames from
the run's split (pilot and solves fixed, accumulation and each certification pass linear in N).
Dense: the explicitly stacked system [A; sqrt(lam) 1^T] (3N+1 x 6890) per joint through
scipy.optimize.nnls (absolute frame, the cheaper decoupled objective), at ``--dense-frames``;
its time is extrapolated linearly in N (optimistic for scipy) and its matrix size says where it
stops fitting in RAM.
CLI: ``jregfix fit-regressor`` itself on ``--cli-frames`` frames of params (pose, betas) posed by
a synthetic SMPL-format model file, its time and peak RSS (posing included: this is the path a
user runs, whose memory differs from the in-memory benchmark's).

Meshes: a pool of ``--pool`` synthetic-SMPL meshes (random poses and shapes), posed once and
timed separately; frame i is pool mesh i % pool under its own random rotation and translation,
so every frame is distinct. GT joints: a planted local regressor on those meshes, pelvis-centred,
plus 5 mm Gaussian noise. Each measurement runs in a fresh process; its peak RSS (VmHWM) is
reset just before the timed part (Linux /proc/self/clear_refs), so it is the fit's own peak
including what was already resident.

    .venv/bin/python benchmarks/bench_fit_regressor.py [--frames 50000] [--dense-frames 2000]
        [--cli-frames N (default: --frames; 0 skips)]
    (a quick check: --frames 3000 --pool 300 --dense-frames 300 --cli-frames 1000)
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
    from jregfix.synthetic.body import make_smpl_like_model

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
        out = np.matmul(base, self.rot[index].transpose(0, 2, 1))  # out[n, v] = R_n base[n, v]
        out += self.trans[index]
        self.seconds += time.perf_counter() - t0
        return out


def planted_regressor(template: np.ndarray, seed: int = 2) -> np.ndarray:
    """(17, V): rows on 4 neighbouring vertices around random centres, summing to one."""
    rng = np.random.default_rng(seed)
    w = np.zeros((17, len(template)))
    for j, centre in enumerate(rng.choice(len(template), 17, replace=False)):
        near = np.argsort(np.linalg.norm(template - template[centre], axis=1))[:4]
        w[j, near] = rng.dirichlet(np.ones(4))
    return w


def planted_joints(stream: PoolStream, template: np.ndarray, seed: int = 2) -> np.ndarray:
    w = planted_regressor(template, seed)
    pool_joints = np.einsum("kv,pvd->pkd", w, stream.pool.astype(np.float64))
    idx = np.arange(stream.num_frames)
    joints = np.einsum("nkd,ned->nke", pool_joints[idx % len(stream.pool)], stream.rot)
    joints -= joints[:, :1]
    return joints + np.random.default_rng(seed + 1).normal(scale=0.005, size=joints.shape)


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


def run_ours(path: str, frames: int, certify: bool, queue) -> None:
    from jregfix.methods.fitting import FitConfig, fit_regressor

    stream, template, joints = _load(path, frames)
    rss_before = _reset_peak()
    t0 = time.perf_counter()
    sol = fit_regressor(stream, joints, template, FitConfig(certify=certify))
    total = time.perf_counter() - t0
    d = sol.diagnostics
    queue.put(
        {
            "rss_before_mb": rss_before,
            "peak_rss_mb": _peak_mb(),
            "total_s": total,
            "stream_s": stream.seconds,
            "time_s": d["time_s"],
            "objective": d["objective"],
            "rms_mm": d["rms_mm_all_joints"],
            "kkt_relative_max": d["kkt_relative_max"],
            "kkt_global": d["kkt_global_relative_max"],
            "certification": d["certification"],
            "converged": d["converged"],
            "union": d["union_vertices"],
            "certification_time_s": d.get("certification_time_s"),
            "iterations": d["solver_iterations"],
            "support": sol.support.source,
        }
    )


def prepare_cli(root: str, frames: int, queue) -> None:
    """SMPL-format model file, params (pose, betas, imgname) and SPIN-format GT for the CLI."""
    import torch

    from jregfix.body.base import batch_vertices
    from jregfix.body.smpl import SMPLBody
    from jregfix.io.h36m import joints17_to_s24, save_h36m
    from jregfix.io.smpl_write import write_released_style_pickle
    from jregfix.synthetic.body import make_smpl_like_model

    torch.set_num_threads(2)
    model = make_smpl_like_model(0)
    write_released_style_pickle(os.path.join(root, "SMPL_NEUTRAL.pkl"), model)
    body = SMPLBody(model)
    rng = np.random.default_rng(3)
    pose = (rng.normal(size=(frames, 72)) * 0.4).astype(np.float32)
    betas = rng.normal(size=(frames, 10)).astype(np.float32)
    template = body.template.double().numpy()
    w = planted_regressor(template)
    joints = np.concatenate(
        [
            np.einsum(
                "kv,nvd->nkd",
                w,
                batch_vertices(
                    body,
                    torch.from_numpy(pose[s : s + 1000]),
                    torch.from_numpy(betas[s : s + 1000]),
                ).numpy(),
            )
            for s in range(0, frames, 1000)
        ]
    )
    joints += rng.normal(scale=0.005, size=joints.shape)
    subjects = np.array(["S1", "S5", "S6", "S7", "S8"])[np.arange(frames) * 5 // frames]
    imgname = [f"images/{s}_Walking_1.54138969_{i + 1:06d}.jpg" for i, s in enumerate(subjects)]
    save_h36m(
        os.path.join(root, "gt.npz"),
        imgname,
        np.full((frames, 2), 500.0),
        np.ones(frames),
        joints17_to_s24(joints),
    )
    np.savez(os.path.join(root, "params.npz"), pose=pose, betas=betas, imgname=imgname)
    queue.put({})


def run_cli(root: str, queue) -> None:
    """`jregfix fit-regressor` in this fresh process (the command a user runs)."""
    import json

    from jregfix.cli.app import main

    out = os.path.join(root, "J.npy")
    args = [
        "fit-regressor",
        "--params",
        os.path.join(root, "params.npz"),
        "--gt",
        os.path.join(root, "gt.npz"),
        "--smpl",
        os.path.join(root, "SMPL_NEUTRAL.pkl"),
        "--out",
        out,
    ]
    rss_before = _reset_peak()
    t0 = time.perf_counter()
    code = main(args)
    total = time.perf_counter() - t0
    with open(out + ".json") as f:
        res = json.load(f)["result"]
    queue.put(
        {
            "code": code,
            "total_s": total,
            "rss_before_mb": rss_before,
            "peak_rss_mb": _peak_mb(),
            "certification": res["certification"],
            "kkt_global": res["kkt_global_relative_max"],
            "frames": res["frames"],
        }
    )


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
    queue.put(
        {
            "total_s": time.perf_counter() - t0,
            "rss_before_mb": rss_before,
            "peak_rss_mb": _peak_mb(),
            "matrix_mb": a.nbytes / 2**20,
        }
    )


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
    parser.add_argument(
        "--cli-frames",
        type=int,
        default=None,
        help="frames for the CLI run (default: --frames; 0 skips it)",
    )
    args = parser.parse_args()
    cli_frames = args.frames if args.cli_frames is None else args.cli_frames
    print(f"load before: {os.getloadavg()} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pool.npz")
        pose_s = measure(prepare, args.pool, path)["pose_pool_s"]
        old = measure(run_ours, path, args.frames, False)
        new = measure(run_ours, path, args.frames, True)
        dense = measure(run_dense, path, args.dense_frames)
        cli = None
        if cli_frames:
            measure(prepare_cli, tmp, cli_frames)
            cli = measure(run_cli, tmp)
    report(args, pose_s, old, new, dense, cli)


def extrapolate(old: dict, new: dict, frames: int, target: int) -> str:
    """Both fits at ``target`` frames from this run's split: the pilot and the solves do not
    grow with N, the accumulation and each certification pass grow linearly (posing or
    producing meshes included); the certified fit is assumed to take as many passes as here
    (the rounds grow slowly with N in the noisy world)."""
    grow = target / frames
    t_old, t_new = old["time_s"], new["time_s"]
    passes = new["certification_time_s"]["passes"]
    at_old = t_old["support"] + grow * t_old["accumulate"] + t_old["solve_and_certify"]
    at_new = (
        t_new["support"]
        + grow * (t_new["accumulate"] + passes)
        + t_new["solve_and_certify"]
        - passes
    )
    count = new["certification"]["passes"]
    return (
        f"extrapolated to N={target}: support-only ~{at_old:.0f} s, certified ~{at_new:.0f} "
        f"s ({count} passes of ~{grow * passes / max(1, count):.0f} s): "
        f"{at_new / at_old:.2f}x"
    )


def report(args, pose_s: float, old: dict, new: dict, dense: dict, cli: dict | None) -> None:
    for name, ours in (("support-only", old), ("certified", new)):
        t = ours["time_s"]
        print(
            f"ours {name:12s} N={args.frames}: {ours['total_s']:.1f} s (support/pilot "
            f"{t['support']:.1f}, accumulate {t['accumulate']:.1f}, solve and certify "
            f"{t['solve_and_certify']:.1f}; of the total, {ours['stream_s']:.1f} s producing "
            f"meshes); peak RSS {ours['peak_rss_mb']:.0f} MB ({ours['rss_before_mb']:.0f} MB "
            "resident when the fit started: python, torch, mesh pool)"
        )
        cert = ours["certification"]
        kkt = "n/a" if ours["kkt_global"] is None else f"{ours['kkt_global']:.1e}"
        print(
            f"       union {ours['union']} vertices, {ours['iterations']} active-set "
            f"iterations, KKT rel on the candidates {ours['kkt_relative_max']:.1e}, over all "
            f"V {kkt}; {cert['passes']} certification passes, {cert['rounds']} rounds adding "
            f"{cert['vertices_added_per_round']} vertices; objective {ours['objective']:.9g}, "
            f"RMS {ours['rms_mm']:.3f} mm (noise floor 5 mm * sqrt(3 * 16 / 17) = "
            f"{5 * np.sqrt(3 * 16 / 17):.2f} mm)"
        )
    fit_only = (new["total_s"] - new["stream_s"]) / (old["total_s"] - old["stream_s"])
    print(
        f"certified / support-only: time {new['total_s'] / old['total_s']:.2f}x (budget "
        f"1.5x), {fit_only:.2f}x without producing meshes; peak RSS "
        f"{new['peak_rss_mb']:.0f} MB vs {old['peak_rss_mb']:.0f} MB (budget 2048 MB)"
    )
    print(extrapolate(old, new, args.frames, 50_000))
    per_mesh = pose_s / args.pool
    print(
        f"posing meshes (not included): {per_mesh * 1e3:.2f} ms/frame -> "
        f"{per_mesh * args.frames:.0f} s for {args.frames} frames"
    )
    if cli is not None:
        kkt = "n/a" if cli["kkt_global"] is None else f"{cli['kkt_global']:.1e}"
        print(
            f"cli    N={cli['frames']} (jregfix fit-regressor, SMPL posed from params): exit "
            f"{cli['code']}, {cli['total_s']:.1f} s, peak RSS {cli['peak_rss_mb']:.0f} MB "
            f"({cli['rss_before_mb']:.0f} MB resident at its start); KKT over all V {kkt}, "
            f"{cli['certification']['passes']} certification passes"
        )

    scale = args.frames / args.dense_frames
    dense_mb_full = dense["matrix_mb"] * scale
    print(
        f"dense  N={args.dense_frames}: {dense['total_s']:.1f} s for 17 joints; stacked matrix "
        f"{dense['matrix_mb']:.0f} MB, peak RSS {dense['peak_rss_mb']:.0f} MB "
        f"({dense['rss_before_mb']:.0f} MB resident at its start)"
    )
    max_n = int(2 * 1024 / (dense["matrix_mb"] / args.dense_frames))
    print(
        f"dense  at N={args.frames}: matrix {dense_mb_full / 1024:.1f} GB (> 2 GB beyond "
        f"N~{max_n}); extrapolated time {dense['total_s'] * scale:.0f} s"
    )
    print(
        f"ratio (dense extrapolated / ours certified) at N={args.frames}: "
        f"{dense['total_s'] * scale / new['total_s']:.1f}x"
    )
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
