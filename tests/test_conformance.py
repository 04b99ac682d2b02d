"""Conformance with torch on PyTorch's own test data: the op_db samples of
nn.functional.batch_norm and the module_db inputs of BatchNorm1d/2d/3d
(torch.testing._internal), run through tritonbn and torch side by side.

Every sample in float32 and float64, with and without requires_grad:
outputs, running statistics and num_batches_tracked, gradients of input,
weight and bias, and the error torch raises (same type; same message where
PyTorch's test data names one). Module inputs also run channels_last and
non-contiguous, with output strides compared. gradcheck and gradgradcheck in
float64 with check_batched_grad=True, as PyTorch's module tests run them
(fast mode here; full mode, PyTorch's default, under -m slow).

Each comparison counts kernel launches (the kernel objects on
tritonbn.kernels, which tritonbn.launch looks up at call time are wrapped), so
a pass means the Triton kernels ran, not torch's batch_norm behind the
fallback path. Inputs without elements launch nothing: torch's own result is
returned for them (tritonbn.functional._empty_batch_norm).

Not covered here: op_db's "without_cudnn" variant (the same samples, run with
cuDNN off; it differs from the default variant only on a CUDA device, and
tritonbn never calls cuDNN), and the module tests that check torch internals
(test_aot_autograd_*, test_cpu_gpu_parity, test_factory_kwargs: tritonbn's
modules are torch's classes with another forward, so torch's tests of them
hold unchanged).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import re

import pytest
import torch
import torch.nn.functional as F

import tritonbn
from reference import assert_close_to_torch
from tritonbn import kernels

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (the dev extra)")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402
from torch.testing._internal.common_utils import noncontiguous_like  # noqa: E402

OP = next(op for op in op_db if op.name == "nn.functional.batch_norm" and op.variant_test_name == "")
MODULES = {info.module_cls.__name__: info for info in module_db
           if info.module_cls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)}
OURS = {"BatchNorm1d": tritonbn.BatchNorm1d, "BatchNorm2d": tritonbn.BatchNorm2d,
        "BatchNorm3d": tritonbn.BatchNorm3d}
DTYPES = [torch.float32, torch.float64]


# ---------------------------------------------------------------- launch counting

class _CountedKernel:
    """A kernel whose launches (kernel[grid](...)) are counted; everything else
    is the kernel's own."""

    def __init__(self, kernel, counts: collections.Counter, name: str):
        self._kernel, self._counts, self._name = kernel, counts, name

    def __getitem__(self, grid):
        launcher = self._kernel[grid]

        def launch(*args, **kwargs):
            self._counts[self._name] += 1
            return launcher(*args, **kwargs)
        return launch

    def __getattr__(self, name):
        return getattr(self._kernel, name)


@contextlib.contextmanager
def counting_launches():
    """Count the Triton kernel launches made inside the block, per kernel name."""
    counts = collections.Counter()
    names = [name for name in kernels.__all__ if name.endswith("_kernel")]
    saved = {name: getattr(kernels, name) for name in names}
    for name, kernel in saved.items():
        setattr(kernels, name, _CountedKernel(kernel, counts, name))
    try:
        yield counts
    finally:
        for name, kernel in saved.items():
            setattr(kernels, name, kernel)


def test_launch_counter_sees_the_kernels(device):
    """The counter itself: a training forward and backward launch kernels, an
    empty batch launches none."""
    x = torch.randn(4, 3, 2, device=device, requires_grad=True)
    with counting_launches() as counts:
        tritonbn.batch_norm(x, None, None, training=True).sum().backward()
    assert any(name.startswith("bn_fwd") for name in counts) and any(name.startswith("bn_bwd") for name in counts)
    with counting_launches() as counts:
        tritonbn.batch_norm(torch.randn(0, 3, device=device), None, None, training=True)
    assert not counts


# ---------------------------------------------------------------- running both

def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone(memory_format=torch.preserve_format).requires_grad_(value.requires_grad)
    return value


def _differentiable(tensors) -> list[torch.Tensor]:
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


def _grads(y: torch.Tensor, leaves: list[torch.Tensor], grad_out: torch.Tensor) -> list:
    if not leaves or not y.requires_grad:
        return []
    return list(torch.autograd.grad(y, leaves, grad_out, allow_unused=True))


