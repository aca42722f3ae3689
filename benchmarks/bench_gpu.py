"""GPU throughput: the renderer, refine and evaluate on CUDA, the old path against the new one.

    .venv/bin/python benchmarks/bench_gpu.py [--batch 16] [--size 224] [--iters 20]
                                             [--frames 20000] [--device cuda:0]

"Old" is the code before the GPU work, rebuilt in this process: the renderer of commit
OLD_COMMIT (read with `git show`, so this needs the git checkout), SMPL posed by smplx's
``lbs`` (one host read of the parent index per joint), and torch's default numerics (TF32
convolutions, nondeterministic kernels). "New" is the current code: the current renderer and
body, refine under deterministic IEEE-fp32 numerics (what `jregfix refine` runs). Both sides
are timed in this one run, after a warm-up, with ``torch.cuda.synchronize()`` around each
measurement:

* renderer: soft silhouette forward + backward, SMPL-size mesh, ``--batch`` at ``--size``²;
* refine: ``refine_batch`` (joint + soft silhouette + adversarial terms), ``--iters``
  iterations, reported as ms per Adam iteration and frames/s at the paper's 100 iterations;
* evaluate: ``evaluate()`` of ``--frames`` frames (LBS + regression + Procrustes), frames/s;
  the two sides differ in the body model's LBS only.

Without CUDA it says so and exits 0. ``--device cpu`` runs the same code on the CPU (a smoke
test of this script; the timings mean little there).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jregfix.body.smpl import SMPLBody  # noqa: E402
from jregfix.device import numerics  # noqa: E402
from jregfix.geometry.camera import PinholeCamera, spin_focal  # noqa: E402
from jregfix.io.h36m import h36m_imgname, joints17_to_s24, save_h36m  # noqa: E402
from jregfix.io.smpl_write import write_released_style_pickle  # noqa: E402
from jregfix.methods import refinement as refine_stage  # noqa: E402
from jregfix.render.silhouette import hard_silhouette, soft_silhouette  # noqa: E402
from jregfix.stages.evaluate import evaluate  # noqa: E402
from jregfix.synthetic.body import make_smpl_like_model  # noqa: E402

OLD_COMMIT = "c520917f39f3fda1a0bafce9ecf33d909171d543"  # the last commit before the GPU work
RENDER_FILES = ("__init__.py", "raster.py", "silhouette.py", "chamfer.py")


def old_renderer(workdir: Path):
    """The renderer package of OLD_COMMIT, importable as ``old_render``."""
    package = workdir / "old_render"
    package.mkdir()
    for name in RENDER_FILES:
        source = f"{OLD_COMMIT}:jregfix/render/{name}"
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", source], capture_output=True, text=True, check=True
        ).stdout
        (package / name).write_text(text.replace("jregfix.render", "old_render"))
    sys.path.insert(0, str(workdir))
    return importlib.import_module("old_render.silhouette")


class SmplxLbsBody(SMPLBody):
    """SMPL posed by ``smplx.lbs.lbs``, as before the GPU work."""

    def forward_skeleton(self, rotmat, betas):
        from smplx.lbs import lbs

        s = self.smpl
        return lbs(
            betas,
            rotmat,
            s.v_template,
            s.shapedirs,
            s.posedirs,
            s.J_regressor,
            s.parents,
            s.lbs_weights,
            pose2rot=False,
        )


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call: best of ``repeats`` after one warm-up call."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    best = math.inf
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def scene(body, b: int, size: int, device: torch.device):
    """A batch of camera-facing SMPL bodies, their masks and 17-joint targets."""
    rng = np.random.default_rng(0)
    from scipy.spatial.transform import Rotation

    aa = rng.normal(size=(b, 24, 3)) * 0.2
    aa[:, 0] = Rotation.from_matrix(np.diag([1.0, -1, -1])).as_rotvec()
    rot = (
        torch.from_numpy(Rotation.from_rotvec(aa.reshape(-1, 3)).as_matrix().reshape(b, 24, 3, 3))
        .float()
        .to(device)
    )
    betas = torch.from_numpy(rng.normal(size=(b, 10)) * 0.5).float().to(device)
    cam_t = torch.tensor([[0.0, 0.1, 45.0]], device=device).repeat(b, 1)
    cam = PinholeCamera.spin_crop(b, spin_focal(size), size, device=device)
    with torch.no_grad():
        verts = body.vertices(rot, betas)
        masks = hard_silhouette(verts, body.faces, cam, size, cam_t=cam_t).float()
    j_reg = torch.zeros(17, 6890, device=device)
    for r in range(17):
        j_reg[r, torch.from_numpy(rng.choice(6890, 4, replace=False)).to(device)] = 0.25
    gt = torch.einsum("kv,bvc->bkc", j_reg, verts)
    batch = refine_stage.Batch(
        rot,
        betas + 0.2,
        cam_t + torch.tensor([0.03, -0.03, 3.0], device=device),
        gt - gt[:, :1],
        masks,
        torch.ones(b, dtype=torch.bool, device=device),
    )
    return verts, cam, cam_t, batch, j_reg


def bench_renderer(old, body, verts, cam, cam_t, size, device, repeats) -> dict:
    weight = torch.rand(verts.shape[0], size, size, device=device)

    def step(render):
        v = verts.detach().clone().requires_grad_(True)
        (render(v, body.faces, cam, size, cam_t=cam_t) * weight).sum().backward()

    return {
        "old": timed(lambda: step(old.soft_silhouette), device, repeats),
        "new": timed(lambda: step(soft_silhouette), device, repeats),
    }


def bench_refine(old, old_body, body, batch, j_reg, size, iters, device) -> dict:
    config = refine_stage.RefineConfig(
        iters=iters, batch_size=batch.rotmat.shape[0], image_size=size
    )
    out = {}
    for label, model, render, context in (
        ("old", old_body, old.soft_silhouette, contextlib.nullcontext()),  # torch defaults
        ("new", body, soft_silhouette, numerics(device)),
    ):
        disc = refine_stage.Discriminators(24, 10, config.disc_lr).to(device)
        saved = refine_stage.soft_silhouette
        refine_stage.soft_silhouette = render
        try:
            with context:
                seconds = timed(
                    lambda m=model, d=disc: refine_stage.refine_batch(m, j_reg, batch, d, config),
                    device,
                    1,
                )
        finally:
            refine_stage.soft_silhouette = saved
        out[label] = seconds / (iters + 1)  # + the final evaluation of the losses
    return out


def bench_evaluate(old_body, body, frames: int, device, workdir: Path) -> dict:
    rng = np.random.default_rng(1)
    j = np.zeros((17, 6890))
    for r in range(17):
        j[r, rng.choice(6890, 6, replace=False)] = rng.dirichlet(np.ones(6))
    np.save(workdir / "J.npy", j)
    names = [h36m_imgname("S9", "Walking_1", "60457274", i + 1) for i in range(frames)]
    save_h36m(
        workdir / "gt.npz",
        names,
        np.zeros((frames, 2)),
        np.ones(frames),
        joints17_to_s24(rng.normal(size=(frames, 17, 3)) * 0.3),
    )
    np.savez(
        workdir / "pred.npz",
        pose=rng.normal(size=(frames, 72)) * 0.2,
        betas=rng.normal(size=(frames, 10)),
    )

    def run(model):
        evaluate(
            [("spin", workdir / "pred.npz")],
            workdir / "gt.npz",
            {"J": workdir / "J.npy"},
            body=model,
            chunk_size=512,
            device=device,
        )

    return {
        "old": timed(lambda: run(old_body), device, 1),
        "new": timed(lambda: run(body), device, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench_gpu: no CUDA device here (torch.cuda.is_available() is False); nothing to "
            "measure. Run it on a machine with an NVIDIA GPU."
        )
        return 0
    device = torch.device(args.device)
    workdir = Path(tempfile.mkdtemp())
    old = old_renderer(workdir)
    write_released_style_pickle(workdir / "smpl.pkl", make_smpl_like_model())
    body = SMPLBody(workdir / "smpl.pkl").to(device)
    old_body = SmplxLbsBody(workdir / "smpl.pkl").to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}; batch {args.batch}, "
        f"{args.size}x{args.size}"
    )
    verts, cam, cam_t, batch, j_reg = scene(body, args.batch, args.size, device)

    def report(what, result, unit, scale, per):
        o, n = result["old"] * scale, result["new"] * scale
        print(
            f"  {what:34s} old {o:9.2f} {unit}   new {n:9.2f} {unit}   "
            f"speed-up {result['old'] / result['new']:5.2f}x{per}"
        )

    print("renderer (soft silhouette, forward + backward):")
    report(
        f"batch {args.batch}",
        bench_renderer(old, body, verts, cam, cam_t, args.size, device, args.repeats),
        "ms",
        1e3,
        "",
    )
    print("refine_batch (joint + soft silhouette + adversarial):")
    r = bench_refine(old, old_body, body, batch, j_reg, args.size, args.iters, device)
    report(
        "per Adam iteration",
        r,
        "ms",
        1e3,
        f"; new {args.batch / (r['new'] * 100):.2f} frames/s at 100 iterations",
    )
    print("evaluate (LBS + regression + Procrustes):")
    e = bench_evaluate(old_body, body, args.frames, device, workdir)
    report(f"{args.frames} frames", e, "s", 1.0, f"; new {args.frames / e['new']:.0f} frames/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
