"""GPU readiness without a GPU: one device resolution for every command, the GPU numerics
settings, and every command run with ``--device cuda`` under the device tracker (a CPU stand-in
that tags would-be GPU tensors and fails on CPU/GPU mixing and on ``.numpy()`` of a GPU tensor).

The tracked runs compute on the CPU, so their outputs must equal a plain CPU run's: a stage that
silently left the GPU path (or skipped work) would show up there too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jregfix.cli import main
from jregfix.device import numerics, numerics_record, resolve_device
from jregfix.errors import JregfixError
from tests.device_tracker import DeviceTracker
from tests.test_evaluate import world as eval_world  # noqa: F401 - evaluate's tiny world
from tests.test_fit_regressor import _args as fit_args
from tests.test_fit_regressor import files, frames, pool  # noqa: F401 - fit-regressor's files
from tests.test_refine import SIZE, refine_inputs, world  # noqa: F401 - refine's tiny world
from tests.test_silhouettes_stage import data, small_random_maskrcnn  # noqa: F401
from tests.test_spin_stage import args as spin_args
from tests.test_spin_stage import setup  # noqa: F401 - spin's images and checkpoint

CUDA_WORKS = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(CUDA_WORKS, reason="checks the message shown without CUDA")


# ----------------------------------------------------------------------------- resolution


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert resolve_device("cpu") == resolve_device("auto") == torch.device("cpu")
    for bad in ("gpu0", "cuda1", "CUDA", "cuda:-1", "mps"):
        with pytest.raises(JregfixError, match=f"--device '{bad}' is not a device; use auto"):
            resolve_device(bad)
    for wanted in ("cuda", "cuda:1"):
        with pytest.raises(JregfixError, match=f"--device {wanted}: CUDA is not available"):
            resolve_device(wanted)
    with pytest.raises(JregfixError, match="^config: device cuda: CUDA"):
        resolve_device("cuda", option="config: device")


def test_resolve_device_with_two_gpus(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(JregfixError, match=r"cuda:2: only 2 GPU\(s\) visible"):
        resolve_device("cuda:2")
    # in a torchrun job: this rank's GPU, and no explicit index
    assert (
        resolve_device("cuda", local_rank=1)
        == resolve_device("auto", local_rank=1)
        == torch.device("cuda", 1)
    )
    assert resolve_device("cpu", local_rank=1) == torch.device("cpu")
    with pytest.raises(JregfixError, match="cuda:0: under torchrun every process uses the GPU"):
        resolve_device("cuda:0", local_rank=1)


@no_cuda
@pytest.mark.parametrize(
    "command",
    [
        [
            "refine",
            "--init",
            "i.npz",
            "--gt",
            "g.npz",
            "--silhouettes",
            "s.npz",
            "--smpl",
            "m.pkl",
            "--joint-regressor",
            "J.npy",
            "--out",
            "o.npz",
        ],
        [
            "evaluate",
            "--method",
            "spin",
            "--predictions",
            "p.npz",
            "--gt",
            "g.npz",
            "--smpl",
            "m.pkl",
            "--regressor",
            "J.npy",
        ],
        [
            "fit-regressor",
            "--params",
            "p.npz",
            "--gt",
            "g.npz",
            "--smpl",
            "m.pkl",
            "--out",
            "J.npy",
        ],
        ["spin", "--h36m", "h.npz", "--images", ".", "--checkpoint", "c.pt", "--out", "o.npz"],
        ["silhouettes", "--h36m", "h.npz", "--images", ".", "--out", "o.npz"],
    ],
)
def test_cuda_without_a_gpu_is_one_line(command, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # none of the files exist: the device is checked first
    assert main([*command, "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available here" in err, err
    assert "Traceback" not in err and "Found no NVIDIA" not in err
    assert len(err.strip().splitlines()) == 1


@no_cuda
def test_run_config_device_is_checked_first(tmp_path, capsys):
    config = {
        "gt": {"train": "a.npz", "test": "b.npz"},
        "init": {"given": "i.npz"},
        "silhouettes": {"given": "m.npz"},
        "device": "cuda",
        "evaluate": {"methods": [{"method": "spin", "path": "p.npz"}]},
    }
    (tmp_path / "run.json").write_text(json.dumps(config))
    from jregfix.stages.run import run

    with pytest.raises(JregfixError, match="config: device cuda: CUDA is not available"):
        run(tmp_path / "run.json")
    config["device"] = "gpu"
    with pytest.raises(JregfixError, match="config: device 'gpu' is not a device"):
        run(config)


# ----------------------------------------------------------------------------- numerics


def test_numerics_on_cuda_are_ieee_and_deterministic_then_restored(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (
        conv.fp32_precision,
        matmul.fp32_precision,
        torch.are_deterministic_algorithms_enabled(),
    )
    assert before[0] == "tf32"  # torch's default: the reason for all this
    with numerics(torch.device("cpu")):
        assert numerics_record(torch.device("cpu")) == {"device_type": "cpu"}
        assert conv.fp32_precision == "tf32" and not torch.are_deterministic_algorithms_enabled()
    with numerics(torch.device("cuda", 0)):
        assert conv.fp32_precision == matmul.fp32_precision == "ieee"
        assert torch.are_deterministic_algorithms_enabled()
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        record = numerics_record(torch.device("cuda", 0))
    assert record["deterministic_algorithms"] is True
    assert record["cudnn.conv.fp32_precision"] == record["cuda.matmul.fp32_precision"] == "ieee"
    assert record["cublas_workspace_config"] == ":4096:8"
    with numerics(torch.device("cuda", 0), deterministic=False):
        assert conv.fp32_precision == "ieee" and not torch.are_deterministic_algorithms_enabled()
    assert (
        conv.fp32_precision,
        matmul.fp32_precision,
        torch.are_deterministic_algorithms_enabled(),
    ) == before


def test_a_users_cublas_setting_is_kept(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with numerics(torch.device("cuda")):
        assert numerics_record(torch.device("cuda"))["cublas_workspace_config"] == ":16:8"


# ----------------------------------------------------------------------------- auto


def _refine_cli(world, out, *extra):  # noqa: F811
    return [
        *refine_inputs(world, world.parent / "smpl.pkl"),
        "--out",
        str(out),
        "--iters",
        "2",
        "--batch-size",
        "4",
        "--image-size",
        str(SIZE),
        *extra,
    ]


@pytest.fixture(scope="module")
def refine_world(world, smpl_pkl):  # noqa: F811
    """The refine test world with the SMPL file beside it (the CLI takes paths)."""
    (world.parent / "smpl.pkl").write_bytes(smpl_pkl.read_bytes())
    return world


def _evaluate_cli(root, smpl_pkl, out, *extra):
    return [
        "evaluate",
        "--method",
        "spin",
        "--predictions",
        str(root / "spin.npz"),
        "--gt",
        str(root / "gt.npz"),
        "--smpl",
        str(smpl_pkl),
        "--regressor",
        f"true={root / 'J_true.npy'}",
        "--joints",
        "17",
        "--json",
        str(out),
        *extra,
    ]


@pytest.mark.slow
def test_device_auto_works_in_refine_and_evaluate(
    refine_world,
    eval_world,  # noqa: F811
    smpl_pkl,
    tmp_path,
):
    assert main(_refine_cli(refine_world, tmp_path / "auto.npz", "--device", "auto")) == 0
    assert main(_refine_cli(refine_world, tmp_path / "cpu.npz", "--device", "cpu")) == 0
    if not CUDA_WORKS:
        assert (tmp_path / "auto.npz").read_bytes() == (tmp_path / "cpu.npz").read_bytes()
    root = eval_world["root"]
    assert main(_evaluate_cli(root, smpl_pkl, tmp_path / "auto.json", "--device", "auto")) == 0
    assert main(_evaluate_cli(root, smpl_pkl, tmp_path / "cpu.json", "--device", "cpu")) == 0
    auto, cpu = (
        json.loads((tmp_path / f"{n}.json").read_text())["results"] for n in ("auto", "cpu")
    )
    assert auto == cpu


# ----------------------------------------------------------------------------- tracked runs


def _same_arrays(a, b, keys=None):
    with np.load(a) as x, np.load(b) as y:
        for key in keys or x.files:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["soft", "chamfer"])
def test_refine_cli_on_cuda_with_figures(refine_world, tmp_path, loss, monkeypatch):
    # A GPU renders with the PyTorch path; the CPU reference must too (its default is the numba
    # kernel, equal on the same pairs but pruned differently below the cut-off).
    monkeypatch.setenv("JREGFIX_RENDER_BACKEND", "torch")
    extra = ("--silhouette-loss", loss, "--save-figures", "2")
    with DeviceTracker():
        assert (
            main(_refine_cli(refine_world, tmp_path / "gpu.npz", "--device", "cuda", *extra)) == 0
        )
    assert main(_refine_cli(refine_world, tmp_path / "cpu.npz", "--device", "cpu", *extra)) == 0
    _same_arrays(tmp_path / "gpu.npz", tmp_path / "cpu.npz")
    figure = tmp_path / "gpu_silhouettes.png"
    assert figure.read_bytes() == (tmp_path / "cpu_silhouettes.png").read_bytes()
    manifest = json.loads((tmp_path / "gpu.npz.manifest.json").read_text())
    numbers = manifest["numerics"]
    assert numbers["device_type"] == "cuda" and numbers["deterministic_algorithms"] is True
    assert numbers["cudnn.conv.fp32_precision"] == "ieee" and numbers["gpu"] == "tracked GPU"
    assert manifest["config"]["device"] == "cuda"
    # the deterministic mode is the refine call's, not left behind
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.slow
def test_evaluate_cli_on_cuda(eval_world, smpl_pkl, tmp_path):  # noqa: F811
    root = eval_world["root"]
    with DeviceTracker():
        assert main(_evaluate_cli(root, smpl_pkl, tmp_path / "gpu.json", "--device", "cuda")) == 0
    assert main(_evaluate_cli(root, smpl_pkl, tmp_path / "cpu.json", "--device", "cpu")) == 0
    gpu, cpu = (json.loads((tmp_path / f"{n}.json").read_text())["results"] for n in ("gpu", "cpu"))
    assert gpu == cpu and len(gpu) == 1


@pytest.mark.slow
def test_fit_regressor_cli_on_cuda(files, tmp_path):  # noqa: F811
    with DeviceTracker():
        assert main(fit_args(files, tmp_path / "gpu.npy", "--device", "cuda")) == 0
    assert main(fit_args(files, tmp_path / "cpu.npy", "--device", "cpu")) == 0
    assert np.array_equal(np.load(tmp_path / "gpu.npy"), np.load(tmp_path / "cpu.npy"))


@pytest.mark.slow
def test_spin_on_cuda(setup, tmp_path):  # noqa: F811
    from jregfix.stages.spin import SpinConfig, run_spin

    with DeviceTracker():
        run_spin(
            **spin_args(setup, tmp_path / "gpu.npz"),
            config=SpinConfig(batch_size=2, device="cuda", workers=2),
        )
    run_spin(
        **spin_args(setup, tmp_path / "cpu.npz"),
        config=SpinConfig(batch_size=2, device="cpu", workers=2),
    )
    _same_arrays(tmp_path / "gpu.npz", tmp_path / "cpu.npz")
    manifest = json.loads((tmp_path / "gpu.npz.manifest.json").read_text())
    assert manifest["device"] == "cuda:0"
    assert manifest["numerics"]["deterministic_algorithms"] is True
    assert manifest["numerics"]["cudnn.conv.fp32_precision"] == "ieee"


@pytest.mark.slow
def test_silhouettes_on_cuda(data, tmp_path):  # noqa: F811
    from jregfix.models.maskrcnn import detect_people
    from jregfix.stages.silhouettes import SilhouetteConfig, run_silhouettes

    cfg = SilhouetteConfig(
        backend="random-maskrcnn",
        score_threshold=0.0,
        min_iou=0.0,
        batch_size=3,
        chunk_size=3,
        device="cuda",
    )
    model = small_random_maskrcnn()
    with DeviceTracker():
        gpu = model.to("cuda")
        run_silhouettes(
            data / "gt.npz",
            data / "h36m",
            tmp_path / "gpu.npz",
            cfg,
            detector=lambda ims: detect_people(gpu, ims, torch.device("cuda"), 0.0),
        )
        model.to("cpu")
    cfg.device = "cpu"
    run_silhouettes(
        data / "gt.npz",
        data / "h36m",
        tmp_path / "cpu.npz",
        cfg,
        detector=lambda ims: detect_people(model, ims, torch.device("cpu"), 0.0),
    )
    _same_arrays(tmp_path / "gpu.npz", tmp_path / "cpu.npz")
    manifest = json.loads((tmp_path / "gpu.npz.manifest.json").read_text())
    assert manifest["device"] == "cuda:0"
    assert manifest["numerics"]["cudnn.conv.fp32_precision"] == "ieee"
    assert manifest["numerics"]["deterministic_algorithms"] is False


def _run_config(world, smpl_pkl, run_dir, device):  # noqa: F811
    """`run` on the refine world: its S1 frames train, the same frames renamed S9 test."""
    from jregfix.io.h36m import load_h36m, save_h36m

    gt = load_h36m(world / "gt.npz")
    test = run_dir.parent / "gt_test.npz"
    if not test.exists():
        names = np.array([str(n).replace("S1_", "S9_") for n in gt.imgname])
        save_h36m(test, names, gt.center, gt.scale, gt.S)
        with np.load(world / "init.npz") as z:
            np.savez(
                run_dir.parent / "spin_test.npz",
                **{k: z[k] for k in z.files if k != "imgname"},
                imgname=names,
            )
    return {
        "run_dir": str(run_dir),
        "device": device,
        "body": {"model": "smpl", "smpl": str(smpl_pkl)},
        "gt": {"train": str(world / "gt.npz"), "test": str(test)},
        "init": {"given": str(world / "init.npz")},
        "silhouettes": {"given": str(world / "sil.npz")},
        "fit_regressor": {"support": "knn:16", "chunk_size": 4},
        "refine": {"iters": 2, "batch_size": 4, "image_size": SIZE},
        "evaluate": {
            "joints": 17,
            "methods": [{"method": "spin", "path": str(run_dir.parent / "spin_test.npz")}],
        },
        "figures": {"frames": 2},
    }


@pytest.mark.slow
def test_run_on_cuda_puts_every_stage_on_the_device(world, smpl_pkl, tmp_path, monkeypatch):  # noqa: F811
    from jregfix.stages.run import run

    monkeypatch.setenv("JREGFIX_RENDER_BACKEND", "torch")  # the CPU reference renders as a GPU

    with DeviceTracker():
        gpu = run(_run_config(world, smpl_pkl, tmp_path / "gpu", "cuda")).summary
    cpu = run(_run_config(world, smpl_pkl, tmp_path / "cpu", "cpu")).summary
    for name in (
        "J_spin.npy",
        "J_opt.npy",
        "figures/silhouettes.png",
        "figures/poses.png",
        "figures/per_joint.png",
    ):
        assert (tmp_path / "gpu" / name).read_bytes() == (tmp_path / "cpu" / name).read_bytes(), (
            name
        )
    _same_arrays(tmp_path / "gpu" / "refined.npz", tmp_path / "cpu" / "refined.npz")
    assert gpu["evaluate"]["results"] == cpu["evaluate"]["results"]
    manifest = json.loads((tmp_path / "gpu" / "manifest.json").read_text())
    assert {s["config"]["device"] for s in manifest["stages"].values()} == {"cuda"}
    refined = json.loads((tmp_path / "gpu" / "refined.npz.manifest.json").read_text())
    assert refined["numerics"]["deterministic_algorithms"] is True
    # the same config on another device type is not "current": it is computed again
    again = run(_run_config(world, smpl_pkl, tmp_path / "gpu", "cpu")).summary
    assert not again["stages"]["refine"].startswith("current")
