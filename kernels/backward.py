"""BatchNorm backward over the canonical (N, C, S) view (see kernels/common.py).

With g = dy, xhat = (x - mean) * invstd, scale = weight * invstd (invstd when
there is no weight) and m = N * S values per channel:

    dbias   = sum g
    dweight = sum g * xhat
    training:  dx = scale * (g - dbias / m - xhat * dweight / m)
    eval:      dx = scale * g      (mean / invstd come from the running stats)

xhat is recomputed from x and the saved per-channel mean / invstd; nothing of
size N * C * S is saved by the forward. After a fused ReLU g is dy where the
forward's output y > 0 and 0 elsewhere, never from a stored pre-activation:

- RELU_FROM_X (training, ReLU without residual): the mask is recomputed from
  x, which is read anyway, with weight and bias (common.relu_mask_from_x);
  the backward moves no more bytes than an unfused one.
- RELU: the mask is read from y (common.load_grad), one more read per pass;
  for eval mode, and after a residual, whose gradient is that same g (DR).

resident  grid (cdiv(C, BLOCK_C),): x and dy of a channel block in registers,
          reduce, then dx. 2 reads, 1 write.
split     2 launches. ``bn_bwd_sums_kernel``, grid (cdiv(C, BLOCK_C),
          SPLIT_N, SPLIT_S), writes per-(split, channel) partial sums; the
          last program of a channel block to arrive at its counter (REDUCE;
          nobody waits) adds the block's up once, in a fixed order (bitwise
          reproducible), and writes dweight / dbias and the totals dx
          needs; ``bn_bwd_dx_kernel``, the sums kernel's grid, writes dx for
          each program's share. 4 reads, 1 write. Eval mode without
          weight/bias gradients skips the sums entirely.
          ``bn_bwd_reduce_kernel`` is the same reduction as a launch of its
          own (the tests' reference for the in-kernel one).
cooperative  ``bn_bwd_coop_kernel``, grid (GROUP, groups): a channel block's
          x and dy held by GROUP programs that exchange partial sums, as
          forward.bn_fwd_coop_kernel does (PHASE 0 on a GPU, shares handed
          to the merger after a long wait; 1 then 2 under the interpreter).
          2 reads, 1 write, 1 launch.
"""
import triton
import triton.language as tl

from .common import (
    affine, combine_double, load_channel, load_grad, relu_mask_from_x, saved_affine, split_range, tile_offsets,
)
from .cooperative import HANDED_OVER, arrive, claim_shares, depart, raise_flag, reset_arrivals, wait_or_hand_over


