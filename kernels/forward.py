"""Training-mode BatchNorm forward: per-channel batch statistics, then
y = (x - mean) * scale + bias with scale = weight * invstd; the fused variants
add a residual and / or apply ReLU to y before storing it (common.epilogue).

Two regimes over the canonical (N, C, S) view (see kernels/common.py), with
m = N * S values per channel:

resident  grid (cdiv(C, BLOCK_C),). A program holds its channels' m values in
          registers (BLOCK_N >= N, BLOCK_S >= S): exact two-pass mean and
          variance on-chip, normalize, write. 1 read, 1 write, 1 launch.
          Limit: the whole channel block must fit one tile.
cooperative  ``bn_fwd_coop_kernel``, grid (GROUP, groups): a channel block's
          slab held by GROUP programs, BLOCK_N images each (BLOCK_S >= S),
          that exchange Welford partials (cooperative.arrive /
          wait_or_hand_over); a persistent grid of at most one program per
          SM, each group taking channel blocks in turn. 1 read, 1 write, 1
          launch. A program that waits too long hands its share to the
          merger, which reads it again (no wait can last forever). Under the
          interpreter (programs run one after another) the launcher runs it
          in two launches, PHASE 1 (partials, merge) then PHASE 2 (normalize,
          reading x again); on a GPU PHASE 0 does both with x kept on chip.
split     2 launches. ``bn_fwd_stats_kernel``, grid (cdiv(C, BLOCK_C),
          SPLIT_N, SPLIT_S): one Welford partial (count, mean, m2) per
          (split, channel) in the accumulation dtype; each program then
          counts itself in at its channel block's counter (MERGE), and the
          last to arrive -- nobody waits -- resets the counter, merges the
          block's partials once, in a fixed order, writes save_mean /
          save_invstd and updates the running statistics.
          ``bn_fwd_normalize_kernel``, the stats kernel's grid: each program
          reads its channels' mean / invstd and normalizes its share. 2
          reads, 1 write; integer atomics only: bitwise reproducible.

SyncBatchNorm (tritonbn/distributed.py) runs the split kernels with the
partials of every process in between: ``bn_fwd_merge_kernel`` merges one
process's partials into the (count, mean, m2) it all-gathers, then the
gathered ones into the statistics ``bn_fwd_normalize_kernel`` reads.

Normalization keeps the (x - mean) form rather than the folded x * scale + shift:
x - mean is exact when both are close, which matters when |mean| >> std.
"""
import triton
import triton.language as tl

from .common import (
    affine, epilogue, saved_affine, split_range, store_channel_stats, tile_offsets, tile_statistics, welford_combine,
    welford_merge,
)
from .cooperative import HANDED_OVER, arrive, claim_shares, depart, raise_flag, reset_arrivals, wait_or_hand_over


