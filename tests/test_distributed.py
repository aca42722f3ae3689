"""Distributed runs (2 gloo processes on CPU) against single-process runs, and rank deaths.

References run as one spawned process with the same thread count, so "identical" means
identical bytes: the distributed code adds everything in a fixed order (exact integer sums in
fit-regressor, batch-ordered gradient sums in refine, chunk-ordered merges elsewhere).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch.multiprocessing as mp

from jregfix.distributed import Ranks
from jregfix.errors import JregfixError
from jregfix.geometry.exact_sum import ExactSum, limbs_value, split_limbs
from jregfix.methods.fitting import FitConfig
from jregfix.methods.refinement import RefineConfig
from jregfix.stages.silhouettes import SilhouetteConfig
from jregfix.stages.spin import SpinConfig
from tests import dist_helpers
from tests.test_fit_regressor import _args as fit_args
from tests.test_fit_regressor import files, frames, pool  # noqa: F401
from tests.test_refine import SIZE, world  # noqa: F401  (the refine test world)
from tests.test_silhouettes_stage import data  # noqa: F401
from tests.test_spin_stage import args as spin_args
from tests.test_spin_stage import setup  # noqa: F401


def test_exact_sum_is_exact_and_order_free():
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(6, 5)) * 10.0 ** rng.uniform(-12, 12, size=(6, 5)) for _ in range(40)]
    # the reference: math.fsum, Shewchuk's exactly rounded sum, entry by entry
    ref = np.array([[math.fsum(p[i, j] for p in parts) for j in range(5)] for i in range(6)])
    totals = []
    for order in (range(40), reversed(range(40)), rng.permutation(40)):
        acc = ExactSum((6, 5))
        for k in order:
            acc.add(parts[k])
        totals.append(acc.value())
    assert all(np.array_equal(t, totals[0]) for t in totals[1:])
    np.testing.assert_allclose(totals[0], ref, rtol=1e-15, atol=40 * 2.0**-65)  # dropped bits
    # split in halves and merged (what ranks and shards do): same bits
    a, b = ExactSum((6, 5)), ExactSum((6, 5))
    for k in range(40):
        (a if k % 3 else b).add(parts[k])
    a.merge(b)
    assert np.array_equal(a.value(), totals[0])
    x = rng.normal(size=1000) * 1e3
    assert np.array_equal(limbs_value(split_limbs(x)), x)  # one addend round-trips exactly
    with pytest.raises(Exception, match="2\\^64"):
        split_limbs(np.array([3e19]))


def test_rank_shares_partition_the_work():
    items = np.arange(11)
    blocks = [Ranks(r, 3).split(items) for r in range(3)]
    assert np.array_equal(np.concatenate(blocks), items)
    owned = [[i for i in range(11) if Ranks(r, 3).owns(i)] for r in range(3)]
    assert sorted(sum(owned, [])) == list(range(11)) and owned[1] == [1, 4, 7, 10]
    single = Ranks()
    assert not single.distributed and single.owns(5) and single.all_true(True)


def _fit_data(tmp_path, smpl_body):
    import torch

    from jregfix.body.base import batch_vertices
    from tests.conftest import planted_regressor

    gen = torch.Generator().manual_seed(11)
    n = 150
    verts = (
        batch_vertices(
            smpl_body, torch.randn(n, 72, generator=gen) * 0.4, torch.randn(n, 10, generator=gen)
        )
        .double()
        .numpy()
    )
    w = planted_regressor(np.random.default_rng(2), 6)
    joints = np.einsum("kv,nvc->nkc", w, verts)
    joints = joints - joints[:, :1] + np.random.default_rng(3).normal(scale=2e-3, size=joints.shape)
    # candidates: each row's planted vertices plus their 40 nearest template neighbours
    tmpl = verts[0]
    cand = np.stack(
        [np.argsort(np.linalg.norm(tmpl - tmpl[np.flatnonzero(r)].mean(0), axis=1))[:40] for r in w]
    )
    cand = np.sort(np.concatenate([cand, np.stack([np.flatnonzero(r)[:6] for r in w])], 1), 1)
    path = tmp_path / "fit.npz"
    np.savez(path, verts=verts, joints=joints, candidates=cand)
    return path


@pytest.mark.slow
def test_fit_regressor_two_ranks_equals_one(tmp_path, smpl_body):
    data_file = _fit_data(tmp_path, smpl_body)
    # 10 chunks: 5 per rank; one round of column generation exercises every certification
    # step across ranks (its noisy world would take many more, which add nothing here)
    config = FitConfig(chunk_size=16, max_rounds=1)
    dist_helpers.launch(dist_helpers.fit_worker, 1, data_file, config, tmp_path / "one.npy")
    dist_helpers.launch(dist_helpers.fit_worker, 2, data_file, config, tmp_path / "two.npy")
    one = np.load(tmp_path / "one_rank0.npy")
    two = [np.load(tmp_path / f"two_rank{r}.npy") for r in range(2)]
    assert one.shape == (17, 6890) and (one > 0).sum() > 17
    # the acceptance bound is 1e-10 relative; the exact sums give identical bits
    assert np.linalg.norm(two[0] - one) <= 1e-10 * np.linalg.norm(one)
    assert np.array_equal(two[0], one) and np.array_equal(two[1], one)


def _refine_inputs(world):  # noqa: F811
    return (world / "init.npz", world / "gt.npz", world / "sil.npz", world / "J_spin.npy")


@pytest.mark.slow
def test_refine_two_ranks_equals_one_process_with_the_same_grouping(
    world,  # noqa: F811
    smpl_pkl,
    tmp_path,
):
    grouped = RefineConfig(iters=4, batch_size=2, image_size=SIZE, batches_per_disc_step=2)
    per_process = RefineConfig(iters=4, batch_size=2, image_size=SIZE)  # 2 ranks -> 2
    inputs = _refine_inputs(world)
    dist_helpers.launch(
        dist_helpers.refine_worker,
        1,
        smpl_pkl,
        inputs,
        tmp_path / "one.npz",
        grouped,
        tmp_path / "one_log.npy",
    )
    dist_helpers.launch(
        dist_helpers.refine_worker,
        2,
        smpl_pkl,
        inputs,
        tmp_path / "two.npz",
        per_process,
        tmp_path / "two_log.npy",
    )
    assert (tmp_path / "two.npz").read_bytes() == (tmp_path / "one.npz").read_bytes()
    logs = [np.load(tmp_path / f"two_log_rank{r}.npy") for r in range(2)]
    assert [int(log[0]) for log in logs] == [2, 2]  # 4 batches dealt out 2 + 2
    with np.load(tmp_path / "two.npz") as z:
        assert np.isfinite(z["disc_loss"]).all() and len(z["pose"]) == 8


@pytest.mark.slow
def test_refine_rank_killed_mid_run_then_resumed(world, smpl_pkl, tmp_path):  # noqa: F811
    config = RefineConfig(iters=3, batch_size=1, image_size=SIZE)  # 8 batches, 4 groups of 2
    inputs = _refine_inputs(world)
    dist_helpers.launch(
        dist_helpers.refine_worker,
        2,
        smpl_pkl,
        inputs,
        tmp_path / "ref.npz",
        config,
        tmp_path / "ref_log.npy",
    )
    out = tmp_path / "out.npz"
    # rank 1 dies right after saving its 2nd batch (batch 3): rank 0 cannot pass group 1
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        dist_helpers.launch(
            dist_helpers.refine_worker,
            2,
            smpl_pkl,
            inputs,
            out,
            config,
            tmp_path / "killed_log.npy",
            (1, 2),
        )
    chunks = sorted((tmp_path / "out.npz.chunks").glob("chunk_*.npz"))
    names = {c.name for c in chunks}
    # batches 0, 1 and 3 are saved; rank 0 may be stopped before or after saving batch 2
    assert not out.exists() and {
        "chunk_000000.npz",
        "chunk_000001.npz",
        "chunk_000003.npz",
    } <= names <= {f"chunk_{i:06d}.npz" for i in range(4)}
    for c in chunks:  # complete files only (atomic writes), each with its batch's frame
        with np.load(c) as z:
            assert len(z["rows"]) == 1 and np.isfinite(z["pred_rotmat"]).all()
    # a 3-process job cannot continue a run with 2 batches per discriminator step...
    from jregfix.body.smpl import SMPLBody
    from jregfix.stages.refine import refine

    with pytest.raises(JregfixError, match="cannot be dealt out to 3 processes"):
        refine(*inputs[:3], SMPLBody(smpl_pkl), inputs[3], out, config, ranks=Ranks(0, 3))
    # ...one process can: it adopts the recorded grouping instead of starting over
    dist_helpers.launch(
        dist_helpers.refine_worker, 1, smpl_pkl, inputs, out, config, tmp_path / "resumed_log.npy"
    )
    log = np.load(tmp_path / "resumed_log_rank0.npy")
    # only the missing batches were optimised, the finished ones were reused
    assert int(log[0]) == 8 - len(chunks) and int(log[1]) == len(chunks)
    assert out.read_bytes() == (tmp_path / "ref.npz").read_bytes()
    assert not (tmp_path / "out.npz.chunks").exists()


@pytest.mark.slow
def test_spin_two_ranks_identical_and_resumes_after_a_kill(setup, tmp_path):  # noqa: F811
    config = SpinConfig(batch_size=1, chunk_size=1, device="cpu", workers=1)
    dist_helpers.launch(dist_helpers.spin_worker, 1, spin_args(setup, tmp_path / "one.npz"), config)
    out = tmp_path / "two.npz"
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        dist_helpers.launch(dist_helpers.spin_worker, 2, spin_args(setup, out), config, (1, 1))
    left = sorted(p.name for p in (tmp_path / "two.npz.chunks").glob("chunk_*.npz"))
    assert "chunk_000001.npz" in left and not out.exists()
    # resume with one process: the finished chunks (the dead rank's too) are not recomputed
    dist_helpers.launch(
        dist_helpers.spin_worker, 1, spin_args(setup, out), config, None, tmp_path / "log.npy"
    )
    assert np.load(tmp_path / "log.npy").tolist() == [len(left), 5]
    assert out.read_bytes() == (tmp_path / "one.npz").read_bytes()


@pytest.mark.slow
def test_silhouettes_two_ranks_identical(data, tmp_path):  # noqa: F811
    config = SilhouetteConfig(backend="fake", batch_size=1, chunk_size=2, workers=1)
    dist_helpers.launch(dist_helpers.silhouettes_worker, 1, data, config)
    one = (data / "sil.npz").read_bytes()
    (data / "sil.npz").unlink()
    (data / "sil.npz.manifest.json").unlink()
    dist_helpers.launch(dist_helpers.silhouettes_worker, 2, data, config)
    assert (data / "sil.npz").read_bytes() == one


def jregfix_cli(args: list[str], processes: int) -> subprocess.CompletedProcess:
    """`python -m jregfix ARGS`, under `torchrun --nproc-per-node N` when N > 1 (one thread
    per process either way); asserts success."""
    launcher = [
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(processes),
        "--master-port",
        str(dist_helpers.free_port()),
    ]
    done = subprocess.run(
        [sys.executable, *(launcher if processes > 1 else []), "-m", "jregfix", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_torchrun_refine_cli_matches_single_process(world, smpl_pkl, tmp_path):  # noqa: F811
    """The real launcher: `torchrun --nproc-per-node 2 -m jregfix refine ...`."""
    init, gt, sil, j_spin = _refine_inputs(world)
    common = [
        "refine",
        "--init",
        str(init),
        "--gt",
        str(gt),
        "--silhouettes",
        str(sil),
        "--smpl",
        str(smpl_pkl),
        "--joint-regressor",
        str(j_spin),
        "--iters",
        "3",
        "--batch-size",
        "2",
        "--image-size",
        str(SIZE),
    ]
    two = jregfix_cli([*common, "--out", str(tmp_path / "two.npz")], 2)
    jregfix_cli([*common, "--batches-per-disc-step", "2", "--out", str(tmp_path / "one.npz")], 1)
    assert (tmp_path / "two.npz").read_bytes() == (tmp_path / "one.npz").read_bytes()
    assert "refined 8 frames" in two.stderr and two.stderr.count("refined 8 frames") == 1


@pytest.mark.slow
def test_torchrun_fit_regressor_cli_matches_single_process(files, tmp_path):  # noqa: F811
    jregfix_cli(fit_args(files, tmp_path / "two.npy", "--chunk-size", "8"), 2)
    jregfix_cli(fit_args(files, tmp_path / "one.npy", "--chunk-size", "8"), 1)
    assert np.array_equal(np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy"))
    report = json.loads((tmp_path / "two.npy.json").read_text())
    assert report["processes"] == {"world_size": 2, "backend": "gloo"}


def test_single_process_commands_refuse_to_run_under_torchrun(monkeypatch, capsys):
    from jregfix.cli.app import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["evaluate", "--gt", "nothing.npz"]) == 1
    assert "runs in one process" in capsys.readouterr().err


def test_a_failing_rank_names_itself(monkeypatch, capsys):
    from jregfix.cli.app import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert main(["fit-regressor", "--params", "p.npz", "--gt", "g.npz", "--out", "J.npy"]) == 1
    err = capsys.readouterr().err
    assert "rank 1 of 2:" in err and "MASTER_ADDR" in err


# ----------------------------------------------------------------------------- GPU placement
# torchrun edge cases on fake GPUs: torch.cuda reports N devices and set_device records the
# index it is given; the NCCL group the code asks for is formed over gloo instead.


def _fake_gpu_worker(rank: int, ports: list[int], out_dir) -> None:
    import torch
    import torch.distributed as dist

    from jregfix import distributed

    torch.set_num_threads(1)
    visible = {"count": 0}
    chosen: list[int] = []
    backends: list[str] = []

    def set_device(index):  # recorded, not raised: a rank failing here would hang its peer
        chosen.append(index if 0 <= index < visible["count"] else "invalid device ordinal")

    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: visible["count"]
    torch.cuda.set_device = set_device
    real_init = dist.init_process_group
    dist.init_process_group = lambda backend, **kw: (
        backends.append(backend) or real_init("gloo", **kw)
    )

    def join(port, count, env):
        visible["count"] = count
        for key in ("LOCAL_RANK", "SLURM_LOCALID"):
            os.environ.pop(key, None)
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", **env
        )
        try:
            ranks = distributed.init_from_env("cuda", timeout_s=20)
        except Exception as exc:  # recorded for the test to read
            return {"error": f"{type(exc).__name__}: {exc}"}
        seen = {
            "set_device": chosen[-1],
            "backend": backends[-1],
            "local_rank": ranks.local_rank,
            "current": distributed.current().local_rank,
            "device": str(ranks.device("cuda")),
            "auto": str(ranks.device("auto")),
            "sum": int(ranks.all_reduce_sum(torch.tensor([rank + 1]))[0]),
        }
        try:
            ranks.device("cuda:1")
        except Exception as exc:
            seen["explicit"] = f"{type(exc).__name__}: {exc}"
        distributed.shutdown()
        return seen

    observed = {
        # srun started the processes: no LOCAL_RANK; node-local ids differ from global ranks
        "slurm_localid": join(ports[0], 2, {"SLURM_LOCALID": str(1 - rank)}),
        # SLURM binds one GPU per task: every process sees one device, index 0
        "one_gpu_per_task": join(ports[1], 1, {"LOCAL_RANK": str(rank)}),
    }
    try:  # refused before joining: no rendezvous needed
        distributed.init_from_env("cuda:1")
    except Exception as exc:
        observed["explicit_index"] = f"{type(exc).__name__}: {exc}"
    (out_dir / f"rank{rank}.json").write_text(json.dumps(observed))


@pytest.fixture(scope="module")
def fake_gpu_job(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fake_gpus")
    ports = [dist_helpers.free_port() for _ in range(2)]
    mp.spawn(_fake_gpu_worker, args=(ports, out_dir), nprocs=2, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_without_local_rank_both_readers_use_slurm_localid(fake_gpu_job):
    for rank, seen in enumerate(fake_gpu_job):
        mine = seen["slurm_localid"]
        # the GPU joined for NCCL, the rank's recorded GPU and its compute device agree
        assert mine["set_device"] == mine["local_rank"] == mine["current"] == 1 - rank
        assert mine["device"] == mine["auto"] == f"cuda:{1 - rank}"
        assert mine["backend"] == "nccl" and mine["sum"] == 3


@pytest.mark.slow
def test_one_gpu_per_task_binding_uses_the_visible_gpu(fake_gpu_job):
    for seen in fake_gpu_job:
        mine = seen["one_gpu_per_task"]
        assert "error" not in mine, mine
        assert mine["set_device"] == mine["local_rank"] == mine["current"] == 0
        assert mine["device"] == "cuda:0" and mine["sum"] == 3


@pytest.mark.slow
def test_explicit_gpu_index_is_refused_under_torchrun(fake_gpu_job):
    for seen in fake_gpu_job:
        for message in (seen["explicit_index"], seen["slurm_localid"]["explicit"]):
            assert message.startswith("JregfixError: --device cuda:1: under torchrun")
            assert "\n" not in message


def test_local_rank_sources_in_order(monkeypatch):
    from jregfix.distributed import local_rank

    for key in ("LOCAL_RANK", "SLURM_LOCALID", "RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    assert local_rank() == 0
    monkeypatch.setenv("RANK", "9")
    assert local_rank() == 1  # global rank, modulo the 4 visible GPUs
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert local_rank() == 2
    monkeypatch.setenv("LOCAL_RANK", "7")
    assert local_rank() == 3
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert local_rank() == 7  # no GPUs: the launcher's number as it is
    monkeypatch.setenv("LOCAL_RANK", "one")
    with pytest.raises(JregfixError, match="LOCAL_RANK='one' is not an integer"):
        local_rank()


def test_torchrun_cli_refuses_an_explicit_gpu_in_one_line(monkeypatch, capsys):
    from jregfix.cli.app import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    args = [
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
        "--device",
        "cuda:1",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--device cuda:1: under torchrun every process uses the GPU of its LOCAL_RANK" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
