"""Direct launches (tritonbn/launcher.py) hand the compiled launcher exactly
what Triton's own dispatch hands it.

The check runs in a child process (tests/launch_worker.py) under the
stand-in driver (bench/standin.py): the interpreter off, Triton's real JIT
specializing and caching on CPU tensors, compilation stubbed, Triton's own C
launcher (over a stand-in libcuda) recording the arguments of its entry.
Launch settings are the heuristic's on an H100, so the kernel variants are
those the reference shapes launch on a GPU."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tritonbn import kernels, launcher

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("launch") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.pop("TRITONBN_FAST_LAUNCH", None)
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "launch_worker.py"), str(out)], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def test_direct_launches_pass_what_triton_passes(report):
    """Every launch of 720 calls (12 ResNet-50 shapes at batch 32, three dtypes,
    both layouts, ten kinds of call: plain, fused and unfused forward and
    backward, inference with and without statistics, eval backward):
    the same compiled kernel, grid, stream and arguments as Triton's path."""
    if launcher.VERSION not in launcher.SUPPORTED:
        pytest.skip(f"triton {launcher.VERSION}: direct launches are off, every launch is Triton's own")
    assert report["direct_enabled"]
    assert report["cases"] == 12 * 3 * 2 * 10
    assert report["failures"] == []
    # every regime the heuristic picks for these shapes on an H100 is among them
    assert len(report["variants"]) >= 100, len(report["variants"])
    assert any("bn_fwd_coop_kernel" in v for v in report["variants"])
    assert any("bn_bwd_coop_kernel" in v for v in report["variants"])
    assert any("bn_inference_flat_kernel" in v for v in report["variants"])
    assert any("bn_fwd_resident_kernel" in v for v in report["variants"])


def test_cooperative_kernels_launch_as_cooperative_grids(report):
    """The cooperative regime's kernels, and only they, are launched with
    launch_cooperative_grid (the driver then starts the grid only with every
    program resident), on Triton's path and the direct one alike."""
    launched = dict(report["cooperative"])
    assert len(launched) == len(report["cooperative"]), report["cooperative"]  # one answer per kernel
    assert {name for name, cooperative in launched.items() if cooperative} == {
        "bn_fwd_coop_kernel", "bn_bwd_coop_kernel"}, launched


def test_every_launch_runs_on_the_tensors_device(report):
    """With another device current (1) than the tensors' (0): the first
    launches (Triton's JIT) and the direct ones after all see the tensors'
    device current, and the caller's device is current again after each call."""
    assert len(report["launch_devices"]) >= 9, report["launch_devices"]
    assert set(report["launch_devices"]) == {0}
    assert report["current_after"] == [1] * 9


def test_direct_launches_call_tritons_c_launcher(report):
    """Where a C compiler builds the stand-in libcuda, Triton's own compiled
    CUDA launcher runs every launch (its argument parsing included; the
    driver answers every call), and every prepared direct launch calls its
    C entry without CudaLauncher.__call__ in front of it."""
    if launcher.VERSION not in launcher.SUPPORTED:
        pytest.skip(f"triton {launcher.VERSION}: direct launches are off")
    if shutil.which("cc") is None:
        pytest.skip("no C compiler: the stand-in's launcher is a Python function")
    assert report["launcher"] == "triton-c"
    assert report["driver_launches"] >= 2 * report["launches"]  # the direct launches and Triton's own
    assert report["entries"]["python"] == 0 and report["entries"]["c"] > 0


def test_a_specialization_change_takes_a_new_kernel(report):
    """A misaligned weight or x, a size that makes a stride 1, another dtype,
    a size divisible by 16: the plan key changes and the direct launch takes
    the kernel the JIT picks for the new arguments, not the earlier one."""
    if launcher.VERSION not in launcher.SUPPORTED:
        pytest.skip(f"triton {launcher.VERSION}: direct launches are off")
    assert report["respecialized"] == 5


def test_launch_hooks_send_launches_back_through_triton(report):
    assert report["dispatches_with_hook"] == 1
    assert report["dispatches_without_hook"] == 0


def test_interpreter_launches_through_triton():
    """Under the interpreter a kernel is no JITFunction: never a direct launch."""
    assert kernels.INTERPRETED and not launcher.enabled


def test_environment_turns_direct_launches_off(monkeypatch):
    for value, expected in (("0", False), ("off", False), ("1", True), (None, True)):
        if value is None:
            monkeypatch.delenv("TRITONBN_FAST_LAUNCH", raising=False)
        else:
            monkeypatch.setenv("TRITONBN_FAST_LAUNCH", value)
        assert launcher._enabled_by_environment() is expected
