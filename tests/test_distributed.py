"""tritonbn.SyncBatchNorm across two processes (gloo, CPU, Triton interpreter)
against the float64 reference on the whole batch: uneven and empty per-rank
batches, channels_last, momentum=None, half input, no affine / no tracking,
several split partials per rank, torch.compile. Each rank's y and dx are its slice of the
whole batch's; dweight / dbias are this rank's share (they sum to the whole
batch's, DDP all-reduces them); the running stats are bitwise equal on every
rank and match the reference.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from reference import reference_batch_norm, reference_grads

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

ROOT = Path(__file__).resolve().parent.parent
WORLD_SIZE = 2
SPLIT = dict(regime="split", block_n=1, block_c=2, block_s=4, split_n=2, split_s=2, num_warps=1)


def _case(shape_tail, sizes, steps=2, channels_last=False, momentum=0.1, affine=True, track=True,
          dtype=torch.float32, configs=None, compiled=False):
    C = shape_tail[0]
    N = sum(sizes)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return dict(
        C=C, sizes=sizes, channels_last=channels_last, momentum=momentum, affine=affine, track=track,
        param_dtype=param_dtype, configs=configs or {}, compiled=compiled,
        weight=torch.rand(C, dtype=param_dtype) + 0.5, bias=torch.randn(C, dtype=param_dtype),
        x=[(torch.randn(N, *shape_tail) * 2 + 3).to(dtype) for _ in range(steps)],
        grad=[torch.randn(N, *shape_tail).to(dtype) for _ in range(steps)],
    )


def _cases():
    torch.manual_seed(0)
    return {
        "uneven": _case((3, 4, 5), [3, 2]),
        "channels_last_cumulative_split": _case(
            (3, 2, 5), [2, 3], channels_last=True, momentum=None,
            configs=dict(forward=SPLIT, backward=SPLIT)),
        "empty_rank": _case((3, 6), [4, 0], steps=1),
        "half_input": _case((3, 4, 4), [2, 2], steps=1, dtype=torch.float16),
        "no_affine_untracked_2d": _case((5,), [3, 3], steps=1, affine=False, track=False),
        # torch.compile: the synchronized forward runs eagerly, behind a graph break
        "compiled": _case((3, 4), [2, 3], compiled=True),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every case once in a two-process group; {case: [rank 0 results, rank 1 results]}."""
    folder = tmp_path_factory.mktemp("distributed")
    cases = _cases()
    torch.save(cases, folder / "cases.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    workers = [subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "distributed_worker.py"), str(rank), str(WORLD_SIZE),
         str(folder / "rendezvous"), str(folder / "cases.pt"), str(folder / f"rank{rank}.pt")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(WORLD_SIZE)]
    for rank, worker in enumerate(workers):
        try:
            output, _ = worker.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            raise
        assert worker.returncode == 0, f"rank {rank} failed:\n{output}"
    return cases, [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def _tolerance(dtype):
    return dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(_cases()))
def test_sync_batchnorm_matches_whole_batch(results, name):
    cases, ranks = results
    case = cases[name]
    tol = _tolerance(case["x"][0].dtype)
    weight, bias = (case["weight"], case["bias"]) if case["affine"] else (None, None)
    running_mean = torch.zeros(case["C"], dtype=torch.float64) if case["track"] else None
    running_var = torch.ones(case["C"], dtype=torch.float64) if case["track"] else None
    for step, (x, grad_out) in enumerate(zip(case["x"], case["grad"])):
        momentum = 1.0 / (step + 1) if case["momentum"] is None else case["momentum"]
        y_ref, new_mean, new_var = reference_batch_norm(x, running_mean, running_var, weight, bias,
                                                        True, momentum, 1e-5)
        dx_ref, dw_ref, db_ref = reference_grads(x, weight, bias, grad_out, None, None, True, 1e-5)
        if case["track"]:
            running_mean, running_var = new_mean, new_var
        outputs = [rank[name]["steps"][step] for rank in ranks]
        torch.testing.assert_close(torch.cat([o["y"] for o in outputs]).double(), y_ref, **tol)
        torch.testing.assert_close(torch.cat([o["dx"] for o in outputs]).double(), dx_ref, **tol)
        if case["channels_last"]:
            assert all(o["y_stride"][1] == 1 for o in outputs if o["y"].numel()), "y not channels_last"
        if case["affine"]:
            torch.testing.assert_close(sum(o["dweight"] for o in outputs).double(), dw_ref, **tol)
            torch.testing.assert_close(sum(o["dbias"] for o in outputs).double(), db_ref, **tol)
    buffers = [rank[name]["buffers"] for rank in ranks]
    if case["track"]:
        for rank_buffers in buffers:
            torch.testing.assert_close(rank_buffers["running_mean"].double(), running_mean, **tol)
            torch.testing.assert_close(rank_buffers["running_var"].double(), running_var, **tol)
            assert rank_buffers["num_batches_tracked"].item() == len(case["x"])
        for key in ("running_mean", "running_var"):
            assert torch.equal(buffers[0][key], buffers[1][key]), f"{key} differs between ranks"
    else:
        assert all(not rank_buffers for rank_buffers in buffers)
