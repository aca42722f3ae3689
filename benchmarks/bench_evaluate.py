"""Evaluate throughput: joints from the regressors' vertices only vs skinning the whole mesh.

    .venv/bin/python benchmarks/bench_evaluate.py [--frames 20000] [--chunk-size 256]
        [--sparse-regressor retrained_J_Regressor.pt] [--dense-support 400] [--threads N]

Two regressors, as in Table I: a wide one (every row reads ``--dense-support`` vertices, wider
than SPIN's H36M regressor) and a narrow one (the released Hedlin file when given, applied with
ReLU and row renormalisation; otherwise a synthetic one on 58 vertices, as many as Hedlin's
reads). Both paths run in this one process on the same frames of the synthetic SMPL-format model:

* new: `evaluate` as shipped (sparse or folded regression, :mod:`jregfix.body.regressed_joints`);
* old: `evaluate` with a body that only offers full vertices (every frame skinned in full,
  then J @ V), i.e. the path before;
* library: :func:`jregfix.score` on the same arrays in memory (no files, no bootstrap).

Printed: frames/s of each, end to end and for the joints alone, their ratio, and the largest
difference between the two result documents (must be < 1e-4 mm). Use a quiet machine for
figures: the load average is printed as a warning when above the core count.
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

import jregfix
from jregfix.body.base import joint_regression
from jregfix.body.smpl import SMPLBody
from jregfix.io.h36m import h36m_imgname, joints17_to_s24, save_h36m
from jregfix.io.regressors import effective_regressor, load_regressor
from jregfix.io.smpl_write import write_released_style_pickle
from jregfix.stages.evaluate import evaluate
from jregfix.synthetic.body import make_smpl_like_model


class FullMesh:
    """The body without its fast joint path: `evaluate` then skins every vertex (the old path)."""

    def __init__(self, body):
        self._body = body

    def __getattr__(self, name):
        if name == "regressed_joints":
            raise AttributeError(name)
        return getattr(self._body, name)


def regressors(args, rng, tmp: Path) -> dict[str, Path]:
    wide = np.zeros((17, 6890))
    for row in range(17):
        wide[row, rng.choice(6890, args.dense_support, replace=False)] = rng.dirichlet(
            np.ones(args.dense_support)
        )
    if args.sparse_regressor:
        narrow = effective_regressor(load_regressor(args.sparse_regressor))
    else:
        cols = rng.choice(6890, 58, replace=False)
        narrow = np.zeros((17, 6890))
        for row in range(17):
            narrow[row, rng.choice(cols, 6, replace=False)] = rng.dirichlet(np.ones(6))
    np.save(tmp / "wide.npy", wide)
    np.save(tmp / "narrow.npy", np.asarray(narrow, dtype=np.float64))
    return {"wide": tmp / "wide.npy", "narrow": tmp / "narrow.npy"}


def numbers(doc) -> np.ndarray:
    return np.array(
        [
            v
            for r in doc["results"]
            for v in (r["mpjpe_mm"], r["pa_mpjpe_mm"], *r["per_joint_mm"].values())
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--chunk-size", type=int, default=256, help="evaluate's --chunk-size")
    ap.add_argument(
        "--sparse-regressor",
        default=None,
        help="the released Hedlin regressor (.pt) as the narrow one",
    )
    ap.add_argument(
        "--dense-support",
        type=int,
        default=400,
        help="vertices per row of the synthetic wide regressor",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.frames
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp())
    write_released_style_pickle(tmp / "smpl.pkl", make_smpl_like_model())
    body = SMPLBody(tmp / "smpl.pkl")
    regs = regressors(args, rng, tmp)
    aa = rng.normal(size=(n, 72)) * 0.2
    betas = rng.normal(size=(n, 10))
    gt17 = rng.normal(size=(n, 17, 3)) * 0.3
    names = [h36m_imgname("S9", "Walking_1", "60457274", i + 1) for i in range(n)]
    save_h36m(tmp / "gt.npz", names, np.zeros((n, 2)), np.ones(n), joints17_to_s24(gt17))
    np.savez(tmp / "pred.npz", pose=aa, betas=betas)

    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    print(f"threads: torch {torch.get_num_threads()}, cpus {cpus}, load average {load:.1f}")
    if load > cpus:
        print(
            "WARNING: the machine is busy (load average above the core count); "
            "do not record these figures"
        )

    stacked = torch.from_numpy(np.concatenate([np.load(p) for p in regs.values()]))
    plan = body.regressed_joints(stacked, [17, 17])
    print(
        f"plan: wide {plan.paths[0]}, narrow {plan.paths[1]}; {plan.num_sparse} vertices "
        f"skinned, {plan.num_pairs} (joint, bone) pairs folded; {plan.macs_per_frame:,} "
        f"multiply-adds/frame (full mesh: {6890 * (3 * 217 + 24 * 12 + 12):,})"
    )

    rot = torch.from_numpy(Rotation.from_rotvec(aa.reshape(-1, 3)).as_matrix()).float()
    rot, b = rot.view(n, 24, 3, 3), torch.from_numpy(betas).float()
    joints = {}
    for label, model in (("new", body), ("old", FullMesh(body))):
        regress = joint_regression(model, stacked, [17, 17])
        t = time.perf_counter()
        with torch.no_grad():
            for start in range(0, n, args.chunk_size):
                regress(rot[start : start + args.chunk_size], b[start : start + args.chunk_size])
        joints[label] = time.perf_counter() - t

    docs, total = {}, {}
    for label, model in (("new", body), ("old", FullMesh(body))):
        t = time.perf_counter()
        docs[label] = evaluate(
            [("spin", tmp / "pred.npz")],
            tmp / "gt.npz",
            regs,
            body=model,
            chunk_size=args.chunk_size,
        ).summary
        total[label] = time.perf_counter() - t

    t = time.perf_counter()
    scores = jregfix.score(
        {"pose": aa, "betas": betas},
        gt17,
        {name: np.load(path) for name, path in regs.items()},
        body,
        chunk_size=args.chunk_size,
    )
    in_memory = time.perf_counter() - t
    print(f"library: score() in memory {n / in_memory:,.0f} frames/s ({in_memory:.2f} s)")
    library = np.array([v for m in scores.summary().values() for v in m.values()])
    stage = np.array([v for r in docs["new"]["results"] for v in (r["mpjpe_mm"], r["pa_mpjpe_mm"])])
    print(f"check: score() equals the stage's means: {np.array_equal(library, stage)}")
    for label in ("new", "old"):
        print(
            f"{label}: evaluate {n / total[label]:,.0f} frames/s ({total[label]:.2f} s), "
            f"joints alone {n / joints[label]:,.0f} frames/s ({joints[label]:.2f} s)"
        )
    print(
        f"speed-up: evaluate {total['old'] / total['new']:.1f}x, "
        f"joints {joints['old'] / joints['new']:.1f}x"
    )
    diff = np.abs(numbers(docs["new"]) - numbers(docs["old"])).max()
    print(
        f"check: largest difference between the two result documents {diff:.2e} mm "
        f"({'ok' if diff < 1e-4 else 'TOO LARGE'})"
    )


if __name__ == "__main__":
    main()
