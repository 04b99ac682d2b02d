"""float64 pure-torch BatchNorm: what every test compares against.

The tolerance rule, per dtype: tritonbn's error against this reference may be
at most twice PyTorch's own error on the same input, plus a small floor
(``assert_matches_reference``). Both are measured, never assumed.
"""
from __future__ import annotations

import torch

from tritonbn.autotune import LaunchConfig

# bfloat16 on the Triton interpreter: its float32 -> bfloat16 conversion
# truncates where a GPU (and torch) rounds to nearest even, so about half the
# values land one more unit (2**-7 relative) away. A bfloat16 comparison on CPU
# tests the interpreter's conversion, not the kernel: this is the allowance for it.
INTERPRETER_BF16_ULP = 2.0**-7

# floor added to 2x torch's own error, per dtype: absolute for values of
# magnitude up to 1, relative above (dweight and dbias are sums over N * S values;
# the interpreter sums them in a different order than torch or a GPU does)
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# plus this fraction of the largest reference value: the interpreter's bfloat16 truncation
ULP = {torch.float64: 0.0, torch.float32: 0.0, torch.float16: 0.0, torch.bfloat16: INTERPRETER_BF16_ULP}


# Comparing tritonbn with torch directly (same input, same dtype): (rtol, atol),
# atol relative to the largest |value| of torch's result when above 1. Two
# results each rounded once from nearly the same exact value: a unit or two in
# the last place (float16 / bfloat16), sums in another order (float32, float64).
TORCH_TOLERANCE = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-5),
                   torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def torch_tolerance(dtype: torch.dtype, interpreted: bool) -> tuple[float, float]:
    """(rtol, atol) for tritonbn against torch in `dtype`, on the interpreter or not."""
    rtol, atol = TORCH_TOLERANCE[dtype]
    if dtype == torch.bfloat16 and interpreted:
        rtol, atol = rtol + INTERPRETER_BF16_ULP, atol + INTERPRETER_BF16_ULP
    return rtol, atol


def assert_close_to_torch(name: str, ours: torch.Tensor, theirs: torch.Tensor, interpreted: bool) -> None:
    """Same shape and dtype, values within torch_tolerance (NaN where torch has NaN)."""
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)}, torch gives {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype}, torch gives {theirs.dtype}"
    if not theirs.numel():
        return
    rtol, atol = torch_tolerance(theirs.dtype, interpreted)
    magnitude = max(1.0, theirs.double().abs().nan_to_num(0.0, 0.0, 0.0).max().item())
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=rtol, atol=atol * magnitude,
                               equal_nan=True, msg=lambda m: f"{name}: {m}")


def channel_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def reference_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """(y, new_running_mean, new_running_var) in float64; the running stats are
    returned as new tensors (None when not tracked), the inputs are untouched."""
    xd = x.double()
    new_mean = new_var = None
    if training:
        mean = xd.mean(channel_dims(x))
        var = ((xd - per_channel(mean, x)) ** 2).mean(channel_dims(x))
        if running_mean is not None:
            m = x.numel() // x.shape[1]
            new_mean = (1 - momentum) * running_mean.double() + momentum * mean
            new_var = (1 - momentum) * running_var.double() + momentum * var * m / (m - 1)
    else:
        mean, var = running_mean.double(), running_var.double()
    y = (xd - per_channel(mean, x)) / torch.sqrt(per_channel(var, x) + eps)
    if weight is not None:
        y = y * per_channel(weight.double(), x)
    if bias is not None:
        y = y + per_channel(bias.double(), x)
    return y, new_mean, new_var


def reference_grads(x, weight, bias, grad_out, running_mean, running_var, training, eps):
    """(dx, dweight, dbias) of reference_batch_norm in float64 (None where no parameter)."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y, _, _ = reference_batch_norm(leaves[0], running_mean, running_var, leaves[1], leaves[2],
                                   training, 0.0, eps)
    y.backward(grad_out.double())
    return tuple(t.grad if t is not None else None for t in leaves)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_matches_reference(name, ours, theirs, reference, dtype):
    """ours within 2x of theirs' error against the float64 reference, plus
    FLOOR[dtype] (relative above magnitude 1) and ULP[dtype] of the reference's
    magnitude."""
    assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype}, torch gives {theirs.dtype}"
    err_ours, err_theirs = max_error(ours, reference), max_error(theirs, reference)
    magnitude = reference.abs().max().item() if reference.numel() else 0.0
    bound = 2 * err_theirs + FLOOR[dtype] * max(1.0, magnitude) + ULP[dtype] * magnitude
    assert err_ours <= bound, (f"{name}: max error {err_ours:.3g} vs float64 reference exceeds "
                               f"{bound:.3g} (2 x torch's {err_theirs:.3g} + floor)")


def resident(x: torch.Tensor, block_c: int = 1) -> LaunchConfig:
    """A resident config covering x's channel planes whole."""
    import triton
    spatial = x.numel() // max(x.shape[0] * x.shape[1], 1)
    return LaunchConfig("resident", triton.next_power_of_2(x.shape[0]), block_c,
                        triton.next_power_of_2(spatial))


def cooperative(x: torch.Tensor, block_n: int = 2, block_c: int = 2, block_s: int = 8) -> LaunchConfig:
    """A cooperative config over x: each channel block's [N, S] plane in tiles of
    block_n x block_s, one program each (several along N and, where S >
    block_s, along S; masked tails on both)."""
    spatial = x.numel() // max(x.shape[0] * x.shape[1], 1)
    return LaunchConfig("cooperative", block_n, block_c, block_s,
                        split_n=-(-x.shape[0] // block_n), split_s=-(-spatial // block_s))


def split(block_n=2, block_c=1, block_s=2, split_n=2, split_s=2) -> LaunchConfig:
    """A looping config with small tiles and several splits, so masks, loops and
    the partial merge are all exercised on small inputs."""
    return LaunchConfig("split", block_n, block_c, block_s, split_n, split_s)


def flat(block_n: int = 2, block_s: int = 8, split_n: int = 2) -> LaunchConfig:
    """An inference config of the flat regime with small tiles: rows of 8
    values (several channels per tile where S < 8, a channel over several
    tiles where S > 8), two rows per tile, two row splits."""
    return LaunchConfig("flat", block_n, 1, block_s, split_n=split_n)
