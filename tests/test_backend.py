"""tritonbn.backend() and the one-time warning when PyTorch's batch_norm runs
instead of the Triton kernels. The CPU fallback needs the interpreter off, so
those checks run in a subprocess without TRITON_INTERPRET."""
import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import tritonbn
from tritonbn import kernels

ROOT = Path(__file__).resolve().parent.parent
BACKEND = sys.modules["tritonbn.backend"]  # the module; tritonbn.backend is the function


def test_backend_names_what_runs_each_device():
    cpu = "triton-interpreter" if kernels.INTERPRETED else "torch"
    assert tritonbn.backend("cuda") == tritonbn.backend(torch.device("cuda", 1)) == "triton"
    assert tritonbn.backend("cpu") == tritonbn.backend(torch.zeros(2)) == cpu
    assert tritonbn.backend("meta") == tritonbn.backend(torch.empty(2, device="meta")) == "torch"


def test_converted_module_repr_names_backend(device):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.SyncBatchNorm(4),
                                torch.nn.BatchNorm1d(4, affine=False, track_running_stats=False)).to(device)
    plain = repr(model)
    tritonbn.convert_batchnorm(model)
    expected = tritonbn.backend(device)
    lines = repr(model).splitlines()
    assert lines[2].endswith(f"track_running_stats=True, backend={expected})")
    assert lines[3].endswith(f"track_running_stats=True, backend={expected})")
    # no parameters or buffers: the input's device decides
    assert lines[4].endswith(f"backend=triton on cuda, {tritonbn.backend('cpu')} on cpu)")
    assert "backend=torch)" in repr(copy.deepcopy(model).to("meta"))
    tritonbn.revert_batchnorm(model)
    assert repr(model) == plain


def test_fallback_warning_once_and_silenceable(monkeypatch):
    """Meta tensors run PyTorch's batch_norm even with the interpreter on: one
    FallbackWarning for many calls, none under an "ignore" filter."""
    x = torch.empty(4, 3, 5, device="meta")
    monkeypatch.setattr(BACKEND, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            tritonbn.batch_norm(x, None, None, training=True)
    assert [w.category for w in caught] == [tritonbn.FallbackWarning]
    assert issubclass(tritonbn.FallbackWarning, UserWarning)
    assert "PyTorch's own batch_norm on meta tensors" in str(caught[0].message)
    assert caught[0].filename == __file__  # attributed to the caller's line, not tritonbn's

    monkeypatch.setattr(BACKEND, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=tritonbn.FallbackWarning)
        tritonbn.batch_norm(x, None, None, training=True)
    assert caught == []


SCRIPT = textwrap.dedent("""
    import json, os, sys, warnings
    import torch
    import tritonbn
    from tritonbn.autotune import LaunchConfig, override
    assert tritonbn.backend(torch.zeros(1)) == "torch"
    if sys.argv[1] == "late":
        os.environ["TRITON_INTERPRET"] = "1"  # too late: the kernels are defined at import
    x = torch.randn(4, 3, 5, requires_grad=True)
    bn = tritonbn.convert_batchnorm(torch.nn.BatchNorm1d(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = tritonbn.batch_norm(x, None, None, training=True)
        y.sum().backward()
        bn(x)
        first = len(caught)
        with override(forward=LaunchConfig("split", 2, 1, 4, split_n=2)):
            tritonbn.batch_norm(x, None, None, training=True)
            tritonbn.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))
    print(json.dumps(dict(first=first, repr=repr(bn), warnings=[
        dict(category=w.category.__name__, message=str(w.message), file=w.filename, line=w.lineno)
        for w in caught])))
""")


def _fallback_run(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback message differs where there is a GPU")
def test_cpu_fallback_warns_once_with_how_to_run_the_kernels():
    out = _fallback_run("plain")
    assert out["repr"].endswith("backend=torch)")
    fallback, override = out["warnings"]  # forward, backward and the module: one warning; override: one
    assert out["first"] == 1 and {fallback["category"], override["category"]} == {"FallbackWarning"}
    assert "PyTorch's own batch_norm on CPU tensors" in fallback["message"]
    assert "no CUDA GPU here" in fallback["message"]
    assert "set TRITON_INTERPRET=1 before `import tritonbn`" in fallback["message"]
    first_call = SCRIPT.splitlines().index("    y = tritonbn.batch_norm(x, None, None, training=True)") + 1
    assert (fallback["file"], fallback["line"]) == ("<string>", first_call)  # the user's line
    assert "override(...) has no effect on cpu tensors" in override["message"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback message differs where there is a GPU")
def test_interpreter_switched_on_after_import_is_explained():
    out = _fallback_run("late")
    message = out["warnings"][0]["message"]
    assert out["first"] == 1
    assert "TRITON_INTERPRET=1 is set now, but it was not when tritonbn was imported" in message
    assert "The Triton interpreter is off" not in message
