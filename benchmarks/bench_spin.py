"""`spin` stage throughput vs a bare ResNet-50 forward at the same batch size (CPU).

The stage reads JPEGs (H36M-sized, 1000x1002), crops them SPIN's way, runs HMR and converts its
outputs; the reference is torchvision's ResNet-50 on ready tensors. Target: ratio >= 0.8.
Random weights (speed does not depend on them). Usage: python benchmarks/bench_spin.py [N]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_h36m import write_fake_h36m


def main(n: int = 48, batch: int = 16) -> None:
    from torchvision.models import resnet50

    from jregfix.models.hmr import HMR
    from jregfix.stages.spin import SpinConfig, run_spin

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_fake_h36m(tmp, n, rng)
        torch.save({"model": HMR().state_dict()}, tmp / "ckpt.pt")
        np.savez(
            tmp / "mean.npz",
            pose=np.zeros(144, np.float32),
            shape=np.zeros(10, np.float32),
            cam=np.array([0.9, 0, 0], np.float32),
        )

        net = resnet50(weights=None).eval()
        x = torch.randn(batch, 3, 224, 224)

        def bare_rate() -> float:
            with torch.inference_mode():
                t = time.perf_counter()
                for _ in range(n // batch):
                    net(x)
                return (n // batch) * batch / (time.perf_counter() - t)

        with torch.inference_mode():
            net(x)  # warm-up
        before = bare_rate()

        cfg = SpinConfig(batch_size=batch, device="cpu", chunk_size=n, force=True)
        t = time.perf_counter()
        run_spin(tmp / "gt.npz", tmp, tmp / "ckpt.pt", tmp / "mean.npz", tmp / "out.npz", cfg)
        total = time.perf_counter() - t
        t = time.perf_counter()
        from jregfix.models.hmr import build_hmr

        build_hmr(tmp / "ckpt.pt", tmp / "mean.npz")
        setup = time.perf_counter() - t
        after = bare_rate()  # the CPU is shared: measure the reference on both sides
    bare = (before + after) / 2
    stage = n / (total - setup)
    print(
        f"load (uptime): {os.getloadavg()}; torch threads {torch.get_num_threads()}; "
        f"{n} images, batch {batch}"
    )
    print(f"bare ResNet-50 forward: {bare:.2f} images/s (before {before:.2f}, after {after:.2f})")
    print(
        f"spin stage: {n / total:.2f} images/s end to end ({total:.1f} s, of which model "
        f"build + checkpoint load {setup:.1f} s); {stage:.2f} images/s without it"
    )
    print(f"ratio (stage without model build / bare): {stage / bare:.2f}  (target >= 0.8)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 48)
