"""The torch.library ops: schema, fake implementations, and dispatch."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tritonbn  # noqa: F401  (registers the ops)


def _forward_args(device, training, dtype=torch.float32, track=True, affine=True):
    x = torch.randn(4, 3, 5, device=device, dtype=dtype)
    params = [torch.randn(3, device=device, dtype=dtype) for _ in range(2)] if affine else [None, None]
    running = [torch.zeros(3, device=device, dtype=dtype), torch.ones(3, device=device, dtype=dtype)] \
        if track else [None, None]
    return (x, *params, *running, None, training, 0.1, 1e-5, None, False)


@pytest.mark.parametrize("training,track,affine,fused", [
    (True, True, True, False), (True, False, False, False), (False, True, True, False),
    (False, True, False, False), (True, True, True, True), (False, True, True, True)])
def test_opcheck_forward(device, training, track, affine, fused):
    args = _forward_args(device, training, track=track, affine=affine)
    if fused:  # relu(bn(x) + residual)
        args = (*args[:-2], torch.randn_like(args[0]), True)
    torch.library.opcheck(torch.ops.tritonbn.batch_norm_forward.default, args)


@pytest.mark.parametrize("training,mask,relu", [
    (training, mask, relu) for training in (True, False) for mask, relu in (
        ([True, True, True, False], None), ([False, True, False, False], None),
        ([True, False, False, False], None), ([True, True, True, True], "output"),
        ([True, True, True, False], "input"), ([False, True, True, False], "input"))
    if training or relu != "input"])
def test_opcheck_backward(device, training, mask, relu):
    """After a fused ReLU the mask comes from the forward's output (here with a
    residual, whose gradient is the last mask entry) or, in training only, is
    recomputed from the input with the bias."""
    x, w, b, rm, rv, *_ = _forward_args(device, training)
    residual = torch.randn_like(x) if relu == "output" else None
    y, mean, invstd = torch.ops.tritonbn.batch_norm_forward(x, w, b, rm, rv, None, training, 0.1, 1e-5,
                                                            residual, relu is not None)
    # inputs that require grad: opcheck then checks the double backward's registration too
    grad_out, x, w = (t.detach().requires_grad_() for t in (torch.randn_like(x), x, w))
    torch.library.opcheck(torch.ops.tritonbn.batch_norm_backward.default,
                          (grad_out, x, w, mean, invstd, training, mask, b.dtype, 1e-5,
                           y if relu == "output" else None, relu == "input", b if relu == "input" else None))


def test_fake_outputs_match_real_ones(device):
    """Shapes, dtypes and strides of the fake impls equal the real ones, for
    each layout and for mixed precision."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    for x in (torch.randn(4, 3, 5, 6, device=device).half(),
              torch.randn(4, 3, 5, 6, device=device).to(memory_format=torch.channels_last),
              torch.randn(4, 3, 5, 6, device=device)[:, :, ::2].double()):
        params = dict(dtype=torch.float32 if x.dtype == torch.float16 else x.dtype, device=device)
        args = (x, torch.ones(3, **params), None, torch.zeros(3, **params), torch.ones(3, **params),
                None, True, 0.1, 1e-5, torch.randn_like(x), True)
        real = torch.ops.tritonbn.batch_norm_forward(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = torch.ops.tritonbn.batch_norm_forward(*(mode.from_tensor(a) if isinstance(a, torch.Tensor)
                                                           else a for a in args))
        for r, f in zip(real, fake):
            assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


FALLBACK_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    import tritonbn
    from tritonbn import kernels
    from tritonbn.functional import batch_norm_tracked
    assert not kernels.INTERPRETED
    torch.manual_seed(0)
    for dtype, pdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        for training in (True, False):
            x = torch.randn(4, 3, 5, 6).to(dtype).to(memory_format=torch.channels_last)
            w = torch.randn(3, dtype=pdtype); b = torch.randn(3, dtype=pdtype)
            g = torch.randn_like(x)
            outs = []
            for fn in (tritonbn.batch_norm, F.batch_norm):
                leaves = [t.clone().requires_grad_() for t in (x, w, b)]
                rm, rv = torch.zeros(3, dtype=pdtype), torch.ones(3, dtype=pdtype) * 2
                y = fn(leaves[0], rm, rv, *leaves[1:], training, 0.1, 1e-5)
                y.backward(g)
                outs.append((y, *(t.grad for t in leaves), rm, rv))
            for a, e in zip(*outs):
                torch.testing.assert_close(a, e, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-5)
            assert outs[0][0].stride() == outs[1][0].stride()
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(4)
    x = torch.randn(8, 3)
    batch_norm_tracked(x, rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
    torch.testing.assert_close(rm, x.mean(0) / 4)
    print("fallback ok")
""")


def test_cpu_fallback_without_interpreter():
    """With the interpreter off, CPU tensors run PyTorch's batch_norm and give its results."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fallback ok" in result.stdout


def test_direct_eager_path_and_registered_op_agree(device):
    """Plain eager calls the implementation directly; under a dispatch mode the
    registered ops run. Same outputs, gradients and running stats either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 3, 5, device=device)
    results = []
    for mode in (None, OpLog()):
        xr = x.clone().requires_grad_()
        running = torch.zeros(3, device=device), torch.ones(3, device=device)
        if mode is None:
            y = tritonbn.batch_norm(xr, *running, training=True)
            y.backward(torch.ones_like(y) + x)
        else:
            with mode:
                y = tritonbn.batch_norm(xr, *running, training=True)
                y.backward(torch.ones_like(y) + x)
            ops_seen = {"tritonbn.batch_norm_forward.default", "tritonbn.batch_norm_backward.default"}
            assert ops_seen <= mode.names
        results.append((y.detach(), xr.grad, *running))
    for direct, via_op in zip(*results):
        assert torch.equal(direct, via_op)


def test_running_stats_version_counters_are_bumped(device):
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    versions = running_mean._version, running_var._version
    tritonbn.batch_norm(torch.randn(4, 3, device=device), running_mean, running_var, training=True)
    assert running_mean._version > versions[0] and running_var._version > versions[1]