@triton.jit
def bn_bwd_sums_kernel(
    X, DY,          # (N, C, S) input and output gradient
    Y,              # (N, C, S) the forward's output, read when RELU
    Weight, Bias,   # [C] or dummies, read when RELU_FROM_X
    Mean, Invstd,   # [C] saved by the forward
    Partials,       # [2, P, C] sum g, sum g * xhat per (split, channel); row 0 receives the totals (STORE_SUMS)
    DWeight, DBias,  # [C] outputs, or dummies, when REDUCE
    Counters,       # int32 [cdiv(C, BLOCK_C)], zero at launch and left at zero, when REDUCE
    N, C, S,
    stride_xn, stride_xc, stride_xs,
    stride_gn, stride_gc, stride_gs,
    stride_yn, stride_yc, stride_ys,
    n_per_split, s_per_split,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr, RELU_FROM_X: tl.constexpr,
    REDUCE: tl.constexpr, STORE_DWEIGHT: tl.constexpr, STORE_DBIAS: tl.constexpr, STORE_SUMS: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Each program's partial sums of its share of its channels. REDUCE: the
    last program of a channel block to arrive at its counter (the others do
    not wait) sets the counter back to zero and sums the block's partials as
    bn_bwd_reduce_kernel does (same order, same results): dweight / dbias,
    and with STORE_SUMS the totals over partial row 0 for bn_bwd_dx_kernel."""
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    num_splits = tl.num_programs(1) * tl.num_programs(2)
    split = pid_n * tl.num_programs(2) + pid_s
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = load_channel(Mean, cols, cmask, ACC_DTYPE)[None, :, None]
    if RELU_FROM_X:
        invstd = load_channel(Invstd, cols, cmask, ACC_DTYPE)
        scale, bias = affine(invstd, Weight, Bias, cols, cmask, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)

    acc_g = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], ACC_DTYPE)
    acc_g_xmu = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], ACC_DTYPE)
    n_start, n_end = split_range(pid_n, n_per_split, N)
    s_start, s_end = split_range(pid_s, s_per_split, S)
    for n0 in range(n_start, n_end, BLOCK_N):
        for s0 in range(s_start, s_end, BLOCK_S):
            offs, mask = tile_offsets(n0, s0, cols, cmask, N, S, stride_xn, stride_xc, stride_xs,
                                      BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
            x = tl.load(X + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            g = load_grad(DY, Y, n0, s0, cols, cmask, mask, N, S, stride_gn, stride_gc, stride_gs,
                          stride_yn, stride_yc, stride_ys, RELU,
                          BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC, ACC_DTYPE)
            if RELU_FROM_X:
                g = tl.where(relu_mask_from_x(x, mean, scale[None, :, None], bias[None, :, None],
                                              X.dtype.element_ty), g, 0.0)
            acc_g += g
            acc_g_xmu += g * tl.where(mask, x - mean, 0.0)
    sum_g = tl.sum(tl.sum(acc_g, 2), 0)
    sum_g_xhat = tl.sum(tl.sum(acc_g_xmu, 2), 0) * load_channel(Invstd, cols, cmask, ACC_DTYPE)

    base = split * C + cols
    tl.store(Partials + base, sum_g, mask=cmask)
    tl.store(Partials + num_splits * C + base, sum_g_xhat, mask=cmask)
    if REDUCE:
        if arrive(Counters + pid_c) == num_splits - 1:
            reset_arrivals(Counters + pid_c)
            # the other programs' partials: from L2, never a stale L1 line
            sum_g, sum_g_xhat = sum_partials(Partials, num_splits, C, cols, cmask, SPLIT_BLOCK, BLOCK_C, ".cg")
            store_sums(DWeight, DBias, Partials, num_splits * C, cols, cmask, sum_g, sum_g_xhat,
                       STORE_DWEIGHT, STORE_DBIAS, STORE_SUMS)


@triton.jit
def sum_partials(Partials, num_splits, C, cols, cmask,
                 SPLIT_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, CACHE: tl.constexpr):
    """(sum g, sum g * xhat) [BLOCK_C] over the [2, P, C] partials of channels
    `cols`, SPLIT_BLOCK rows at a time in a fixed order. CACHE: the loads'
    cache modifier (".cg" for partials other programs of this launch wrote)."""
    p = tl.arange(0, SPLIT_BLOCK)
    sum_g = tl.zeros([BLOCK_C], Partials.dtype.element_ty)
    sum_g_xhat = tl.zeros([BLOCK_C], Partials.dtype.element_ty)
    for p0 in range(0, num_splits, SPLIT_BLOCK):
        rows = p0 + p
        offs = rows[:, None] * C + cols[None, :]
        mask = (rows < num_splits)[:, None] & cmask[None, :]
        sum_g += tl.sum(tl.load(Partials + offs, mask=mask, other=0.0, cache_modifier=CACHE), 0)
        sum_g_xhat += tl.sum(tl.load(Partials + num_splits * C + offs, mask=mask, other=0.0,
                                     cache_modifier=CACHE), 0)
    return sum_g, sum_g_xhat


@triton.jit
def store_sums(DWeight, DBias, Sums, stride_sums, cols, cmask, sum_g, sum_g_xhat,
               STORE_DWEIGHT: tl.constexpr, STORE_DBIAS: tl.constexpr, STORE_SUMS: tl.constexpr):
    """A channel block's totals: dweight = sum g * xhat, dbias = sum g, and with
    STORE_SUMS the two totals dx needs (rows stride_sums apart at Sums)."""
    if STORE_DWEIGHT:
        tl.store(DWeight + cols, sum_g_xhat.to(DWeight.dtype.element_ty), mask=cmask)
    if STORE_DBIAS:
        tl.store(DBias + cols, sum_g.to(DBias.dtype.element_ty), mask=cmask)
    if STORE_SUMS:
        tl.store(Sums + cols, sum_g, mask=cmask)
        tl.store(Sums + stride_sums + cols, sum_g_xhat, mask=cmask)


@triton.jit
def dx_coefficients(Sums, stride_sums, cols, cmask, scale, invstd, count,
                    CACHE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(g_shift, xmu_coef) [1, BLOCK_C, 1] of the training
    dx = scale * (g - g_shift) - (x - mean) * xmu_coef, from the totals
    (sum g, sum g * xhat) at Sums (rows stride_sums apart): g_shift = sum g / m,
    xmu_coef = scale * invstd * sum g * xhat / m, m = count. CACHE: the loads'
    cache modifier (".cg" for totals another program of this launch wrote)."""
    inv_count = 1.0 / tl.cast(count, ACC_DTYPE)
    sum_g = tl.load(Sums + cols, mask=cmask, other=0.0, cache_modifier=CACHE).to(ACC_DTYPE)
    sum_g_xhat = tl.load(Sums + stride_sums + cols, mask=cmask, other=0.0, cache_modifier=CACHE).to(ACC_DTYPE)
    return (sum_g * inv_count)[None, :, None], (scale * invstd * sum_g_xhat * inv_count)[None, :, None]


@triton.jit
def bn_bwd_reduce_kernel(
    Partials,           # [2, P, C] from bn_bwd_sums_kernel; row 0 receives the totals (STORE_SUMS)
    DWeight, DBias,     # [C] outputs, or dummies
    C, num_splits,
    STORE_DWEIGHT: tl.constexpr, STORE_DBIAS: tl.constexpr, STORE_SUMS: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sum the partials of channels `cols` once, SPLIT_BLOCK rows at a time in a
    fixed order: dbias = sum g, dweight = sum g * xhat, and with STORE_SUMS the
    two totals over partial row 0 for bn_bwd_dx_kernel (each program overwrites
    only its own channels, after reading them)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sum_g, sum_g_xhat = sum_partials(Partials, num_splits, C, cols, cmask, SPLIT_BLOCK, BLOCK_C, "")
    store_sums(DWeight, DBias, Partials, num_splits * C, cols, cmask, sum_g, sum_g_xhat,
               STORE_DWEIGHT, STORE_DBIAS, STORE_SUMS)


@triton.jit
def bn_bwd_dx_kernel(
    X, DY, DX,          # (N, C, S) input, output gradient, input gradient
    Y,                  # (N, C, S) the forward's output, read when RELU
    DR,                 # (N, C, S) residual gradient, strides of DX, when STORE_DRESIDUAL
    Sums,               # [2, C] sum g, sum g * xhat (rows stride_sums apart), read when TRAINING
    Weight,             # [C] or dummy
    Bias,               # [C] or dummy, read when RELU_FROM_X
    Mean, Invstd,       # [C] saved by the forward
    N, C, S,
    stride_xn, stride_xc, stride_xs,
    stride_gn, stride_gc, stride_gs,
    stride_dxn, stride_dxc, stride_dxs,
    stride_yn, stride_yc, stride_ys,
    n_per_split, s_per_split,
    stride_sums,
    count_hi, count_lo,  # what the sums are divided by: m = N * S, as two float32 halves (exact in float64)
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, TRAINING: tl.constexpr, COMPUTE_DX: tl.constexpr,
    RELU: tl.constexpr, RELU_FROM_X: tl.constexpr, STORE_DRESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, invstd, scale, bias = saved_affine(Mean, Invstd, Weight, Bias, cols, cmask,
                                             HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)

    if TRAINING:
        count = combine_double(count_hi, count_lo, ACC_DTYPE)
        g_shift, xmu_coef = dx_coefficients(Sums, stride_sums, cols, cmask, scale, invstd, count, "", ACC_DTYPE)
    mean = mean[None, :, None]
    scale = scale[None, :, None]
    bias = bias[None, :, None]
    n_start, n_end = split_range(pid_n, n_per_split, N)
    s_start, s_end = split_range(pid_s, s_per_split, S)
    for n0 in range(n_start, n_end, BLOCK_N):
        for s0 in range(s_start, s_end, BLOCK_S):
            _, mask = tile_offsets(n0, s0, cols, cmask, N, S, stride_gn, stride_gc, stride_gs,
                                   BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
            g = load_grad(DY, Y, n0, s0, cols, cmask, mask, N, S, stride_gn, stride_gc, stride_gs,
                          stride_yn, stride_yc, stride_ys, RELU,
                          BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC, ACC_DTYPE)
            dx_offs, _ = tile_offsets(n0, s0, cols, cmask, N, S, stride_dxn, stride_dxc, stride_dxs,
                                      BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
            if STORE_DRESIDUAL:  # never with RELU_FROM_X: a residual's mask is read from y
                tl.store(DR + dx_offs, g.to(DR.dtype.element_ty), mask=mask)
            if COMPUTE_DX:
                if TRAINING:
                    offs, _ = tile_offsets(n0, s0, cols, cmask, N, S, stride_xn, stride_xc, stride_xs,
                                           BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
                    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC_DTYPE)
                    if RELU_FROM_X:
                        g = tl.where(relu_mask_from_x(x, mean, scale, bias, X.dtype.element_ty), g, 0.0)
                    dx = scale * (g - g_shift) - (x - mean) * xmu_coef
                else:
                    dx = scale * g
                tl.store(DX + dx_offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def bn_bwd_resident_kernel(
    X, DY, DX,          # (N, C, S) input, output gradient, input gradient
    Y, DR,              # the forward's output (RELU), residual gradient (STORE_DRESIDUAL)
    Weight, Bias,       # [C] or dummies; Bias read when RELU_FROM_X
    Mean, Invstd,
    DWeight, DBias,
    N, C, S,
    stride_xn, stride_xc, stride_xs,
    stride_gn, stride_gc, stride_gs,
    stride_dxn, stride_dxc, stride_dxs,
    stride_yn, stride_yc, stride_ys,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, TRAINING: tl.constexpr,
    STORE_DWEIGHT: tl.constexpr, STORE_DBIAS: tl.constexpr, COMPUTE_DX: tl.constexpr,
    RELU: tl.constexpr, RELU_FROM_X: tl.constexpr, STORE_DRESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid_c = tl.program_id(0)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    offs, mask = tile_offsets(0, 0, cols, cmask, N, S, stride_xn, stride_xc, stride_xs,
                              BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    g = load_grad(DY, Y, 0, 0, cols, cmask, mask, N, S, stride_gn, stride_gc, stride_gs,
                  stride_yn, stride_yc, stride_ys, RELU, BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC, ACC_DTYPE)
    mean, invstd, scale, bias = saved_affine(Mean, Invstd, Weight, Bias, cols, cmask,
                                             HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
    if RELU_FROM_X:
        g = tl.where(relu_mask_from_x(x, mean[None, :, None], scale[None, :, None], bias[None, :, None],
                                      X.dtype.element_ty), g, 0.0)
    dx_offs, _ = tile_offsets(0, 0, cols, cmask, N, S, stride_dxn, stride_dxc, stride_dxs,
                              BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
    if STORE_DRESIDUAL:
        tl.store(DR + dx_offs, g.to(DR.dtype.element_ty), mask=mask)
    xhat = tl.where(mask, x - mean[None, :, None], 0.0) * invstd[None, :, None]
    sum_g = tl.sum(tl.sum(g, 2), 0)
    sum_g_xhat = tl.sum(tl.sum(g * xhat, 2), 0)
    if STORE_DWEIGHT:
        tl.store(DWeight + cols, sum_g_xhat.to(DWeight.dtype.element_ty), mask=cmask)
    if STORE_DBIAS:
        tl.store(DBias + cols, sum_g.to(DBias.dtype.element_ty), mask=cmask)

    if COMPUTE_DX:
        if TRAINING:
            count = tl.maximum(tl.sum(tl.sum(mask.to(ACC_DTYPE), 2), 0), 1.0)
            dx = (g - (sum_g / count)[None, :, None] - xhat * (sum_g_xhat / count)[None, :, None])
            dx = dx * scale[None, :, None]
        else:
            dx = g * scale[None, :, None]
        tl.store(DX + dx_offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _share_inputs(
    X, DY, Y, Mean, n0, s0, cols, cmask, mean, scale, bias, N, S,
    stride_xn, stride_xc, stride_xs,
    stride_gn, stride_gc, stride_gs,
    stride_yn, stride_yc, stride_ys,
    NEED_X: tl.constexpr, RELU: tl.constexpr, RELU_FROM_X: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """(mask, g, x - mean) of the cooperative share at (n0, s0): g after the
    fused ReLU's mask, x - mean 0 where masked (g itself where x is not read)."""
    offs, mask = tile_offsets(n0, s0, cols, cmask, N, S, stride_xn, stride_xc, stride_xs,
                              BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
    g = load_grad(DY, Y, n0, s0, cols, cmask, mask, N, S, stride_gn, stride_gc, stride_gs,
                  stride_yn, stride_yc, stride_ys, RELU, BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC, ACC_DTYPE)
    xmu = g
    if NEED_X:
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        if RELU_FROM_X:
            g = tl.where(relu_mask_from_x(x, mean[None, :, None], scale[None, :, None], bias[None, :, None],
                                          X.dtype.element_ty), g, 0.0)
        xmu = tl.where(mask, x - mean[None, :, None], 0.0)
    return mask, g, xmu


@triton.jit
def _gradients_of_share(
    g, xmu, DX, DR, Totals, n0, s0, cols, cmask, mask, scale, invstd, count, N, S, C,
    stride_dxn, stride_dxc, stride_dxs,
    TRAINING: tl.constexpr, COMPUTE_DX: tl.constexpr, STORE_DRESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """dx (and the residual's gradient) of the cooperative share at (n0, s0),
    training with the totals the channel block's merger wrote (read from L2)."""
    dx_offs, _ = tile_offsets(n0, s0, cols, cmask, N, S, stride_dxn, stride_dxc, stride_dxs,
                              BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
    if STORE_DRESIDUAL:  # never with RELU_FROM_X: a residual's mask is read from y
        tl.store(DR + dx_offs, g.to(DR.dtype.element_ty), mask=mask)
    if COMPUTE_DX:
        if TRAINING:
            g_shift, xmu_coef = dx_coefficients(Totals, C, cols, cmask, scale, invstd, count, ".cg", ACC_DTYPE)
            dx = scale[None, :, None] * (g - g_shift) - xmu * xmu_coef
        else:
            dx = scale[None, :, None] * g
        tl.store(DX + dx_offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _finish_shares(
    Shares, X, DY, DX, Y, DR, Mean, Totals, cols, cmask, mean, scale, bias, invstd, count, s_parts, N, S, C,
    stride_xn, stride_xc, stride_xs,
    stride_gn, stride_gc, stride_gs,
    stride_dxn, stride_dxc, stride_dxs,
    stride_yn, stride_yc, stride_ys,
    TRAINING: tl.constexpr, COMPUTE_DX: tl.constexpr, STORE_DRESIDUAL: tl.constexpr, NEED_X: tl.constexpr,
    RELU: tl.constexpr, RELU_FROM_X: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    PIECE_N: tl.constexpr, PIECE_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """The merger's part of a hand-over: the gradients of every share handed
    over to it (Shares[m] == HANDED_OVER), reading its x and dy again
    [PIECE_N, BLOCK_C, PIECE_S] at a time (few registers on a rarely taken
    path)."""
    for other in range(GROUP):
        if tl.load(Shares + other, cache_modifier=".cg") == HANDED_OVER:
            for piece in range((BLOCK_N // PIECE_N) * (BLOCK_S // PIECE_S)):
                n = other // s_parts * BLOCK_N + piece // (BLOCK_S // PIECE_S) * PIECE_N
                s = other % s_parts * BLOCK_S + piece % (BLOCK_S // PIECE_S) * PIECE_S
                mask, g, xmu = _share_inputs(X, DY, Y, Mean, n, s, cols, cmask, mean, scale, bias, N, S,
                                             stride_xn, stride_xc, stride_xs, stride_gn, stride_gc, stride_gs,
                                             stride_yn, stride_yc, stride_ys, NEED_X, RELU, RELU_FROM_X,
                                             PIECE_N, PIECE_S, CHANNEL_INNER, INT64, VEC, ACC_DTYPE)
                _gradients_of_share(g, xmu, DX, DR, Totals, n, s, cols, cmask, mask, scale, invstd, count, N, S, C,
                                    stride_dxn, stride_dxc, stride_dxs, TRAINING, COMPUTE_DX, STORE_DRESIDUAL,
                                    PIECE_N, PIECE_S, CHANNEL_INNER, INT64, VEC, ACC_DTYPE)


@triton.jit
def bn_bwd_coop_kernel(
    X, DY, DX, Y, DR, Weight, Bias, Mean, Invstd, DWeight, DBias,  # as in bn_bwd_resident_kernel
    Partials,           # [2, GROUP, C] sum g, sum g * xhat of each program's share of a channel
    Totals,             # [2, C] their sums, written by each channel block's last program
    Flags,              # int32 zeros, left zero: [3, blocks] arrivals, "summed", departures;
                        # [blocks, GROUP] share states
    N, C, S,
    s_parts,            # programs along S per channel block: GROUP = cdiv(N, BLOCK_N) * s_parts
    stride_xn, stride_xc, stride_xs,
    stride_gn, stride_gc, stride_gs,
    stride_dxn, stride_dxc, stride_dxs,
    stride_yn, stride_yc, stride_ys,
    count_hi, count_lo,  # m = N * S, as two float32 halves (exact in float64)
    wait_limit,         # the wait for the summed flag before a share is handed to the merger:
                        # ns (TIMED_WAIT) or polls
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, TRAINING: tl.constexpr,
    STORE_DWEIGHT: tl.constexpr, STORE_DBIAS: tl.constexpr, COMPUTE_DX: tl.constexpr,
    RELU: tl.constexpr, RELU_FROM_X: tl.constexpr, STORE_DRESIDUAL: tl.constexpr,
    GROUP: tl.constexpr, MEMBERS: tl.constexpr, PHASE: tl.constexpr, TIMED_WAIT: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    PIECE_N: tl.constexpr, PIECE_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Program (member, group) holds tile (member // s_parts, member % s_parts)
    of the [N, S] plane of each channel block group, group + groups, ... PHASE 0: all of it (GPU); 1: the
    partial sums and their total only; 2: the elementwise gradients only.
    In eval mode (whose dx reads no totals) it only runs PHASE 0 and no
    program waits: the last to arrive sums dweight / dbias, if asked for.
    In training the merger also finishes the shares handed over to it
    (kernels/cooperative.py: wait_or_hand_over), reading their x and dy again,
    [PIECE_N, BLOCK_C, PIECE_S] at a time."""
    HAS_SUMS: tl.constexpr = TRAINING or STORE_DWEIGHT or STORE_DBIAS
    WAITS: tl.constexpr = TRAINING and PHASE == 0  # the members' dx needs the totals the merger writes
    NEED_X: tl.constexpr = HAS_SUMS or RELU_FROM_X
    member = tl.program_id(0)
    num_blocks = tl.cdiv(C, BLOCK_C)
    n0 = member // s_parts * BLOCK_N
    s0 = member % s_parts * BLOCK_S
    count = combine_double(count_hi, count_lo, ACC_DTYPE)
    for block in range(tl.program_id(1), num_blocks, tl.num_programs(1)):
        cols = block * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        shares = Flags + 3 * num_blocks + block * GROUP
        mean, invstd, scale, bias = saved_affine(Mean, Invstd, Weight, Bias, cols, cmask,
                                                 HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
        mask, g, xmu = _share_inputs(X, DY, Y, Mean, n0, s0, cols, cmask, mean, scale, bias, N, S,
                                     stride_xn, stride_xc, stride_xs, stride_gn, stride_gc, stride_gs,
                                     stride_yn, stride_yc, stride_ys, NEED_X, RELU, RELU_FROM_X,
                                     BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC, ACC_DTYPE)
        if HAS_SUMS and PHASE != 2:
            base = member * C + cols
            tl.store(Partials + base, tl.sum(tl.sum(g, 2), 0), mask=cmask)
            tl.store(Partials + GROUP * C + base, tl.sum(tl.sum(g * xmu, 2), 0) * invstd, mask=cmask)
            arrived = arrive(Flags + block)
            if arrived == GROUP - 1:
                reset_arrivals(Flags + block)
                sum_g, sum_g_xhat = sum_partials(Partials, GROUP, C, cols, cmask, SPLIT_BLOCK, BLOCK_C, ".cg")
                store_sums(DWeight, DBias, Totals, C, cols, cmask, sum_g, sum_g_xhat,
                           STORE_DWEIGHT, STORE_DBIAS, True)
                if WAITS:  # PHASE 2 reads the totals after a launch boundary
                    raise_flag(Flags + num_blocks + block)
        go = True
        if WAITS:
            go = arrived == GROUP - 1
            if arrived != GROUP - 1:
                go = wait_or_hand_over(Flags + num_blocks + block, shares + member, wait_limit, TIMED_WAIT)
        if PHASE != 1:
            if go:
                _gradients_of_share(g, xmu, DX, DR, Totals, n0, s0, cols, cmask, mask, scale, invstd, count,
                                    N, S, C, stride_dxn, stride_dxc, stride_dxs, TRAINING, COMPUTE_DX,
                                    STORE_DRESIDUAL, BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC, ACC_DTYPE)
        if WAITS:
            if arrived == GROUP - 1:
                if claim_shares(shares, member, GROUP, MEMBERS) > 0:
                    _finish_shares(shares, X, DY, DX, Y, DR, Mean, Totals, cols, cmask, mean, scale, bias, invstd,
                                   count, s_parts, N, S, C, stride_xn, stride_xc, stride_xs,
                                   stride_gn, stride_gc, stride_gs, stride_dxn, stride_dxc, stride_dxs,
                                   stride_yn, stride_yc, stride_ys, TRAINING, COMPUTE_DX, STORE_DRESIDUAL, NEED_X,
                                   RELU, RELU_FROM_X, GROUP, BLOCK_N, BLOCK_S, PIECE_N, PIECE_S, CHANNEL_INNER,
                                   INT64, VEC, ACC_DTYPE)
            depart(Flags + 2 * num_blocks + block, Flags + num_blocks + block, shares, GROUP)
