"""Building blocks shared by the BatchNorm kernels: tile addressing and Welford.

Every kernel sees its input through one canonical (N, C, S) view: N the batch,
C the channels, S the flattened spatial size. Element (n, c, s) of tensor T lives
at ``n * stride_n + c * stride_c + s * stride_s``. One of the last two strides
is the unit stride and is a compile-time 1, so loads vectorise along it:

- channel-strided (NCHW-like, ``CHANNEL_INNER=False``): stride_s == 1;
- channel-inner (channels_last, (N, C) 2-D; ``CHANNEL_INNER=True``): stride_c == 1.

A program works on tiles [BLOCK_N, BLOCK_C, BLOCK_S]; per-channel values are
[BLOCK_C] vectors and per-channel reductions run over axes 0 and 2. The layout
only changes the block shape the launcher picks (BLOCK_C == 1 for wide spatial
planes, BLOCK_S small for channel-inner data), never the kernel code.

Statistics are Welford triples (count, mean, m2) with m2 = sum (x - mean)^2,
kept per lane over a program's full tiles (all lanes share one count there)
and merged with Chan's formula. The merge uses tl.sum rather
than tl.reduce with a custom combine: same accuracy, and tl.reduce falls back
to a per-element Python loop under the Triton interpreter.
"""
import triton
import triton.language as tl


