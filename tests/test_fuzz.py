"""Property-based fuzz against torch (hypothesis): random shapes, dtypes,
layouts, modes and module options through tritonbn's modules and fused
epilogue, compared with torch.nn's modules (and relu(bn(x) + residual)).

A case is N in 0..5, C in 1..9, 0..3 spatial dims of sizes 0..7; float32,
float64, float16 or bfloat16 input (16-bit with float32 parameters and
buffers, as under autocast); contiguous, channels_last, sliced, transposed or
expanded; training or eval; momentum 0.1, 0.5, 1.0 or None (cumulative
average); affine and track_running_stats either way; plain, fused ReLU, or
fused residual + ReLU. Two steps, then a backward. Compared: the output and
its strides, the buffers after each step, the gradients of input, weight,
bias and residual, and where torch raises, the error type (buffers left as
torch leaves them). Tolerances: tests/reference.py's torch_tolerance.

Deterministic (derandomize=True): CI runs the same examples every time. On
failure hypothesis prints the smallest failing case, and the note below it is
a script that reproduces it. 400 examples by default (about 30 s on the
interpreter), 2000 under -m slow.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

import tritonbn
from reference import assert_close_to_torch, assert_matches_reference
from tritonbn import kernels
from tritonbn.modules import module_batch_norm

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz needs hypothesis (the dev extra)")
from hypothesis import HealthCheck, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "sliced", "transposed", "expanded"]
EPILOGUES = ["none", "relu", "residual_relu"]
TORCH_MODULES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                 5: torch.nn.BatchNorm3d}
OUR_MODULES = {2: tritonbn.BatchNorm1d, 3: tritonbn.BatchNorm1d, 4: tritonbn.BatchNorm2d,
               5: tritonbn.BatchNorm3d}


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str
    training: bool
    momentum: float | None
    affine: bool
    track_running_stats: bool
    epilogue: str
    seed: int

    def repro(self) -> str:
        """A script that reruns this case (tests/ on sys.path, the interpreter on)."""
        return (f"import os; os.environ['TRITON_INTERPRET'] = '1'\n"
                f"import torch, test_fuzz\n"
                f"test_fuzz.check(test_fuzz.{self!r})")


@st.composite
def cases(draw) -> Case:
    spatial = draw(st.lists(st.integers(0, 7), min_size=0, max_size=3))
    shape = (draw(st.integers(0, 5)), draw(st.integers(1, 9)), *spatial)
    return Case(shape, draw(st.sampled_from(DTYPES)), draw(st.sampled_from(LAYOUTS)), draw(st.booleans()),
                draw(st.sampled_from([0.1, 0.5, 1.0, None])), draw(st.booleans()), draw(st.booleans()),
                draw(st.sampled_from(EPILOGUES)), draw(st.integers(0, 2**16)))


def make_input(case: Case) -> torch.Tensor:
    """The input in the case's layout (values from the case's seed)."""
    shape, dtype = case.shape, case.dtype
    if case.layout == "channels_last" and len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    if case.layout == "sliced":  # every other element of the last dim, and of the batch
        big = torch.randn(2 * shape[0], *shape[1:-1], 2 * shape[-1]).to(dtype)
        return big[::2, ..., ::2]
    if case.layout == "transposed":  # the last two dims swapped in memory
        return torch.randn(*shape[:-2], shape[-1], shape[-2]).to(dtype).transpose(-1, -2)
    if case.layout == "expanded":  # one sample repeated over the batch: stride 0
        return torch.randn(1, *shape[1:]).to(dtype).expand(shape)
    return torch.randn(shape).to(dtype)


def _modules(case: Case):
    """torch's module and tritonbn's, alike, with random parameters and buffers."""
    param_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    options = dict(momentum=case.momentum, affine=case.affine, track_running_stats=case.track_running_stats,
                   dtype=param_dtype)
    theirs = TORCH_MODULES[len(case.shape)](case.shape[1], **options).train(case.training)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(0.5, 1.5)
        if case.track_running_stats:
            theirs.running_mean.normal_()
            theirs.running_var.uniform_(0.5, 1.5)
    ours = OUR_MODULES[len(case.shape)](case.shape[1], **options).train(case.training)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _forward(module, x, residual, epilogue: str, ours: bool):
    if epilogue == "none":
        return module(x)
    if ours:
        return module_batch_norm(module, x, residual, relu=True)
    y = module(x)
    return y if residual is None else y + residual  # the pre-activation: check() applies the ReLU


def _relu_like(pre: torch.Tensor, y_ours: torch.Tensor) -> torch.Tensor:
    """torch.relu(pre), differentiated with tritonbn's mask (y_ours > 0). Where
    the pre-activation is within a rounding of 0 either mask is right, and in
    training one flipped element moves its whole channel's input gradient; the
    output comparison still checks that the two agree to the dtype's tolerance."""
    y = torch.relu(pre)
    return y.detach() + (pre * (y_ours.detach() > 0) - (pre * (y_ours.detach() > 0)).detach())


