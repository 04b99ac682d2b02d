"""The split regime's merge by the last program to arrive: the statistics
kernel's last program per channel block merges the partials (MERGE) and the
sums kernel's sums them (REDUCE), so a training forward is 2 launches and a
backward with sums 2. Results are bit for bit those of the separate merge /
reduce kernel (same order), launched here by hand as the reference, and close
to the float64 reference; the counters are left at zero after every call."""
import pytest
import torch
import torch.nn.functional as F

from bench.kernel_report import recording
from tritonbn import counters, distributed, kernels, launch, plans, views
from reference import assert_matches_reference, reference_batch_norm, reference_grads, split

# C=5 in blocks of 2: three channel blocks, the last half masked; S=21 in tiles
# of 4 over 2 splits, N=7 in tiles of 2 over 3 splits: 6 partials per channel
SHAPE = (7, 5, 7, 3)
CONFIG = split(block_n=2, block_c=2, block_s=4, split_n=3, split_s=2)


def _inputs(dtype, layout, shift=0.0):
    x = torch.randn(SHAPE, dtype=dtype) * 2.0 + shift
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    C = SHAPE[1]
    params = dict(dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    return x, torch.randn(C, **params), torch.randn(C, **params)


def _forward_three_launches(x, weight, bias, running_mean, running_var, nbt, momentum, eps):
    """The forward as stats (MERGE=False), bn_fwd_merge_kernel, normalize."""
    x, view, fmt = views.canonical(x)
    p = plans.forward_plan(x, view, fmt, CONFIG, training=True, weight=weight, bias=bias,
                           update=running_mean is not None, momentum=momentum, eps=eps, residual=None,
                           r_strides=(0, 0, 0), relu=False)
    partials = torch.empty((3, p.num_splits, view.C), dtype=p.stats_dtype)
    stats_args = plans.stats_args(x, view, CONFIG, p.num_splits, momentum=momentum, eps=eps, update=False,
                                  merge=False)
    kernels.bn_fwd_stats_kernel[p.grid](x, partials, partials, partials, partials, partials, partials, partials,
                                        **stats_args)
    save_mean = torch.empty(view.C, dtype=p.stats_dtype)
    save_invstd = torch.empty(view.C, dtype=p.stats_dtype)
    distributed._merge(partials, None, save_mean, save_invstd, running_mean, running_var, nbt, momentum, eps,
                       CONFIG.block_c)
    y = torch.empty_strided(p.size, p.stride, dtype=x.dtype)
    kernels.bn_fwd_normalize_kernel[p.grid](x, y, x, weight, bias, save_mean, save_invstd, **p.args)
    return y, save_mean, save_invstd


def _backward_three_launches(grad_out, x, weight, save_mean, save_invstd, bias_dtype):
    """The training backward as sums (REDUCE=False), bn_bwd_reduce_kernel, dx."""
    x, view, fmt = views.canonical(x)
    grad_out, _ = views.conform(grad_out, view, fmt)
    p = plans.backward_plan(grad_out, x, view, fmt, CONFIG, training=True, weight=weight,
                            output_mask=(True, True, True), bias_dtype=bias_dtype, output=None,
                            residual_grad=False, relu_from_input=False, has_bias=False)
    partials = torch.empty((2, p.num_splits, view.C), dtype=p.stats_dtype)
    dw = torch.empty(view.C, dtype=weight.dtype)
    db = torch.empty(view.C, dtype=bias_dtype)
    kernels.bn_bwd_sums_kernel[p.grid](x, grad_out, x, weight, save_mean, save_mean, save_invstd, partials,
                                       save_mean, save_mean, save_mean, **dict(p.sums_args, REDUCE=False))
    kernels.bn_bwd_reduce_kernel[(p.grid[0],)](partials, dw, db, view.C, p.num_splits, STORE_DWEIGHT=True,
                                               STORE_DBIAS=True, STORE_SUMS=True,
                                               SPLIT_BLOCK=p.sums_args["SPLIT_BLOCK"], BLOCK_C=CONFIG.block_c)
    dx = torch.empty_strided(p.size, p.stride, dtype=x.dtype)
    kernels.bn_bwd_dx_kernel[p.grid](x, grad_out, dx, x, dx, partials, weight, save_mean, save_mean, save_invstd,
                                     **p.args)
    return dx, dw, db


def _equal(name, ours, theirs):
    assert ours.dtype == theirs.dtype and ours.stride() == theirs.stride(), name
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[ours.element_size()]
    assert torch.equal(ours.view(bits), theirs.view(bits)), f"{name}: not bit for bit the separate merge's"


def _check_call(x, weight, bias, momentum):
    """One training forward and backward: 2 launches each, bitwise equal to
    the 3-launch form, close to the float64 reference, counters left at zero."""
    C = x.shape[1]
    stats_dtype = launch.acc_dtype(x.dtype)
    running = [torch.randn(C, dtype=weight.dtype), torch.rand(C, dtype=weight.dtype) + 0.5]
    nbt = torch.full((), 3, dtype=torch.long)
    ours_running = [t.clone() for t in running]
    theirs_running = [t.clone() for t in running]
    with recording(wrap=lambda kernel, log: _Through(kernel, log)) as log:
        y, save_mean, save_invstd = launch.forward_training(x, weight, bias, *ours_running, nbt, momentum, 1e-5,
                                                            config=CONFIG)
    assert [l.__name__ for l in log] == ["bn_fwd_stats_kernel", "bn_fwd_normalize_kernel"]
    assert counters.all_zero()
    y_3, mean_3, invstd_3 = _forward_three_launches(x, weight, bias, *theirs_running, nbt, momentum, 1e-5)
    for name, ours, theirs in (("y", y, y_3), ("save_mean", save_mean, mean_3),
                               ("save_invstd", save_invstd, invstd_3), ("running_mean", *map(
                                   lambda r: r[0], (ours_running, theirs_running))),
                               ("running_var", ours_running[1], theirs_running[1])):
        _equal(name, ours, theirs)
    assert save_mean.dtype == stats_dtype

    effective = 1.0 / 3 if momentum is None else momentum
    y_ref, rm_ref, rv_ref = reference_batch_norm(x, *running, weight, bias, True, effective, 1e-5)
    torch_running = [t.clone() for t in running]
    y_torch = F.batch_norm(x, *torch_running, weight, bias, True, effective, 1e-5)
    assert_matches_reference("y", y, y_torch, y_ref, x.dtype)
    assert_matches_reference("running_mean", ours_running[0], torch_running[0], rm_ref, weight.dtype)
    assert_matches_reference("running_var", ours_running[1], torch_running[1], rv_ref, weight.dtype)

    grad_out = torch.randn_like(x)
    with recording(wrap=lambda kernel, log: _Through(kernel, log)) as log:
        dx, dw, db, _ = launch.backward(grad_out, x, weight, save_mean, save_invstd, True, (True, True, True),
                                        bias.dtype, config=CONFIG)
    assert [l.__name__ for l in log] == ["bn_bwd_sums_kernel", "bn_bwd_dx_kernel"]
    assert counters.all_zero()
    dx_3, dw_3, db_3 = _backward_three_launches(grad_out, x, weight, save_mean, save_invstd, bias.dtype)
    for name, ours, theirs in (("dx", dx, dx_3), ("dweight", dw, dw_3), ("dbias", db, db_3)):
        _equal(name, ours, theirs)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True, 0.0, 1e-5).backward(grad_out)
    for name, ours, theirs, ref in zip(("dx", "dweight", "dbias"), (dx, dw, db), (t.grad for t in leaves),
                                       reference_grads(x, weight, bias, grad_out, None, None, True, 1e-5)):
        assert_matches_reference(name, ours, theirs, ref, x.dtype)


class _Through:
    """Runs the kernel and logs it (the name only)."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(self.kernel.fn if hasattr(self.kernel, "fn") else self.kernel)
        return self.kernel[grid]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_last_program_merges_as_the_merge_kernel(dtype, layout, momentum):
    x, weight, bias = _inputs(dtype, layout, shift=3.0)
    _check_call(x, weight, bias, momentum)


def test_consecutive_calls_find_the_counters_reset():
    """Two calls on the same stream and shape, then one with more channel
    blocks: each finds its counters at zero (the last program reset them)."""
    for shift in (0.0, 10.0):
        _check_call(*_inputs(torch.float32, "contiguous", shift), 0.1)
    held = counters._buffers[counters._stream_key(torch.device("cpu"))]
    assert held.numel() >= 3 and not held.any()


def test_merge_over_several_steps(monkeypatch):
    """More partials than one merge step: the last program Chan-combines
    chunks (forward) and sums chunks (backward) in the merge kernel's order."""
    monkeypatch.setattr(plans, "MERGE_TILE", 4)  # 2 splits x 2 channels per step, 3 steps
    _check_call(*_inputs(torch.float32, "channels_last", 5.0), None)
