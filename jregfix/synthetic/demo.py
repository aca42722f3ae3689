"""The demo's configurations: how big a world `jregfix demo` generates and how it runs on it.

``quick`` (2 training subjects, 1 test subject, 4 poses each) is for CI; ``default`` uses
Human3.6M's split (train S1, S5, S6, S7, S8; test S9, S11). The run reproduces Table I on the
world: columns standard / J_spin / J_opt / oracle, rows SPIN-like / VIBE-like / MEVA-like.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jregfix.synthetic.world import WorldConfig


@dataclass(frozen=True)
class DemoSize:
    """Subjects, poses per subject, refine iterations and batch of one demo size."""

    train: tuple[str, ...]
    test: tuple[str, ...]
    frames: int
    iters: int
    batch: int


DEMO_SIZES = {
    "quick": DemoSize(("S1", "S5"), ("S9",), frames=4, iters=20, batch=16),
    "default": DemoSize(
        ("S1", "S5", "S6", "S7", "S8"), ("S9", "S11"), frames=8, iters=40, batch=16
    ),
}
METHOD_FILES = (
    ("SPIN-like", "spin", "spin_test.npz"),
    ("VIBE-like", "vibe", "vibe_output.pkl"),
    ("MEVA-like", "meva", "meva_output.pkl"),
)


def demo_world_config(
    size: str = "default", frames: int | None = None, seed: int = 0
) -> WorldConfig:
    """The world of demo ``size`` ("quick" or "default"), with ``frames`` poses per subject
    (default: the size's)."""
    s = DEMO_SIZES[size]
    return WorldConfig(
        train_subjects=s.train, test_subjects=s.test, frames=frames or s.frames, seed=seed
    )


def demo_run_config(
    world_dir: str | Path, run_dir: str | Path, world: WorldConfig, size: str = "default"
) -> dict:
    """The `run` config of the demo: given init and masks from the world, Table I columns
    standard / J_spin / J_opt / oracle, rows SPIN-like / VIBE-like / MEVA-like."""
    w = Path(world_dir).resolve()
    s = DEMO_SIZES[size]
    return {
        "run_dir": str(Path(run_dir).resolve()),
        "seed": world.seed,
        "body": {"model": "anny"},
        "gt": {"train": str(w / "h36m_train.npz"), "test": str(w / "h36m_test.npz")},
        "init": {"given": str(w / "spin_train.npz")},
        "silhouettes": {"given": str(w / "silhouettes_train.npz")},
        "fit_regressor": {"support": world.regressor_support, "chunk_size": world.chunk_size},
        # The chamfer boundary loss costs less than SoftRas on Anny's 27k faces (1.7x per
        # iteration on an idle 2-core CPU, far more when the CPU is shared; see
        # benchmarks/bench_demo.py) and keeps the demo inside its time budget. Set
        # "silhouette_loss": "soft" in run_config.json for the paper's loss.
        "refine": {
            "iters": s.iters,
            "batch_size": s.batch,
            "image_size": world.crop_size,
            "silhouette_loss": "chamfer",
        },
        # the synthetic VIBE/MEVA-like tracks number GT rows, not video frames
        "evaluate": {
            "joints": 17,
            "frame_ids": "rows",
            "methods": [
                {"label": label, "method": m, "path": str(w / f)} for label, m, f in METHOD_FILES
            ],
            "regressors": {
                "standard": str(w / "J_standard.npy"),
                "oracle": str(w / "J_oracle.npy"),
            },
        },
        "figures": {"params": str(w / "truth_test.npz")},
    }
