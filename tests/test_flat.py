"""The flat inference regime (kernels/inference.py, bn_inference_flat_kernel):
the eval-mode forward over the tensor as rows of contiguous values, a
sample's C * S values (NCHW) or a pixel's C channels (channels_last), each
program folding scale and shift once for the channels its positions touch.

Against the float64 reference and bit for bit against the split regime's
kernel (the same folded arithmetic), on shapes where tiles cross channel
boundaries, channels span several tiles and rows split unevenly; the saved
statistics the eval-mode backward reads; the fallback to the split regime
for tensors that are not such rows; and the heuristic's grids on the
ResNet-50 shapes as on an H100.
"""
import pytest
import torch
import torch.nn.functional as F

import tritonbn
from tritonbn import launch, plans, views
from tritonbn.autotune import LaunchConfig, Problem, heuristic, override
from tritonbn.autotune import config as config_module
from tritonbn.autotune.shapes import suite

from reference import assert_matches_reference, flat, reference_batch_norm, split

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# S = 3 (three channels per 8-value tile, a channel across a tile edge),
# S = 49 (a channel over seven tiles), S = 1 (2-D), 5-D, a prime batch
SHAPES = [(5, 7, 3), (3, 4, 7, 7), (9, 6), (2, 3, 2, 3, 2), (7, 1, 5)]


def _parameters(C, device, dtype=torch.float32):
    weight, bias, running_mean = (torch.randn(C, device=device, dtype=dtype) for _ in range(3))
    running_var = torch.rand(C, device=device, dtype=dtype) + 0.5
    return weight, bias, running_mean, running_var


def _layout(x, channels_last):
    if not channels_last or x.dim() not in (4, 5):
        return x
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_and_the_split_regime(device, shape, channels_last, dtype):
    x = _layout((torch.randn(shape, device=device) * 2 + 0.5).to(dtype), channels_last)
    params = dtype if dtype == torch.float64 else torch.float32
    weight, bias, running_mean, running_var = _parameters(shape[1], device, params)
    with override(inference=flat()):
        ours = tritonbn.batch_norm(x, running_mean, running_var, weight, bias, False)
    with override(inference=split()):
        tiles = tritonbn.batch_norm(x, running_mean, running_var, weight, bias, False)
    theirs = F.batch_norm(x, running_mean, running_var, weight, bias, False)
    reference, _, _ = reference_batch_norm(x, running_mean, running_var, weight, bias, False, 0.1, 1e-5)
    assert_matches_reference("y", ours, theirs, reference, dtype)
    assert torch.equal(ours, tiles), "the flat and split kernels fold and round alike"
    assert ours.stride() == theirs.stride()


@pytest.mark.parametrize("config", [flat(), flat(block_n=1, block_s=4, split_n=3), flat(block_n=4, block_s=64,
                                                                                       split_n=1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_saved_statistics_cover_every_channel_once(device, config, channels_last):
    """save_mean = running_mean and save_invstd = 1 / sqrt(running_var + eps)
    for every channel, whichever tile its first value falls in (C = 11: the
    last tile's channel vector is masked)."""
    x = _layout(torch.randn(3, 11, 2, 3, device=device), channels_last)
    weight, bias, running_mean, running_var = _parameters(11, device)
    y, mean, invstd = launch.forward_inference(x, weight, bias, running_mean, running_var, 1e-3, config=config)
    assert torch.equal(mean, running_mean)
    torch.testing.assert_close(invstd, 1 / torch.sqrt(running_var + 1e-3), rtol=1e-6, atol=0)
    reference, _, _ = reference_batch_norm(x, running_mean, running_var, weight, bias, False, 0.1, 1e-3)
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, True), (False, False)])
def test_without_weight_or_bias(device, affine):
    x = torch.randn(4, 5, 7, device=device)
    weight, bias, running_mean, running_var = _parameters(5, device)
    weight, bias = (t if keep else None for t, keep in zip((weight, bias), affine))
    with override(inference=flat()):
        ours = tritonbn.batch_norm(x, running_mean, running_var, weight, bias, False, eps=1e-2)
    reference, _, _ = reference_batch_norm(x, running_mean, running_var, weight, bias, False, 0.1, 1e-2)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_residual_and_relu(device, channels_last, dtype):
    x = _layout(torch.randn(3, 6, 5, 5, device=device).to(dtype), channels_last)
    residual = torch.randn_like(x)
    weight, bias, running_mean, running_var = _parameters(6, device)
    with override(inference=flat()):
        ours = tritonbn.batch_norm_relu(x, running_mean, running_var, weight, bias, False, residual=residual)
    with override(inference=split()):
        tiles = tritonbn.batch_norm_relu(x, running_mean, running_var, weight, bias, False, residual=residual)
    assert torch.equal(ours, tiles)
    reference, _, _ = reference_batch_norm(x, running_mean, running_var, weight, bias, False, 0.1, 1e-5)
    expected = (reference + residual.double()).clamp_min(0)
    assert (ours[expected == 0] == 0).all()
    torch.testing.assert_close(ours.double(), expected, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=5e-2 if dtype == torch.bfloat16 else 1e-5)