@triton.jit
def tile_offsets(
    n0, s0, cols, cmask, N, S,
    stride_n, stride_c, stride_s,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr,
):
    """Element offsets and in-bounds mask of the tile starting at (n0, cols[0], s0).

    VEC > 1 (channel-strided only): the launcher found S, stride_n and stride_c
    multiples of VEC and the tensor's start 16-byte aligned, so every run of VEC
    values along S starts aligned and is wholly in or out of bounds; saying so
    lets the compiler load VEC values at once where it cannot prove it (the
    JIT only knows divisibility by 16, and S = 196 is not)."""
    n = n0 + tl.arange(0, BLOCK_N)
    s = s0 + tl.arange(0, BLOCK_S)
    c = cols
    if INT64:
        n = n.to(tl.int64)
        s = s.to(tl.int64)
        c = c.to(tl.int64)
    if CHANNEL_INNER:
        offs = n[:, None, None] * stride_n + c[None, :, None] + s[None, None, :] * stride_s
        mask = (n < N)[:, None, None] & cmask[None, :, None] & (s < S)[None, None, :]
    else:
        n_offs = n * stride_n
        c_offs = c * stride_c
        if VEC > 1:
            n_offs = tl.multiple_of(n_offs, VEC)
            c_offs = tl.multiple_of(c_offs, VEC)
            in_s = (s // VEC * VEC) < S  # the same lanes as s < S, with S a multiple of VEC
        else:
            in_s = s < S
        offs = n_offs[:, None, None] + c_offs[None, :, None] + s[None, None, :]
        mask = (n < N)[:, None, None] & cmask[None, :, None] & in_s[None, None, :]
    return offs, mask


@triton.jit
def epilogue(
    y, R, n0, s0, cols, cmask, mask, N, S,
    stride_rn, stride_rc, stride_rs,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """The fused variants' tail on a tile of y: + residual, then ReLU, before the
    one rounding to the output dtype. A NaN passes the ReLU, as torch.relu's does."""
    if HAS_RESIDUAL:
        r_offs, _ = tile_offsets(n0, s0, cols, cmask, N, S, stride_rn, stride_rc, stride_rs,
                                 BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
        y = y + tl.load(R + r_offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)
    return y


@triton.jit
def load_grad(
    DY, Y, n0, s0, cols, cmask, mask, N, S,
    stride_gn, stride_gc, stride_gs,
    stride_yn, stride_yc, stride_ys,
    RELU: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """A tile of dy; after a fused ReLU, the gradient that reaches the batch norm
    (and the residual): dy where the forward's output y > 0, else 0."""
    g_offs, _ = tile_offsets(n0, s0, cols, cmask, N, S, stride_gn, stride_gc, stride_gs,
                             BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
    g = tl.load(DY + g_offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if RELU:
        y_offs, _ = tile_offsets(n0, s0, cols, cmask, N, S, stride_yn, stride_yc, stride_ys,
                                 BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
        y = tl.load(Y + y_offs, mask=mask, other=0.0)
        g = tl.where(y > 0, g, 0.0)
    return g


@triton.jit
def affine(invstd, Weight, Bias, cols, cmask,
           HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(scale, bias) [BLOCK_C] of the training normalization y = fma(x - mean,
    scale, bias), scale = invstd * weight; zeros for an absent bias. Forward and
    backward kernels both build them here, so their values agree bit for bit."""
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * load_channel(Weight, cols, cmask, ACC_DTYPE)
    bias = tl.zeros_like(invstd)
    if HAS_BIAS:
        bias = load_channel(Bias, cols, cmask, ACC_DTYPE)
    return scale, bias


@triton.jit
def saved_affine(Mean, Invstd, Weight, Bias, cols, cmask,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(mean, invstd, scale, bias) [BLOCK_C] of channels `cols` from the saved
    statistics: what the normalize and dx passes apply (affine)."""
    mean = load_channel(Mean, cols, cmask, ACC_DTYPE)
    invstd = load_channel(Invstd, cols, cmask, ACC_DTYPE)
    scale, bias = affine(invstd, Weight, Bias, cols, cmask, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
    return mean, invstd, scale, bias


@triton.jit
def relu_mask_from_x(x, mean, scale, bias, OUT_DTYPE: tl.constexpr):
    """Where a fused ReLU in the training forward let the gradient through,
    recomputed from x instead of read from y: y > 0 with y = fma(x - mean,
    scale, bias) rounded to the output dtype. The forward kernels compute y with
    these same operations (one fma, never a separate multiply and add) from the
    same save_mean / save_invstd values, so the mask is theirs bit for bit.
    The rounded y is compared in x's dtype: triton 3.9's interpreter compares
    a just-converted bfloat16 tensor as raw bits (-1.5 > 0 there)."""
    return tl.fma(x - mean, scale, bias).to(OUT_DTYPE).to(x.dtype) > 0


@triton.jit
def welford_merge(count, mean, m2, AXIS: tl.constexpr):
    """Chan-merge Welford triples along AXIS.

    n = sum n_i;  mean = sum n_i mean_i / n;  m2 = sum (m2_i + n_i (mean_i - mean)^2).
    Every term of m2 is non-negative, so nothing cancels. Empty lanes (n_i = 0)
    contribute nothing; an all-empty slice gives (0, 0, 0).
    """
    total = tl.sum(count, AXIS)
    merged_mean = tl.sum(count * mean, AXIS) / tl.maximum(total, 1.0)
    dev = mean - tl.expand_dims(merged_mean, AXIS)
    merged_m2 = tl.sum(m2 + count * dev * dev, AXIS)
    return total, merged_mean, merged_m2


@triton.jit
def welford_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's pairwise merge of two Welford triples (elementwise)."""
    n = n_a + n_b
    frac_b = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * frac_b
    m2 = m2_a + m2_b + delta * delta * n_a * frac_b
    return n, mean, m2


@triton.jit
def split_range(pid, per_split, size):
    """[start, end) of this program's share of one dimension."""
    start = pid * per_split
    end = tl.minimum(start + per_split, size)
    return start, end


@triton.jit
def load_channel(ptr, cols, cmask, ACC_DTYPE: tl.constexpr):
    """A per-channel vector [BLOCK_C] in the accumulation dtype."""
    return tl.load(ptr + cols, mask=cmask, other=0.0).to(ACC_DTYPE)


@triton.jit
def combine_double(hi, lo, ACC_DTYPE: tl.constexpr):
    """A float64 scalar (momentum, eps, the count m) passed as two float32
    halves (Triton passes Python floats as fp32); in fp32 this is just hi."""
    return tl.cast(hi, ACC_DTYPE) + tl.cast(lo, ACC_DTYPE)


@triton.jit
def tile_statistics(x, mask, ACC_DTYPE: tl.constexpr):
    """Exact two-pass statistics of each channel of a tile: (count, mean, x -
    mean (0 where masked), m2) with count, mean and m2 [BLOCK_C]; an empty
    channel gives zeros."""
    count = tl.sum(tl.sum(mask.to(ACC_DTYPE), 2), 0)
    mean = tl.sum(tl.sum(x, 2), 0) / tl.maximum(count, 1.0)
    xmu = tl.where(mask, x - mean[None, :, None], 0.0)
    return count, mean, xmu, tl.sum(tl.sum(xmu * xmu, 2), 0)


@triton.jit
def store_channel_stats(
    SaveMean, SaveInvstd, RunningMean, RunningVar, NumBatchesTracked,
    cols, smask, count, mean, m2,
    momentum_hi, momentum_lo, eps_hi, eps_lo,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE_AVERAGE: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """From a channel's merged (count, mean, m2): var = m2 / count and invstd =
    1 / sqrt(var + eps); write save_mean / save_invstd and apply the
    running-stat update. Returns invstd.

    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * var * count / (count - 1)
    With CUMULATIVE_AVERAGE (momentum=None) momentum = 1 / num_batches_tracked,
    read on the device so a compiled graph never turns it into a Python float.
    Called by exactly one program per channel block; smask masks its channels.
    """
    var = m2 / tl.maximum(count, 1.0)
    invstd = 1.0 / tl.sqrt(var + combine_double(eps_hi, eps_lo, ACC_DTYPE))
    tl.store(SaveMean + cols, mean, mask=smask)
    tl.store(SaveInvstd + cols, invstd, mask=smask)
    if UPDATE_RUNNING:
        if CUMULATIVE_AVERAGE:
            momentum = 1.0 / tl.load(NumBatchesTracked).to(ACC_DTYPE)
        else:
            momentum = combine_double(momentum_hi, momentum_lo, ACC_DTYPE)
        unbiased_var = var * count / tl.maximum(count - 1.0, 1.0)
        running_mean = tl.load(RunningMean + cols, mask=smask, other=0.0).to(ACC_DTYPE)
        running_var = tl.load(RunningVar + cols, mask=smask, other=0.0).to(ACC_DTYPE)
        running_mean = (1.0 - momentum) * running_mean + momentum * mean
        running_var = (1.0 - momentum) * running_var + momentum * unbiased_var
        tl.store(RunningMean + cols, running_mean.to(RunningMean.dtype.element_ty), mask=smask)
        tl.store(RunningVar + cols, running_var.to(RunningVar.dtype.element_ty), mask=smask)
    return invstd