def _compare_grads(ours, theirs, interpreted: bool) -> None:
    assert len(ours) == len(theirs)
    for i, (g_ours, g_theirs) in enumerate(zip(ours, theirs)):
        assert (g_ours is None) == (g_theirs is None), f"grad {i}: ours {g_ours}, torch {g_theirs}"
        if g_theirs is not None:
            assert_close_to_torch(f"grad {i}", g_ours, g_theirs, interpreted)


def _assert_same_error(ours: BaseException | None, theirs: BaseException, regex: str | None = None) -> None:
    assert ours is not None, f"torch raises {type(theirs).__name__}: {theirs}; tritonbn raised nothing"
    assert isinstance(ours, type(theirs)), (
        f"torch raises {type(theirs).__name__} ({theirs}); tritonbn raised {type(ours).__name__} ({ours})")
    if regex is not None:
        assert re.search(regex, str(ours)), f"tritonbn's message {str(ours)!r} does not match {regex!r}"


def _try(fn):
    try:
        return fn(), None
    except Exception as error:  # compared with torch's below
        return None, error


# ---------------------------------------------------------------- op_db samples

def _op_samples(device, dtype, requires_grad):
    return list(OP.sample_inputs(device, dtype, requires_grad=requires_grad))


NUM_OP_SAMPLES = len(_op_samples("cpu", torch.float32, False))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(NUM_OP_SAMPLES))
def test_op_db_sample(device, index, dtype, requires_grad):
    """F.batch_norm's op_db sample: output, running stats, grads or error equal torch's."""
    sample = _op_samples(device, dtype, requires_grad)[index]
    theirs_args = [_clone(a) for a in (sample.input, *sample.args)]
    ours_args = [_clone(a) for a in (sample.input, *sample.args)]
    y_theirs, error_theirs = _try(lambda: F.batch_norm(*theirs_args, **sample.kwargs))
    with counting_launches() as counts:
        y_ours, error_ours = _try(lambda: tritonbn.batch_norm(*ours_args, **sample.kwargs))
        if error_theirs is not None:
            _assert_same_error(error_ours, error_theirs)
            return
        assert error_ours is None, f"tritonbn raised {error_ours!r}; torch returned a result"
        assert_close_to_torch("output", y_ours, y_theirs, kernels.INTERPRETED)
        if y_theirs.numel():
            assert y_ours.stride() == y_theirs.stride()
        for i in (1, 2):  # running_mean, running_var: updated in place, or untouched
            if theirs_args[i] is not None:
                assert_close_to_torch(f"running stat {i}", ours_args[i], theirs_args[i], kernels.INTERPRETED)
        grad_out = torch.randn_like(y_theirs)
        _compare_grads(_grads(y_ours, _differentiable(ours_args), grad_out),
                       _grads(y_theirs, _differentiable(theirs_args), grad_out), kernels.INTERPRETED)
    assert sum(counts.values()) > 0 or sample.input.numel() == 0, "no kernel ran"