def _step(case, module, x, residual, ours: bool):
    try:
        return _forward(module, x, residual, case.epilogue, ours), None
    except Exception as error:  # compared with torch's in check()
        return None, error


def _leaves(x, residual, module):
    return [t for t in (x, residual, *module.parameters()) if t is not None and t.requires_grad]


def check(case: Case) -> None:
    """Two steps and a backward of the case through torch and tritonbn: equal
    within the dtype's tolerance, or the same error type."""
    torch.manual_seed(case.seed)
    theirs, ours = _modules(case)
    x = make_input(case)
    residual = torch.randn(case.shape).to(case.dtype) if case.epilogue == "residual_relu" else None
    interpreted = kernels.INTERPRETED
    x.requires_grad_()  # a leaf in its layout (views of a tensor without grad are leaves): shared by both
    r_theirs, r_ours = (None, None) if residual is None else (
        residual.clone().requires_grad_(), residual.clone().requires_grad_())
    for step in range(2):
        before_last = copy.deepcopy(theirs)  # for the float64 reference of the last step's grads
        y_theirs, error_theirs = _step(case, theirs, x, r_theirs, ours=False)
        y_ours, error_ours = _step(case, ours, x, r_ours, ours=True)
        if error_theirs is not None:
            assert error_ours is not None, f"torch raises {error_theirs!r}; tritonbn returned a result"
            assert isinstance(error_ours, type(error_theirs)), f"torch: {error_theirs!r}; tritonbn: {error_ours!r}"
        else:
            assert error_ours is None, f"tritonbn raised {error_ours!r}; torch returned a result"
            if case.epilogue != "none":
                y_theirs = _relu_like(y_theirs, y_ours)
            assert_close_to_torch(f"step {step} output", y_ours, y_theirs, interpreted)
            if y_theirs.numel():
                assert y_ours.stride() == y_theirs.stride(), f"step {step} output strides"
        for (name, ours_buffer), theirs_buffer in zip(ours.state_dict().items(), theirs.state_dict().values()):
            if theirs_buffer.is_floating_point():
                assert_close_to_torch(f"step {step} {name}", ours_buffer, theirs_buffer, interpreted)
            else:
                assert torch.equal(ours_buffer, theirs_buffer), f"step {step} {name}"
        if error_theirs is not None:
            return
    grad_out = torch.randn(case.shape).to(case.dtype)
    leaves_theirs, leaves_ours = _leaves(x, r_theirs, theirs), _leaves(x, r_ours, ours)
    if leaves_theirs:
        grads_theirs = torch.autograd.grad(y_theirs, leaves_theirs, grad_out, allow_unused=True)
        grads_ours = torch.autograd.grad(y_ours, leaves_ours, grad_out, allow_unused=True)
        for i, (g_ours, g_theirs) in enumerate(zip(grads_ours, grads_theirs)):
            if g_theirs is None:
                assert g_ours is None or not g_ours.count_nonzero(), f"grad {i}: torch has none"
            elif case.dtype in (torch.float16, torch.bfloat16):
                # 16-bit input gradients cancel (dx -> 0 as N * S -> 2): torch's own
                # error is the measure, as in tests/reference.py
                reference = _float64_grads(case, before_last, x, r_theirs, grad_out, y_ours)[i]
                assert_matches_reference(f"grad {i}", g_ours, g_theirs, reference, case.dtype)
            else:
                assert_close_to_torch(f"grad {i}", g_ours, g_theirs, interpreted)


def _float64_grads(case, module, x, residual, grad_out, y_ours):
    """The last step's gradients, computed by torch in float64 from the same state."""
    module = module.double()
    x64 = x.detach().double().requires_grad_()
    r64 = None if residual is None else residual.detach().double().requires_grad_()
    y = _forward(module, x64, r64, case.epilogue, ours=False)
    if case.epilogue != "none":
        y = _relu_like(y, y_ours)
    return torch.autograd.grad(y, _leaves(x64, r64, module), grad_out.double(), allow_unused=True)


FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _run(case: Case) -> None:
    note(f"reproduce with:\n{case.repro()}")
    check(case)


@settings(FUZZ, max_examples=400)
@given(cases())
def test_fuzz_against_torch(case):
    _run(case)


@pytest.mark.slow
@settings(FUZZ, max_examples=2000)
@given(cases())
def test_fuzz_against_torch_long(case):
    _run(case)
