"""Soft silhouette speed and memory: jregfix's sparse renderer vs a dense all-pairs reference.

Forward + backward of sum(w * A) (random w) at 224^2, batch 16, for an SMPL-size closed mesh
(6890 vertices / 13776 faces) and an Anny-size one (13718 / 27432; Anny itself has 27420 faces
and is not closed), plus the chamfer loss and the hard silhouette. Each renderer runs on both
CPU backends side by side: ``*_torch`` (the PyTorch pair list, also the GPU path) and
``*_numba`` (the compiled kernels, the CPU default), with their ratio. The dense reference
(every pixel against every face, autograd) runs at the largest size that fits its memory
budget; ours runs at the same size for the ratio. Each measurement runs in a fresh subprocess
so that the reported peak memory (max RSS growth during the timed calls) is its own. GPU
timings: benchmarks/bench_gpu.py on a CUDA machine (kernel launches and host syncs are counted
by the tests' device tracker, tests/test_render_device.py).

    .venv/bin/python benchmarks/bench_render.py [--threads 2] [--batch 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

MESHES = {"smpl": (82, 84), "anny": (108, 127)}  # UV-sphere rings x segments of body_blob


def dense_soft(vertices, faces, camera, size, cam_t, sigma):
    """Naive SoftRas: (B, P, F) tensors for every pixel/face pair, autograd for the backward."""
    import torch

    from jregfix.geometry.camera import project

    uv = project(vertices, camera, cam_t)
    tri = uv[:, faces]  # (B, F, 3, 2)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    p = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1).to(uv.dtype) + 0.5
    p = p[None, :, None, :]  # (1, P, 1, 2)
    d2, cross = [], []
    for i in range(3):
        a, b = tri[:, None, :, i], tri[:, None, :, (i + 1) % 3]
        e, wv = b - a, p - a
        t = ((wv * e).sum(-1) / (e * e).sum(-1).clamp(min=1e-12)).clamp(0, 1)
        d2.append(((wv - t[..., None] * e) ** 2).sum(-1))
        cross.append(e[..., 0] * wv[..., 1] - e[..., 1] * wv[..., 0])
    d2 = torch.stack(d2).amin(0)
    cross = torch.stack(cross)
    inside = (cross >= 0).all(0) | (cross <= 0).all(0)
    x = torch.where(inside, d2, -d2) / sigma
    a = 1 - torch.exp(torch.nn.functional.logsigmoid(-x).sum(-1))
    return a.view(-1, size, size)


def scene(mesh, batch, size):
    import torch

    from jregfix.geometry.camera import PinholeCamera, spin_focal, weak_to_cam_t
    from jregfix.synthetic.body import body_blob

    v, f = body_blob(*MESHES[mesh])
    gen = torch.Generator().manual_seed(0)
    ang = torch.rand(batch, generator=gen) * 2 * math.pi
    c, s, z, o = ang.cos(), ang.sin(), torch.zeros(batch), torch.ones(batch)
    rot = torch.stack(
        [torch.stack([c, z, s], -1), torch.stack([z, o, z], -1), torch.stack([-s, z, c], -1)], 1
    )
    verts = v[None] @ rot.transpose(1, 2)
    weak = torch.stack(
        [
            0.9 + 0.1 * torch.rand(batch, generator=gen),
            0.05 * torch.randn(batch, generator=gen),
            0.05 * torch.randn(batch, generator=gen),
        ],
        -1,
    )
    # The 224 SPIN camera, scaled to the image size (same framing at any resolution).
    cam = PinholeCamera.spin_crop(batch, focal=spin_focal(size), res=size)
    return verts, f, cam, weak_to_cam_t(weak)


def worker(cfg):
    import torch

    from jregfix.render import chamfer_silhouette_loss, hard_silhouette, soft_silhouette

    torch.set_num_threads(cfg["threads"])
    verts, f, cam, cam_t = scene(cfg["mesh"], cfg["batch"], cfg["size"])
    size, method = cfg["size"], cfg["method"]
    target = hard_silhouette(verts, f, cam, size, cam_t + torch.tensor([0.02, 0.01, 0.5]))
    weight = torch.rand(cfg["batch"], size, size, generator=torch.Generator().manual_seed(1))

    kind, _, backend = method.rpartition("_")  # e.g. "ours_exact", "torch"

    def step():
        vv = verts.clone().requires_grad_(True)
        if kind == "hard":
            hard_silhouette(vv, f, cam, size, cam_t, backend=backend)
            return
        if method == "chamfer":
            loss = chamfer_silhouette_loss(vv, f, cam, target, cam_t).sum()
        elif method == "dense":
            loss = (dense_soft(vv, f, cam, size, cam_t, 1.0) * weight).sum()
        else:
            interior = "soft" if kind == "ours_exact" else "hard"
            loss = (
                soft_silhouette(vv, f, cam, size, cam_t, interior=interior, backend=backend)
                * weight
            ).sum()
        loss.backward()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up (its peak counts: the timed calls reach the same one)
    best = math.inf
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    print(json.dumps({"ms_per_image": 1e3 * best / cfg["batch"], "peak_mb": peak / 1024}))


def run(cfg):
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def dense_size(batch_dense, faces, budget_mb):
    """Largest power-of-two image side whose dense pass fits ~budget (~80 B per pair)."""
    size = 8
    while batch_dense * (2 * size) ** 2 * faces * 80 / 2**20 <= budget_mb:
        size *= 2
    return size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-budget-mb", type=float, default=3000)
    ap.add_argument("--meshes", default="smpl,anny")
    ap.add_argument(
        "--methods",
        default="ours_torch,ours_numba,ours_exact_torch,"
        "ours_exact_numba,chamfer,hard_torch,hard_numba",
    )
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    print(
        f"threads={args.threads} batch={args.batch} size={args.size} "
        f"load average={os.getloadavg()[0]:.2f} (cores: {os.cpu_count()}) "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    base = {"threads": args.threads, "repeats": args.repeats}
    for mesh in args.meshes.split(","):
        rings, segs = MESHES[mesh]
        nf = 2 * rings * segs
        print(f"\n{mesh}-size mesh: {rings * segs + 2} vertices, {nf} faces")
        times = {}
        for method in args.methods.split(","):
            r = run(
                {**base, "mesh": mesh, "batch": args.batch, "size": args.size, "method": method}
            )
            times[method] = r["ms_per_image"]
            print(
                f"  {method:16s} {args.size}^2 x{args.batch}: {r['ms_per_image']:8.1f} "
                f"ms/image  peak +{r['peak_mb']:7.1f} MB"
            )
            old = times.get(method.removesuffix("_numba") + "_torch")
            if method.endswith("_numba") and old is not None:
                print(f"  {'':16s} numba vs torch: {old / r['ms_per_image']:.1f}x faster")
        size = dense_size(1, nf, args.dense_budget_mb)
        dense = run({**base, "mesh": mesh, "batch": 1, "size": size, "method": "dense"})
        for backend in ("torch", "numba"):
            ours = run(
                {**base, "mesh": mesh, "batch": 1, "size": size, "method": f"ours_exact_{backend}"}
            )
            print(
                f"  dense vs ours_exact_{backend} at {size}^2 x1: dense "
                f"{dense['ms_per_image']:.1f} ms, +{dense['peak_mb']:.0f} MB; ours "
                f"{ours['ms_per_image']:.1f} ms, +{ours['peak_mb']:.0f} MB; speed-up "
                f"{dense['ms_per_image'] / ours['ms_per_image']:.1f}x"
            )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