def _rows_fit(t):
    _, view, _ = views.canonical(t)
    return views.flat_row_stride(t, view) is not None


def test_tensors_that_are_not_rows_take_the_split_regime(device):
    """A channel slice (NCHW: channels not adjacent) and a batch slice of a
    channels_last tensor (pixels of two samples not evenly spaced) are read
    through the split kernel; so is a residual that is a strided channel slice.
    Results are right either way."""
    base = torch.randn(4, 12, 3, 3, device=device)
    sliced = base[:, ::2]
    strided_batch = base.contiguous(memory_format=torch.channels_last)[::2]
    assert not _rows_fit(sliced) and not _rows_fit(strided_batch)
    assert _rows_fit(base) and _rows_fit(base.contiguous(memory_format=torch.channels_last))
    for x in (sliced, strided_batch):
        weight, bias, running_mean, running_var = _parameters(x.shape[1], device)
        with override(inference=flat()):
            ours = tritonbn.batch_norm(x, running_mean, running_var, weight, bias, False)
        reference, _, _ = reference_batch_norm(x, running_mean, running_var, weight, bias, False, 0.1, 1e-5)
        torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5)

    x = torch.randn(4, 6, 3, 3, device=device)
    residual = base[:, ::2]  # fits the view, but its channels are not adjacent
    assert _rows_fit(base[:, :6]), "a channel prefix is rows of 6 channels, 12 apart"
    weight, bias, running_mean, running_var = _parameters(6, device)
    _, view, fmt = views.canonical(x)
    plan = plans.forward_plan(x, view, fmt, flat(), training=False, weight=weight, bias=bias, update=False,
                              momentum=None, eps=1e-5, residual=residual,
                              r_strides=views.strides_in(residual, view), relu=True)
    assert plan.regime == "split"
    ours = tritonbn.batch_norm_relu(x, running_mean, running_var, weight, bias, False, residual=residual)
    reference, _, _ = reference_batch_norm(x, running_mean, running_var, weight, bias, False, 0.1, 1e-5)
    torch.testing.assert_close(ours.double(), (reference + residual.double()).clamp_min(0), rtol=1e-5,
                               atol=1e-5)


def test_heuristic_on_cpu_is_flat_and_plans_are_flat(device):
    x = torch.randn(4, 6, 5, 5, device=device)
    _, view, fmt = views.canonical(x)
    problem = plans.problem("inference", view, x)
    cfg = heuristic(problem)
    assert cfg.regime == "flat"
    weight, bias, running_mean, running_var = _parameters(6, device)
    plan = plans.forward_plan(x, view, fmt, cfg, training=False, weight=weight, bias=bias, update=False,
                              momentum=None, eps=1e-5, residual=None, r_strides=(0, 0, 0), relu=False)
    assert plan.regime == "flat" and plan.args["L"] == 150 and plan.args["rows"] == 4


def test_config_validation():
    problem = Problem("inference", 4, 6, 25, False, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="flat regime is for inference only"):
        flat().validate(Problem("forward", 4, 6, 25, False, torch.float32, torch.device("cpu")))
    with pytest.raises(ValueError, match="block_c == split_s == 1"):
        LaunchConfig("flat", 2, 2, 8, split_n=2).validate(problem)
    flat().validate(problem)


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(config_module, "_sm_count", lambda *args: 132)
    monkeypatch.setattr(config_module, "_warp_size", lambda *args: 32)


@pytest.mark.parametrize("channel_inner", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_heuristic_grids_on_resnet50_shapes(h100, channel_inner, dtype):
    """As on an H100: every inference is flat; every grid has a program per SM
    at least; it is one wave (at FLAT_REGISTERS registers per thread) or two
    waves and more; and no program streams so few rows that its per-channel
    vectors pass FLAT_PARAMETER_SHARE of its bytes."""
    gpu = torch.device("cuda", 0)
    for shape in suite("resnet50"):
        N, C, H, W = shape
        problem = Problem("inference", N, C, H * W, channel_inner, dtype, gpu)
        cfg = heuristic(problem)
        cfg.validate(problem)
        assert cfg.regime == "flat", shape
        rows, length = config_module.flat_rows(problem)
        rows_per_split = -(-(-(-rows // cfg.block_n)) // cfg.split_n) * cfg.block_n
        programs = -(-length // cfg.block_s) * -(-rows // rows_per_split)
        assert programs >= 132, (shape, cfg, programs)
        per_sm = config_module._programs_per_sm(cfg.num_warps, config_module.FLAT_REGISTERS)
        one_wave, two_waves = programs <= 132 * per_sm, programs >= 2 * 132 * (2048 // (32 * cfg.num_warps))
        assert one_wave or two_waves, (shape, cfg, programs)
        channels = cfg.block_s if channel_inner else cfg.block_s // (H * W) + 2
        share = 16 * channels / (2 * dtype.itemsize * cfg.block_s * min(rows_per_split, rows))
        assert share <= config_module.FLAT_PARAMETER_SHARE * 1.001, (shape, cfg, share)
        assert cfg.block_n * cfg.block_s >= min(1024, rows * length)