@triton.jit
def welford_edge_tiles(
    X, count, mean, m2, n_lo, n_hi, s_lo, s_hi, cols, cmask, N, S,
    stride_xn, stride_xc, stride_xs,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Add the (partial) tiles of [n_lo, n_hi) x [s_lo, s_hi) to the per-channel
    Welford triple (count, mean, m2) [BLOCK_C]: each tile's exact two-pass
    statistics, Chan-combined. Few tiles take this path (a program's last
    along N and along S), so their cross-lane sums cost little."""
    for n0 in range(n_lo, n_hi, BLOCK_N):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask = tile_offsets(n0, s0, cols, cmask, N, S, stride_xn, stride_xc, stride_xs,
                                      BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
            x = tl.load(X + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            tile_count, tile_mean, _, tile_m2 = tile_statistics(x, mask, ACC_DTYPE)
            count, mean, m2 = welford_combine(count, mean, m2, tile_count, tile_mean, tile_m2)
    return count, mean, m2


# n_per_split is not specialized: divisible by 16, the sm_90 build spilled 16
# bytes (fp32, 8x1x256 tiles, VEC 4; bench.traffic); generic, it does not, for
# any split count. (s_per_split stays specialized: its divisibility keeps the
# tiles' starts along S aligned, hence the wide loads.)
@triton.jit(do_not_specialize=["n_per_split"])
def bn_fwd_stats_kernel(
    X,              # (N, C, S) input, strides (stride_xn, stride_xc, stride_xs)
    Partials,       # [3, P, C] count, mean, m2 per (split, channel); P = SPLIT_N * SPLIT_S
    SaveMean, SaveInvstd,       # [C] ACC_DTYPE outputs, when MERGE
    RunningMean, RunningVar, NumBatchesTracked,  # updated when MERGE and UPDATE_RUNNING
    Counters,       # int32 [cdiv(C, BLOCK_C)], zero at launch and left at zero, when MERGE
    N, C, S,
    stride_xn, stride_xc, stride_xs,
    n_per_split, s_per_split,   # multiples of BLOCK_N / BLOCK_S
    momentum_hi, momentum_lo, eps_hi, eps_lo,
    MERGE: tl.constexpr, UPDATE_RUNNING: tl.constexpr, CUMULATIVE_AVERAGE: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Each program's Welford partial of its share of its channels. MERGE: the
    last program of a channel block to arrive at its counter (the others do
    not wait) sets the counter back to zero, merges the block's partials as
    bn_fwd_merge_kernel does (same order, same results), writes save_mean /
    save_invstd and updates the running statistics."""
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    num_splits = tl.num_programs(1) * tl.num_programs(2)
    split = pid_n * tl.num_programs(2) + pid_s
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C

    n_start, n_end = split_range(pid_n, n_per_split, N)
    s_start, s_end = split_range(pid_s, s_per_split, S)
    # Only the last tile along N and along S can be partial. Full tiles come
    # first: every lane takes one value per tile, so all lanes share one count,
    # a scalar: the update multiplies by its reciprocal, once per tile, and no
    # per-lane count is kept or divided by.
    n_full = n_start + (n_end - n_start) // BLOCK_N * BLOCK_N
    s_full = s_start + (s_end - s_start) // BLOCK_S * BLOCK_S
    mean = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], ACC_DTYPE)
    m2 = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], ACC_DTYPE)
    taken = tl.cast(0.0, ACC_DTYPE)
    for n0 in range(n_start, n_full, BLOCK_N):
        for s0 in range(s_start, s_full, BLOCK_S):
            offs, mask = tile_offsets(n0, s0, cols, cmask, N, S, stride_xn, stride_xc, stride_xs,
                                      BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
            x = tl.load(X + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            taken += 1.0
            delta = x - mean
            mean += delta * (1.0 / taken)
            m2 += delta * (x - mean)
    count, mean, m2 = welford_merge(tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], ACC_DTYPE) + taken, mean, m2, 2)
    count, mean, m2 = welford_merge(count, mean, m2, 0)
    # the partial tiles: the last S tile of each full N row, then the last N tile
    count, mean, m2 = welford_edge_tiles(X, count, mean, m2, n_start, n_full, s_full, s_end, cols, cmask,
                                         N, S, stride_xn, stride_xc, stride_xs,
                                         BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC, ACC_DTYPE)
    count, mean, m2 = welford_edge_tiles(X, count, mean, m2, n_full, n_end, s_start, s_end, cols, cmask,
                                         N, S, stride_xn, stride_xc, stride_xs,
                                         BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC, ACC_DTYPE)

    base = split * C + cols
    tl.store(Partials + base, count, mask=cmask)
    tl.store(Partials + num_splits * C + base, mean, mask=cmask)
    tl.store(Partials + 2 * num_splits * C + base, m2, mask=cmask)
    if MERGE:
        if arrive(Counters + pid_c) == num_splits - 1:
            reset_arrivals(Counters + pid_c)
            # the other programs' partials: from L2, never a stale L1 line
            count, mean, m2 = merge_partials(Partials, num_splits, C, cols, cmask, SPLIT_BLOCK, BLOCK_C, ".cg")
            store_channel_stats(SaveMean, SaveInvstd, RunningMean, RunningVar, NumBatchesTracked,
                                cols, cmask, count, mean, m2, momentum_hi, momentum_lo, eps_hi, eps_lo,
                                UPDATE_RUNNING, CUMULATIVE_AVERAGE, ACC_DTYPE)


@triton.jit
def merge_partials(Partials, num_splits, C, cols, cmask,
                   SPLIT_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, CACHE: tl.constexpr):
    """Merge the [3, P, C] Welford partials of channels `cols`, SPLIT_BLOCK at a time,
    always in the same order. CACHE: the loads' cache modifier (".cg" for
    partials other programs of the same launch wrote)."""
    p = tl.arange(0, SPLIT_BLOCK)
    count = tl.zeros([BLOCK_C], Partials.dtype.element_ty)
    mean = tl.zeros([BLOCK_C], Partials.dtype.element_ty)
    m2 = tl.zeros([BLOCK_C], Partials.dtype.element_ty)
    for p0 in range(0, num_splits, SPLIT_BLOCK):
        rows = p0 + p
        offs = rows[:, None] * C + cols[None, :]
        mask = (rows < num_splits)[:, None] & cmask[None, :]
        part_count = tl.load(Partials + offs, mask=mask, other=0.0, cache_modifier=CACHE)
        part_mean = tl.load(Partials + num_splits * C + offs, mask=mask, other=0.0, cache_modifier=CACHE)
        part_m2 = tl.load(Partials + 2 * num_splits * C + offs, mask=mask, other=0.0, cache_modifier=CACHE)
        chunk_count, chunk_mean, chunk_m2 = welford_merge(part_count, part_mean, part_m2, 0)
        count, mean, m2 = welford_combine(count, mean, m2, chunk_count, chunk_mean, chunk_m2)
    return count, mean, m2


