"""Inference-mode BatchNorm forward, folded into one affine pass:

    invstd = 1 / sqrt(running_var + eps)
    scale  = weight * invstd,   shift = bias - running_mean * scale
    y      = x * scale + shift          (one FMA per element)

Two kernels. bn_inference_flat_kernel (below; regime "flat", the default)
reads the tensor as rows of contiguous values, whatever S is.
bn_inference_kernel (regime "split") tiles the canonical (N, C, S) view
(kernels/common.py) on grid (cdiv(C, BLOCK_C), SPLIT_N, SPLIT_S), for
tensors that are not such rows (a strided channel slice, say). Each program
folds its own channels' scale / shift (C is tiny next to N * S, so
recomputing it per program is free and saves a launch), then streams its
share: 1 read, 1 write. With STORE_STATS the split-0
program of each channel block also writes save_mean = running_mean and
save_invstd, which the eval-mode backward (dx = g * scale) reuses; a call
that needs no gradient skips them.

The folded form rounds x * scale once, so when |running_mean| >> sqrt(running_var)
it carries an absolute error of about eps_fp * |running_mean| * |scale|, as
PyTorch's own folded CPU kernel does.
"""
import triton
import triton.language as tl

from .common import combine_double, epilogue, load_channel, split_range, tile_offsets


@triton.jit
def fold(RunningMean, RunningVar, Weight, Bias, cols, cmask, eps_hi, eps_lo,
         HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(mean, invstd, scale, shift) [len(cols)] of channels `cols` from the
    running statistics: the folded affine y = x * scale + shift."""
    mean = load_channel(RunningMean, cols, cmask, ACC_DTYPE)
    var = load_channel(RunningVar, cols, cmask, ACC_DTYPE)
    invstd = 1.0 / tl.sqrt(var + combine_double(eps_hi, eps_lo, ACC_DTYPE))
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * load_channel(Weight, cols, cmask, ACC_DTYPE)
    shift = -mean * scale
    if HAS_BIAS:
        shift = shift + load_channel(Bias, cols, cmask, ACC_DTYPE)
    return mean, invstd, scale, shift


@triton.jit
def bn_inference_kernel(
    X, Y,                       # (N, C, S) input and output
    R,                          # (N, C, S) residual, when HAS_RESIDUAL
    Weight, Bias,               # [C] or dummies
    RunningMean, RunningVar,    # [C]
    SaveMean, SaveInvstd,       # [C] ACC_DTYPE outputs
    N, C, S,
    stride_xn, stride_xc, stride_xs,
    stride_yn, stride_yc, stride_ys,
    stride_rn, stride_rc, stride_rs,
    n_per_split, s_per_split,
    eps_hi, eps_lo,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, STORE_STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C

    mean, invstd, scale, shift = fold(RunningMean, RunningVar, Weight, Bias, cols, cmask, eps_hi, eps_lo,
                                      HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
    if STORE_STATS:
        if (pid_n == 0) & (pid_s == 0):  # one writer per channel
            tl.store(SaveMean + cols, mean, mask=cmask)
            tl.store(SaveInvstd + cols, invstd, mask=cmask)
    scale = scale[None, :, None]
    shift = shift[None, :, None]

    n_start, n_end = split_range(pid_n, n_per_split, N)
    s_start, s_end = split_range(pid_s, s_per_split, S)
    for n0 in range(n_start, n_end, BLOCK_N):
        for s0 in range(s_start, s_end, BLOCK_S):
            offs, mask = tile_offsets(n0, s0, cols, cmask, N, S, stride_xn, stride_xc, stride_xs,
                                      BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
            x = tl.load(X + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            y_offs, _ = tile_offsets(n0, s0, cols, cmask, N, S, stride_yn, stride_yc, stride_ys,
                                     BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
            y = epilogue(x * scale + shift, R, n0, s0, cols, cmask, mask, N, S,
                         stride_rn, stride_rc, stride_rs, HAS_RESIDUAL, RELU,
                         BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC, ACC_DTYPE)
            tl.store(Y + y_offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def bn_inference_flat_kernel(
    X, Y,                       # rows of L contiguous values (see below)
    R,                          # residual laid out as X, when HAS_RESIDUAL
    Weight, Bias,               # [C] or dummies
    RunningMean, RunningVar,    # [C]
    SaveMean, SaveInvstd,       # [C] ACC_DTYPE outputs
    rows, L, C, S,
    stride_xr, stride_yr, stride_rr,
    rows_per_split,
    eps_hi, eps_lo,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, STORE_STATS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, CHANNELS: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """The folded affine pass over the tensor as rows of L contiguous values,
    indexed flat: every lane busy and every row start aligned wherever the
    row stride allows, whatever S is.

    - channel-strided (NCHW, NCDHW, NCL): a row is one sample's C * S values
      (rows = N); position f belongs to channel f // S.
    - channel-inner (channels_last, (N, C)): a row is one pixel's C values
      (rows = N * S); position f is channel f.

    Grid (cdiv(L, BLOCK_F), splits): program (j, i) takes positions
    [j * BLOCK_F, (j + 1) * BLOCK_F) of rows [i * rows_per_split, ...).
    It folds scale and shift once, for the CHANNELS channels its positions
    touch (channel-strided: a [CHANNELS] vector spread to the positions with
    tl.gather, so the per-channel values are read once per program, not once
    per position), then streams its rows: 1 read, 1 write. With STORE_STATS
    the row-0 programs write save_mean and save_invstd of the channels that
    start in their positions, each channel exactly once.
    """
    pid_f = tl.program_id(0)
    pid_r = tl.program_id(1)
    if INT64:
        pid_f = pid_f.to(tl.int64)
    f0 = pid_f * BLOCK_F
    f = f0 + tl.arange(0, BLOCK_F)
    fmask = f < L
    if CHANNEL_INNER:
        cols = f
        cmask = fmask
        first = cmask
    else:
        c0 = f0 // S
        cols = c0 + tl.arange(0, CHANNELS)
        cmask = cols < C
        first = cmask & (cols * S >= f0) & (cols * S < f0 + BLOCK_F)

    mean, invstd, scale, shift = fold(RunningMean, RunningVar, Weight, Bias, cols, cmask, eps_hi, eps_lo,
                                      HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
    if STORE_STATS:
        if pid_r == 0:  # one writer per channel
            tl.store(SaveMean + cols, mean, mask=first)
            tl.store(SaveInvstd + cols, invstd, mask=first)
    if not CHANNEL_INNER:
        # each position's channel, relative to the program's first one
        local = tl.minimum(f // S - c0, CHANNELS - 1)
        scale = tl.gather(scale, local, 0)
        shift = tl.gather(shift, local, 0)
    scale = scale[None, :]
    shift = shift[None, :]

    r_start, r_end = split_range(pid_r, rows_per_split, rows)
    for r0 in range(r_start, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < rows)[:, None] & fmask[None, :]
        if INT64:
            r = r.to(tl.int64)
        x = tl.load(X + (r * stride_xr)[:, None] + f[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        y = x * scale + shift
        if HAS_RESIDUAL:
            y = y + tl.load(R + (r * stride_rr)[:, None] + f[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)
        tl.store(Y + (r * stride_yr)[:, None] + f[None, :], y.to(Y.dtype.element_ty), mask=mask)
