"""Evaluate throughput: batched LBS + regression + Procrustes vs a per-frame numpy loop.

    .venv/bin/python benchmarks/bench_evaluate.py [--frames 20000] [--naive-frames 300]

Uses the synthetic SMPL-format model (6890 vertices). The naive reference evaluates one frame at
a time in numpy (LBS, J @ V, SVD Procrustes); it runs on a subset and its per-frame rate is
used for the ratio. Both sides are timed in this one run.
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

from jregfix.body.smpl import SMPLBody  # noqa: E402
from jregfix.body.synthetic import make_smpl_like_model, write_released_style_pickle  # noqa: E402
from jregfix.io.h36m import h36m_imgname, joints17_to_s24, save_h36m  # noqa: E402
from jregfix.stages.evaluate import evaluate  # noqa: E402
from tests.test_metrics import reference_pa  # noqa: E402
from tests.test_smpl import numpy_lbs  # noqa: E402

H36M_TO_J14 = [6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--naive-frames", type=int, default=300)
    args = ap.parse_args()
    n = args.frames
    rng = np.random.default_rng(0)
    model = make_smpl_like_model()
    tmp = Path(tempfile.mkdtemp())
    write_released_style_pickle(tmp / "smpl.pkl", model)
    body = SMPLBody(tmp / "smpl.pkl")
    aa = rng.normal(size=(n, 72)) * 0.2
    betas = rng.normal(size=(n, 10))
    j = np.zeros((17, 6890))
    for r in range(17):
        j[r, rng.choice(6890, 6, replace=False)] = rng.dirichlet(np.ones(6))
    np.save(tmp / "J.npy", j)
    gt17 = rng.normal(size=(n, 17, 3)) * 0.3
    names = [h36m_imgname("S9", "Walking_1", "60457274", i + 1) for i in range(n)]
    save_h36m(tmp / "gt.npz", names, np.zeros((n, 2)), np.ones(n), joints17_to_s24(gt17))
    np.savez(tmp / "pred.npz", pose=aa, betas=betas)

    t = time.perf_counter()
    doc = evaluate([("spin", tmp / "pred.npz")], tmp / "gt.npz", {"J": tmp / "J.npy"}, body=body,
                   chunk_size=512)
    ours = time.perf_counter() - t

    m = args.naive_frames
    rot = Rotation.from_rotvec(aa[:m].reshape(-1, 3)).as_matrix().reshape(m, 24, 3, 3)
    t = time.perf_counter()
    errs = []
    for i in range(m):
        v = numpy_lbs(model, rot[i], betas[i])
        pj = j @ v
        pj = (pj - pj[:1])[H36M_TO_J14]
        g = (gt17[i] - gt17[i, :1])[H36M_TO_J14]
        errs.append((np.linalg.norm(pj - g, axis=1).mean(), reference_pa(pj, g)))
    naive = (time.perf_counter() - t) / m * n
    ours_sub = np.array([doc["results"][0]["mpjpe_mm"]])
    print(f"threads: torch {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"ours:  {n} frames in {ours:.1f} s = {n / ours:.0f} frames/s")
    print(f"naive: {m} frames timed, {m / (naive * m / n):.0f} frames/s "
          f"(extrapolated {naive:.0f} s for {n})")
    print(f"speed-up: {naive / ours:.1f}x")
    print(f"check: mean MPJPE ours {ours_sub[0]:.2f} mm over {n} frames")


if __name__ == "__main__":
    main()