def _gradcheck_sample(device, index):
    sample = _op_samples(device, torch.float64, True)[index]
    tensors = [sample.input, *sample.args]
    leaves = [i for i, t in enumerate(tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
    running = [_clone(t) for t in sample.args[:2]]

    def fn(*differentiated):
        args = list(tensors)
        for i, t in zip(leaves, differentiated):
            args[i] = t
        args[1:3] = [None if t is None else t.clone() for t in running]  # every call from the same stats
        return tritonbn.batch_norm(*args, **sample.kwargs)
    return fn, [tensors[i] for i in leaves], sample


@pytest.mark.parametrize("index", range(NUM_OP_SAMPLES))
def test_op_db_gradcheck(device, index):
    """gradcheck and gradgradcheck of every op_db sample in float64, batched
    gradients included (vmap over the backward: is_grads_batched)."""
    fn, inputs, sample = _gradcheck_sample(device, index)
    with counting_launches() as counts:
        assert torch.autograd.gradcheck(fn, inputs, check_batched_grad=True, fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, inputs, check_batched_grad=True, fast_mode=True)
    assert sum(counts.values()) > 0 or sample.input.numel() == 0


@pytest.mark.slow
@pytest.mark.parametrize("index", range(NUM_OP_SAMPLES))
def test_op_db_gradcheck_full(device, index):
    """The same in gradcheck's full mode (every Jacobian entry), PyTorch's default."""
    fn, inputs, _ = _gradcheck_sample(device, index)
    assert torch.autograd.gradcheck(fn, inputs, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(fn, inputs, check_batched_grad=True)


# ---------------------------------------------------------------- module_db inputs

def _module_inputs(name, device, dtype, requires_grad, training):
    info = MODULES[name]
    return info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=requires_grad,
                                   training=training)


MODULE_CASES = [(name, i) for name in MODULES for i in range(len(_module_inputs(name, "cpu", torch.float32,
                                                                                   False, True)))]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.detach().contiguous(memory_format=fmt).requires_grad_(x.requires_grad)
    if layout == "noncontiguous":
        return noncontiguous_like(x.detach()).requires_grad_(x.requires_grad)
    return x


def _run_module_pair(name, index, device, dtype, requires_grad, training, layout):
    """Two steps of torch's module and of tritonbn's, built alike; compares what
    each step returns, the buffers after each, and the second step's grads."""
    module_input = _module_inputs(name, device, dtype, requires_grad, training)[index]
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    theirs = MODULES[name].module_cls(*args, **kwargs).to(device=device, dtype=dtype).train(training)
    ours = OURS[name](*args, **kwargs).to(device=device, dtype=dtype).train(training)
    ours.load_state_dict(theirs.state_dict())
    x = _layout(module_input.forward_input.args[0], layout)
    with counting_launches() as counts:
        for step in range(2):
            x_theirs, x_ours = _clone(x), _clone(x)
            y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
            assert_close_to_torch(f"step {step} output", y_ours, y_theirs, kernels.INTERPRETED)
            if y_theirs.numel():
                assert y_ours.stride() == y_theirs.stride(), f"{layout} input {x.stride()}"
            for (key, b_ours), b_theirs in zip(ours.state_dict().items(), theirs.state_dict().values()):
                if b_theirs.is_floating_point():
                    assert_close_to_torch(f"step {step} {key}", b_ours, b_theirs, kernels.INTERPRETED)
                else:  # num_batches_tracked
                    assert torch.equal(b_ours, b_theirs), f"step {step} {key}: {b_ours} != {b_theirs}"
        grad_out = torch.randn_like(y_theirs)
        _compare_grads(_grads(y_ours, _differentiable([x_ours, *ours.parameters()]), grad_out),
                       _grads(y_theirs, _differentiable([x_theirs, *theirs.parameters()]), grad_out),
                       kernels.INTERPRETED)
    assert sum(counts.values()) > 0 or x.numel() == 0, "no kernel ran"


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,index", MODULE_CASES)
def test_module_db_input(device, name, index, training, dtype, requires_grad):
    """BatchNorm{1,2,3}d's module_db input: outputs, buffers, grads equal torch's."""
    _run_module_pair(name, index, device, dtype, requires_grad, training, "contiguous")


@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,index", MODULE_CASES)
def test_module_db_layouts(device, name, index, training, layout):
    """The same input channels_last (4-D / 5-D) and non-contiguous, float32 with
    grads: output strides equal torch's as well."""
    _run_module_pair(name, index, device, torch.float32, True, training, layout)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,index", MODULE_CASES)
def test_module_db_gradcheck(device, name, index, training):
    """gradcheck and gradgradcheck of the module in float64 with batched grads,
    as PyTorch's test_grad / test_gradgrad do (fast mode)."""
    module_input = _module_inputs(name, device, torch.float64, True, training)[index]
    module = OURS[name](*module_input.constructor_input.args, **module_input.constructor_input.kwargs)
    module = module.to(device=device, dtype=torch.float64).train(training)
    params = [p for p in module.parameters()]
    buffers = {k: b.clone() for k, b in module.named_buffers()}
    x = module_input.forward_input.args[0]

    def fn(x, *params):
        # each call from the same buffers, as a functional call of the module
        state = {**{k: b.clone() for k, b in buffers.items()},
                 **dict(zip([k for k, _ in module.named_parameters()], params))}
        return torch.func.functional_call(module, state, (x,))
    with counting_launches() as counts:
        assert torch.autograd.gradcheck(fn, (x, *params), check_batched_grad=True, fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (x, *params), check_batched_grad=True, fast_mode=True)
    assert sum(counts.values()) > 0 or x.numel() == 0


@pytest.mark.parametrize("name", MODULES)
def test_module_db_errors(device, name):
    """module_db's error inputs (eps <= 0): the error type and message torch's test expects."""
    info = MODULES[name]
    for error_input in info.module_error_inputs_func(info, device=device, dtype=torch.float32,
                                                     requires_grad=False, training=True):
        module_input = error_input.module_error_input
        running = {}
        for cls in (info.module_cls, OURS[name]):
            module = cls(*module_input.constructor_input.args, **module_input.constructor_input.kwargs)
            module = module.to(device)
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                module(*module_input.forward_input.args)
            running[cls] = copy.deepcopy(module.state_dict())
        for key, value in running[info.module_cls].items():
            assert torch.equal(running[OURS[name]][key], value), f"{key} written before the error"


# ---------------------------------------------------------------- what PyTorch's data found

@pytest.mark.parametrize("training", [True, False])
def test_one_dimensional_empty_input(device, training):
    """op_db's (0,) sample: an empty 1-D input gives torch's empty result, not the rank error."""
    stats = torch.zeros(0, device=device), torch.ones(0, device=device)
    y = tritonbn.batch_norm(torch.randn(0, device=device), *stats, training=training)
    assert y.shape == (0,) and y.dtype == torch.float32


@pytest.mark.parametrize("training", [True, False])
def test_batched_gradients(device, training):
    """torch.autograd.grad(is_grads_batched=True), vmap over the backward: each
    row of the batch of grad_outputs gets the gradient torch gives."""
    x = torch.randn(4, 3, 2, device=device, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, device=device, dtype=torch.float64, requires_grad=True)
    grad_outs = torch.randn(2, 4, 3, 2, device=device, dtype=torch.float64)
    running = torch.randn(3, device=device, dtype=torch.float64), torch.rand(3, device=device,
                                                                              dtype=torch.float64) + 0.5
    grads = {}
    for fn in (F.batch_norm, tritonbn.batch_norm):
        y = fn(x, *(t.clone() for t in running), weight, None, training)
        grads[fn] = torch.autograd.grad(y, (x, weight), grad_outs, is_grads_batched=True)
    for ours, theirs in zip(grads[tritonbn.batch_norm], grads[F.batch_norm]):
        torch.testing.assert_close(ours, theirs)


def test_forward_ad_tangent_on_running_stats_raises(device):
    """Eval reads the running stats, which batch_norm is not differentiable in: torch's error."""
    import torch.autograd.forward_ad as fwAD
    x = torch.randn(4, 3, device=device, dtype=torch.float64)
    for fn in (F.batch_norm, tritonbn.batch_norm):
        with fwAD.dual_level(), pytest.raises(RuntimeError, match="not differentiable wrt running_mean"):
            running_mean = fwAD.make_dual(torch.zeros_like(x[0]), torch.ones_like(x[0]))
            fn(fwAD.make_dual(x, torch.ones_like(x)), running_mean, torch.ones_like(x[0]), training=False)


@pytest.mark.parametrize("training", [True, False])
def test_output_format_of_ambiguous_layouts(device, training):
    """A permuted (1, 3, 2, 1) input is channels_last contiguous though its strides
    alone suggest NCHW: torch returns channels_last, and so must the op's fake
    implementation (what torch.compile plans with)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = torch.arange(6.0, device=device).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    running = torch.zeros(2, device=device), torch.ones(2, device=device)
    expected = F.batch_norm(x, *(t.clone() for t in running), training=training).stride()
    assert expected == (6, 1, 2, 2)
    assert tritonbn.batch_norm(x, *running, training=training).stride() == expected
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        y, _, _ = torch.ops.tritonbn.batch_norm_forward(fake, None, None, *(mode.from_tensor(t) for t in running),
                                                        None, training, 0.1, 1e-5, None, False)
    assert y.stride() == expected


def test_empty_float64_batch_through_float32_module(device):
    """torch returns the empty float64 tensor (no per-channel checks on an empty
    batch), leaves the running stats alone and gives zero parameter grads."""
    x = torch.randn(0, 3, 2, 2, device=device, dtype=torch.float64, requires_grad=True)
    results = {}
    for cls in (torch.nn.BatchNorm2d, tritonbn.BatchNorm2d):
        module = cls(3, device=device)
        y = module(x)
        y.sum().backward()
        results[cls] = y, module.running_mean.clone(), module.weight.grad
    for ours, theirs in zip(results[tritonbn.BatchNorm2d], results[torch.nn.BatchNorm2d]):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