@triton.jit
def bn_fwd_normalize_kernel(
    X,                  # (N, C, S) input
    Y,                  # (N, C, S) output, strides (stride_yn, stride_yc, stride_ys)
    R,                  # (N, C, S) residual added before the ReLU, when HAS_RESIDUAL
    Weight, Bias,       # [C] or dummies (HAS_WEIGHT / HAS_BIAS)
    SaveMean, SaveInvstd,       # [C] ACC_DTYPE, written by bn_fwd_merge_kernel
    N, C, S,
    stride_xn, stride_xc, stride_xs,
    stride_yn, stride_yc, stride_ys,
    stride_rn, stride_rc, stride_rs,
    n_per_split, s_per_split,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C

    mean, invstd, scale, bias = saved_affine(SaveMean, SaveInvstd, Weight, Bias, cols, cmask,
                                             HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
    mean = mean[None, :, None]
    scale = scale[None, :, None]
    bias = bias[None, :, None]

    n_start, n_end = split_range(pid_n, n_per_split, N)
    s_start, s_end = split_range(pid_s, s_per_split, S)
    for n0 in range(n_start, n_end, BLOCK_N):
        for s0 in range(s_start, s_end, BLOCK_S):
            offs, mask = tile_offsets(n0, s0, cols, cmask, N, S, stride_xn, stride_xc, stride_xs,
                                      BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
            x = tl.load(X + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            y = epilogue(tl.fma(x - mean, scale, bias), R, n0, s0, cols, cmask, mask, N, S,
                         stride_rn, stride_rc, stride_rs, HAS_RESIDUAL, RELU,
                         BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC, ACC_DTYPE)
            y_offs, _ = tile_offsets(n0, s0, cols, cmask, N, S, stride_yn, stride_yc, stride_ys,
                                     BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
            tl.store(Y + y_offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def bn_fwd_resident_kernel(
    X, Y,               # (N, C, S) input and output
    R,                  # (N, C, S) residual, when HAS_RESIDUAL
    Weight, Bias,       # [C] or dummies
    RunningMean, RunningVar, NumBatchesTracked,
    SaveMean, SaveInvstd,
    N, C, S,
    stride_xn, stride_xc, stride_xs,
    stride_yn, stride_yc, stride_ys,
    stride_rn, stride_rc, stride_rs,
    momentum_hi, momentum_lo, eps_hi, eps_lo,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE_AVERAGE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid_c = tl.program_id(0)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    offs, mask = tile_offsets(0, 0, cols, cmask, N, S, stride_xn, stride_xc, stride_xs,
                              BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC_DTYPE)

    count, mean, xmu, m2 = tile_statistics(x, mask, ACC_DTYPE)
    # every real channel has a value; clamping the masked ones' count keeps the
    # sm_90 build at 40 registers (61 unclamped, at 32x1x256 fp32; bench.traffic)
    count = tl.maximum(count, 1.0)
    invstd = store_channel_stats(SaveMean, SaveInvstd, RunningMean, RunningVar, NumBatchesTracked,
                                 cols, cmask, count, mean, m2, momentum_hi, momentum_lo, eps_hi, eps_lo,
                                 UPDATE_RUNNING, CUMULATIVE_AVERAGE, ACC_DTYPE)

    scale, bias = affine(invstd, Weight, Bias, cols, cmask, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
    # one fma, as in bn_fwd_normalize_kernel: the backward's recomputed ReLU mask relies on it
    y = tl.fma(xmu, scale[None, :, None], bias[None, :, None])
    y = epilogue(y, R, 0, 0, cols, cmask, mask, N, S, stride_rn, stride_rc, stride_rs,
                 HAS_RESIDUAL, RELU, BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC, ACC_DTYPE)
    y_offs, _ = tile_offsets(0, 0, cols, cmask, N, S, stride_yn, stride_yc, stride_ys,
                             BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
    tl.store(Y + y_offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def bn_fwd_merge_kernel(
    Partials,           # [3, P, C] Welford partials (of splits, or of processes)
    Merged,             # [3, C] count, mean, m2 out, when STORE_MERGED
    SaveMean, SaveInvstd,       # [C] ACC_DTYPE outputs, when STORE_STATS
    RunningMean, RunningVar, NumBatchesTracked,  # as in bn_fwd_normalize_kernel
    C, num_splits,
    momentum_hi, momentum_lo, eps_hi, eps_lo,
    STORE_MERGED: tl.constexpr, STORE_STATS: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE_AVERAGE: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Merge partials per channel once, grid (cdiv(C, BLOCK_C),). STORE_STATS:
    write the statistics bn_fwd_normalize_kernel reads and update the running
    stats. STORE_MERGED (SyncBatchNorm): this process's (count, mean, m2), to
    all-gather."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    count, mean, m2 = merge_partials(Partials, num_splits, C, cols, cmask, SPLIT_BLOCK, BLOCK_C, "")
    if STORE_MERGED:
        tl.store(Merged + cols, count, mask=cmask)
        tl.store(Merged + C + cols, mean, mask=cmask)
        tl.store(Merged + 2 * C + cols, m2, mask=cmask)
    if STORE_STATS:
        store_channel_stats(SaveMean, SaveInvstd, RunningMean, RunningVar, NumBatchesTracked,
                            cols, cmask, count, mean, m2, momentum_hi, momentum_lo, eps_hi, eps_lo,
                            UPDATE_RUNNING, CUMULATIVE_AVERAGE, ACC_DTYPE)


@triton.jit
def _normalize_share(
    x, Y, R, Weight, Bias, SaveMean, SaveInvstd, n0, s0, cols, cmask, mask, N, S,
    stride_yn, stride_yc, stride_ys,
    stride_rn, stride_rc, stride_rs,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """y of the cooperative share at (n0, s0), x in hand, from the statistics
    the channel block's merger wrote (read from L2)."""
    mean = tl.load(SaveMean + cols, mask=cmask, other=0.0, cache_modifier=".cg")
    invstd = tl.load(SaveInvstd + cols, mask=cmask, other=0.0, cache_modifier=".cg")
    scale, bias = affine(invstd, Weight, Bias, cols, cmask, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
    # one fma, as in bn_fwd_normalize_kernel: the backward's recomputed ReLU mask relies on it
    y = tl.fma(x - mean[None, :, None], scale[None, :, None], bias[None, :, None])
    y = epilogue(y, R, n0, s0, cols, cmask, mask, N, S, stride_rn, stride_rc, stride_rs,
                 HAS_RESIDUAL, RELU, BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC, ACC_DTYPE)
    y_offs, _ = tile_offsets(n0, s0, cols, cmask, N, S, stride_yn, stride_yc, stride_ys,
                             BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
    tl.store(Y + y_offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _finish_shares(
    Shares, X, Y, R, Weight, Bias, SaveMean, SaveInvstd, cols, cmask, s_parts, N, S,
    stride_xn, stride_xc, stride_xs,
    stride_yn, stride_yc, stride_ys,
    stride_rn, stride_rc, stride_rs,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    PIECE_N: tl.constexpr, PIECE_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """The merger's part of a hand-over: normalize every share handed over to
    it (Shares[m] == HANDED_OVER), reading its x again [PIECE_N, BLOCK_C,
    PIECE_S] at a time (few registers on a rarely taken path)."""
    for other in range(GROUP):
        if tl.load(Shares + other, cache_modifier=".cg") == HANDED_OVER:
            for piece in range((BLOCK_N // PIECE_N) * (BLOCK_S // PIECE_S)):
                n = other // s_parts * BLOCK_N + piece // (BLOCK_S // PIECE_S) * PIECE_N
                s = other % s_parts * BLOCK_S + piece % (BLOCK_S // PIECE_S) * PIECE_S
                offs, mask = tile_offsets(n, s, cols, cmask, N, S, stride_xn, stride_xc, stride_xs,
                                          PIECE_N, PIECE_S, CHANNEL_INNER, INT64, VEC)
                x = tl.load(X + offs, mask=mask, other=0.0).to(ACC_DTYPE)
                _normalize_share(x, Y, R, Weight, Bias, SaveMean, SaveInvstd, n, s, cols, cmask, mask, N, S,
                                 stride_yn, stride_yc, stride_ys, stride_rn, stride_rc, stride_rs,
                                 HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL, RELU, PIECE_N, PIECE_S,
                                 CHANNEL_INNER, INT64, VEC, ACC_DTYPE)


@triton.jit
def bn_fwd_coop_kernel(
    X, Y, R, Weight, Bias,      # as in bn_fwd_resident_kernel
    RunningMean, RunningVar, NumBatchesTracked,
    SaveMean, SaveInvstd,       # [C] written by each channel block's last program, read by the others
    Partials,           # [3, GROUP, C] count, mean, m2 of each program's share of a channel
    Flags,              # int32 zeros, left zero: [3, blocks] arrivals, "merged", departures;
                        # [blocks, GROUP] share states
    N, C, S,
    s_parts,            # programs along S per channel block: GROUP = cdiv(N, BLOCK_N) * s_parts
    stride_xn, stride_xc, stride_xs,
    stride_yn, stride_yc, stride_ys,
    stride_rn, stride_rc, stride_rs,
    momentum_hi, momentum_lo, eps_hi, eps_lo,
    wait_limit,         # the wait for the merged flag before a share is handed to the merger:
                        # ns (TIMED_WAIT) or polls
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE_AVERAGE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    GROUP: tl.constexpr, MEMBERS: tl.constexpr, PHASE: tl.constexpr, TIMED_WAIT: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    PIECE_N: tl.constexpr, PIECE_S: tl.constexpr,
    CHANNEL_INNER: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Program (member, group) holds tile (member // s_parts, member % s_parts)
    of the [N, S] plane of each channel block group, group + groups, ... PHASE 0: all of it (GPU); 1: the
    partials and the merge only; 2: the normalization only. In PHASE 0 the
    merger also finishes the shares handed over to it (kernels/cooperative.py:
    wait_or_hand_over), reading their x again, [PIECE_N, BLOCK_C, PIECE_S] at a
    time (few registers on a rarely taken path)."""
    member = tl.program_id(0)
    num_blocks = tl.cdiv(C, BLOCK_C)
    n0 = member // s_parts * BLOCK_N
    s0 = member % s_parts * BLOCK_S
    for block in range(tl.program_id(1), num_blocks, tl.num_programs(1)):
        cols = block * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        shares = Flags + 3 * num_blocks + block * GROUP
        offs, mask = tile_offsets(n0, s0, cols, cmask, N, S, stride_xn, stride_xc, stride_xs,
                                  BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC)
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        if PHASE != 2:
            # this share's exact two-pass statistics
            count, share_mean, _, share_m2 = tile_statistics(x, mask, ACC_DTYPE)
            base = member * C + cols
            tl.store(Partials + base, count, mask=cmask)
            tl.store(Partials + GROUP * C + base, share_mean, mask=cmask)
            tl.store(Partials + 2 * GROUP * C + base, share_m2, mask=cmask)
            arrived = arrive(Flags + block)
            if arrived == GROUP - 1:
                reset_arrivals(Flags + block)
                total, mean, m2 = merge_partials(Partials, GROUP, C, cols, cmask, SPLIT_BLOCK, BLOCK_C, ".cg")
                store_channel_stats(SaveMean, SaveInvstd, RunningMean, RunningVar, NumBatchesTracked,
                                    cols, cmask, total, mean, m2, momentum_hi, momentum_lo, eps_hi, eps_lo,
                                    UPDATE_RUNNING, CUMULATIVE_AVERAGE, ACC_DTYPE)
                if PHASE == 0:  # PHASE 2 reads the statistics after a launch boundary
                    raise_flag(Flags + num_blocks + block)
        go = True
        if PHASE == 0:
            go = arrived == GROUP - 1
            if arrived != GROUP - 1:
                go = wait_or_hand_over(Flags + num_blocks + block, shares + member, wait_limit, TIMED_WAIT)
        if PHASE != 1:
            if go:
                _normalize_share(x, Y, R, Weight, Bias, SaveMean, SaveInvstd, n0, s0, cols, cmask, mask, N, S,
                                 stride_yn, stride_yc, stride_ys, stride_rn, stride_rc, stride_rs,
                                 HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL, RELU,
                                 BLOCK_N, BLOCK_S, CHANNEL_INNER, INT64, VEC, ACC_DTYPE)
        if PHASE == 0:
            if arrived == GROUP - 1:
                if claim_shares(shares, member, GROUP, MEMBERS) > 0:
                    _finish_shares(shares, X, Y, R, Weight, Bias, SaveMean, SaveInvstd, cols, cmask, s_parts, N, S,
                                   stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
                                   stride_rn, stride_rc, stride_rs, HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL, RELU,
                                   GROUP, BLOCK_N, BLOCK_S, PIECE_N, PIECE_S, CHANNEL_INNER, INT64, VEC, ACC_DTYPE)
            depart(Flags + 2 * num_blocks + block, Flags + num_blocks + block, shares, GROUP)
