"""Launch plans: what a call's kernel launches need beyond its tensors,
computed once per call key (tritonbn.plan_cache keeps them).

From a call's key alone follow the canonical view (tritonbn.views), the
memory format and strides of the outputs, the config, the grids, the
constexprs and every scalar argument; a plan holds them, ready to launch. A
repeated call finds its plan, allocates its outputs and launches
(tritonbn.launch.run_*): no view analysis, no config choice, no argument
building.

Not cached (such calls take the full path each time): inputs no canonical
view fits (copied first), strided per-channel tensors (dense copies), a
config forced with ``tritonbn.autotune.override``, and anything chosen
during CUDA-graph capture (the tuner cannot time there).
"""
from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from . import autotune
from .autotune import LaunchConfig, Problem, Trial, choose_config
from .autotune.config import cdiv, next_power_of_2
from .views import View, acc_dtype, flat_row_stride, needs_int64, strides_in, vector_width

_ACC = {torch.float64: tl.float64}


def _to_float32(value: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32's range: what a float32 cast gives
        return math.copysign(math.inf, value)


@functools.lru_cache(maxsize=64)
def hi_lo(value: float) -> tuple[float, float]:
    """value as two float32 halves: Triton passes Python floats as fp32, and
    float64 inputs need momentum, eps and the count m = N * S to ~48 bits."""
    hi = _to_float32(value)
    return hi, _to_float32(value - hi)


def grid_split(view: View, cfg: LaunchConfig) -> tuple[tuple[int, int, int], int, int]:
    """Grid and the per-program share (whole tiles) along N and along S."""
    n_per_split = cdiv(cdiv(view.N, cfg.block_n), cfg.split_n) * cfg.block_n
    s_per_split = cdiv(cdiv(view.S, cfg.block_s), cfg.split_s) * cfg.block_s
    grid = (cdiv(view.C, cfg.block_c), cdiv(view.N, n_per_split), cdiv(view.S, s_per_split))
    return grid, n_per_split, s_per_split


# Elements of the [splits x channels] tile a program merges partials in per step.
MERGE_TILE = 4096


def split_block(num_splits: int, block_c: int) -> int:
    """Partials merged per step: all of them, up to a MERGE_TILE-element tile."""
    return min(next_power_of_2(num_splits), max(1, MERGE_TILE // block_c))


def cooperative_grid(view: View, cfg: LaunchConfig, device: torch.device) -> tuple[int, int]:
    """(programs per channel block, groups) of the cooperative regime's grid: a
    persistent grid of at most one program per SM, so that every program of a
    group is resident while the others wait for it (kernels/cooperative.py: arrive,
    wait_or_hand_over); each group takes channel blocks in turn."""
    sms = autotune.config._sm_count(device.type, device.index)
    group = cfg.split_n * cfg.split_s
    if device.type == "cuda" and group > sms:
        raise ValueError(f"cooperative config with {group} programs per channel block: this GPU has "
                         f"{sms} SMs, and a group's programs must all be resident at once")
    return group, max(1, min(cdiv(view.C, cfg.block_c), sms // group))


def cooperative_phases() -> tuple[int, ...]:
    """The cooperative kernels' PHASE per launch: 0 (one launch, the slab kept
    on chip) on a GPU; under the interpreter, whose programs run one after
    another (a program waiting for a later one would wait forever), 1 (the
    partials and their merge) then 2 (the elementwise pass, reading x again)."""
    from . import kernels
    return (1, 2) if kernels.INTERPRETED else (0,)


def named_strides(prefix: str, strides: tuple[int, int, int]) -> dict:
    return {f"stride_{prefix}n": strides[0], f"stride_{prefix}c": strides[1],
            f"stride_{prefix}s": strides[2]}


def meta_acc_dtype(dtype: torch.dtype):
    """The kernels' ACC_DTYPE constexpr for data of this dtype."""
    return _ACC.get(dtype, tl.float32)


def meta(view: View, cfg: LaunchConfig, x: torch.Tensor, *tensors: torch.Tensor | None) -> dict:
    """The tile constexprs and warps every data kernel takes."""
    return dict(BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s,
                CHANNEL_INNER=view.channel_inner, INT64=needs_int64(x, *tensors),
                VEC=vector_width(view, x, *tensors),
                ACC_DTYPE=meta_acc_dtype(x.dtype), num_warps=cfg.num_warps)


def problem(op: str, view: View, x: torch.Tensor) -> Problem:
    return Problem(op, view.N, view.C, view.S, view.channel_inner, x.dtype, x.device)


def choose(op: str, view: View, x: torch.Tensor, config: LaunchConfig | None,
           trial: Trial) -> LaunchConfig:
    """The given config (validated), or the one the autotune layer chooses."""
    if config is None:
        return choose_config(problem(op, view, x), trial)
    config.validate(problem(op, view, x))
    return config


# ---------------------------------------------------------------- plans

def _allocation(x: torch.Tensor, fmt: torch.memory_format) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Size and strides of an output like x in memory format fmt."""
    return tuple(x.shape), torch.empty_like(x, memory_format=fmt, device="meta").stride()


def allocated_like(x: torch.Tensor, stride: tuple[int, ...]) -> bool:
    """Whether torch.empty_like(x) has these strides: then an output is
    allocated so, with less Python than empty_strided."""
    return tuple(torch.empty_like(x, device="meta").stride()) == tuple(stride)


@dataclass(eq=False)
class ForwardPlan:
    """Training forward (regime resident: one kernel; split: stats with their
    merge, then normalize) or inference (one kernel, regime flat or split).
    ``args``: the scalar and constexpr keyword arguments of the kernel that
    writes y; ``stats_args``: the split regime's statistics kernel's (its
    last program per channel block merges); ``merge_args``, on grid
    ``merge_grid``: bn_fwd_merge_kernel's, for statistics merged from
    partials made elsewhere (SyncBatchNorm)."""

    training: bool
    regime: str
    view: View
    size: tuple[int, ...]
    stride: tuple[int, ...]
    stats_dtype: torch.dtype
    grid: tuple[int, ...]
    args: dict
    like_input: bool = False      # y is allocated as torch.empty_like(x) (allocated_like)
    stats_args: dict = field(default_factory=dict)
    merge_grid: tuple[int, ...] = ()
    merge_args: dict = field(default_factory=dict)
    num_splits: int = 1
    phases: tuple[int, ...] = ()  # the cooperative kernel's launches
    num_flags: int = 0            # the cooperative regime's int32 counters (counters.zeroed)
    args_without_stats: dict = field(default_factory=dict)  # inference without save_mean / save_invstd
    # 0-element tensors of the statistics' dtype on the call's device: new_empty
    # of one allocates a per-channel tensor in 0.7 us, torch.empty(C, dtype=,
    # device=) in 1.0 on this repository's CPU machine
    stats_like: torch.Tensor | None = None
    launches: dict = field(default_factory=dict)  # call site -> launcher.Launch, made on first use
    backward_plans: dict = field(default_factory=dict)  # the backward plans of its outputs (tritonbn.planned)
    autograd: tuple | None = None  # what tritonbn.planned's autograd Function keeps per plan


def merge_args(num_splits: int, block_c: int, stats_dtype: torch.dtype, *, momentum, eps: float,
               update: bool, store_merged: bool, store_stats: bool) -> dict:
    """bn_fwd_merge_kernel's scalar and constexpr arguments (its C comes with them)."""
    momentum_hi, momentum_lo = hi_lo(0.0 if momentum is None else momentum)
    eps_hi, eps_lo = hi_lo(eps)
    return dict(num_splits=num_splits, momentum_hi=momentum_hi, momentum_lo=momentum_lo,
                eps_hi=eps_hi, eps_lo=eps_lo, STORE_MERGED=store_merged, STORE_STATS=store_stats,
                UPDATE_RUNNING=update, CUMULATIVE_AVERAGE=momentum is None,
                SPLIT_BLOCK=split_block(num_splits, block_c), BLOCK_C=block_c,
                ACC_DTYPE=meta_acc_dtype(stats_dtype))


def forward_plan(x, view: View, fmt, cfg: LaunchConfig, *, training: bool, weight, bias, update: bool,
                 momentum, eps, residual, r_strides, relu: bool, num_splits: int | None = None) -> ForwardPlan:
    """The plan of a training (or, training=False, inference) forward of x (already
    fitting `view`) with config cfg; residual, when given, fits the view too.
    num_splits given (SyncBatchNorm): the merge kernel merges that many
    partials made elsewhere, and no statistics kernel runs."""
    size, stride = _allocation(x, fmt)
    y_meta = torch.empty_strided(size, stride, dtype=x.dtype, device="meta")
    if not training and cfg.regime == "flat":
        row_strides = [flat_row_stride(t, view) for t in (x, y_meta, x if residual is None else residual)]
        if None not in row_strides:
            return _flat_plan(x, y_meta, view, cfg, row_strides, weight=weight, bias=bias, eps=eps,
                              residual=residual, relu=relu)
        cfg = autotune.heuristic(problem("inference", view, x), allow_flat=False)
    args = dict(
        N=view.N, C=view.C, S=view.S,
        **named_strides("x", strides_in(x, view)), **named_strides("y", strides_in(y_meta, view)),
        **named_strides("r", r_strides),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, RELU=relu,
        **meta(view, cfg, x, y_meta, residual),
    )
    grid, n_per_split, s_per_split = grid_split(view, cfg)
    stats_dtype = acc_dtype(x.dtype)
    plan = ForwardPlan(training, cfg.regime if training else "split", view, size, stride, stats_dtype, grid, args,
                       like_input=allocated_like(x, stride), stats_like=x.new_empty(0, dtype=stats_dtype))
    eps_hi, eps_lo = hi_lo(eps)
    if not training:
        args.update(n_per_split=n_per_split, s_per_split=s_per_split, eps_hi=eps_hi, eps_lo=eps_lo,
                    STORE_STATS=True)
        plan.args_without_stats = dict(args, STORE_STATS=False)
        return plan
    if cfg.regime in ("resident", "cooperative"):
        momentum_hi, momentum_lo = hi_lo(0.0 if momentum is None else momentum)
        args.update(momentum_hi=momentum_hi, momentum_lo=momentum_lo, eps_hi=eps_hi, eps_lo=eps_lo,
                    UPDATE_RUNNING=update, CUMULATIVE_AVERAGE=momentum is None)
        plan.grid = (grid[0],)
        if cfg.regime == "cooperative":
            _cooperative(plan, view, cfg, x.device, x.element_size())
        return plan
    args.update(n_per_split=n_per_split, s_per_split=s_per_split)
    if num_splits is None:
        # statistics kernel; its last program per channel block merges (MERGE)
        plan.num_splits = grid[1] * grid[2]
        plan.stats_args = stats_args(x, view, cfg, plan.num_splits, momentum=momentum, eps=eps, update=update)
        return plan
    plan.num_splits = num_splits
    plan.merge_grid = (grid[0],)
    plan.merge_args = dict(C=view.C, **merge_args(num_splits, cfg.block_c, stats_dtype, momentum=momentum,
                                                  eps=eps, update=update, store_merged=False,
                                                  store_stats=True))
    return plan


def stats_args(x, view: View, cfg: LaunchConfig, num_splits: int, *, momentum, eps: float, update: bool,
               merge: bool = True) -> dict:
    """bn_fwd_stats_kernel's scalar and constexpr arguments. merge: its last
    program per channel block merges the partials (as bn_fwd_merge_kernel
    would), writes the statistics and updates the running stats."""
    momentum_hi, momentum_lo = hi_lo(0.0 if momentum is None else momentum)
    eps_hi, eps_lo = hi_lo(eps)
    _, n_per_split, s_per_split = grid_split(view, cfg)
    return dict(N=view.N, C=view.C, S=view.S, **named_strides("x", strides_in(x, view)),
                n_per_split=n_per_split, s_per_split=s_per_split, momentum_hi=momentum_hi,
                momentum_lo=momentum_lo, eps_hi=eps_hi, eps_lo=eps_lo, MERGE=merge,
                UPDATE_RUNNING=merge and update, CUMULATIVE_AVERAGE=momentum is None,
                SPLIT_BLOCK=split_block(num_splits, cfg.block_c), **meta(view, cfg, x))


def _flat_plan(x, y_meta, view: View, cfg: LaunchConfig, row_strides, *, weight, bias, eps, residual,
               relu: bool) -> ForwardPlan:
    rows, length = (view.N * view.S, view.C) if view.channel_inner else (view.N, view.C * view.S)
    rows_per_split = cdiv(cdiv(rows, cfg.block_n), cfg.split_n) * cfg.block_n
    channels = 1 if view.channel_inner else min(next_power_of_2((cfg.block_s - 1) // view.S + 2),
                                                 next_power_of_2(view.C))
    eps_hi, eps_lo = hi_lo(eps)
    args = dict(rows=rows, L=length, C=view.C, S=view.S, stride_xr=row_strides[0], stride_yr=row_strides[1],
                stride_rr=row_strides[2], rows_per_split=rows_per_split, eps_hi=eps_hi, eps_lo=eps_lo,
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                RELU=relu, STORE_STATS=True, BLOCK_R=cfg.block_n, BLOCK_F=cfg.block_s, CHANNELS=channels,
                CHANNEL_INNER=view.channel_inner, INT64=needs_int64(x, y_meta, residual),
                ACC_DTYPE=meta_acc_dtype(x.dtype), num_warps=cfg.num_warps)
    grid = (cdiv(length, cfg.block_s), cdiv(rows, rows_per_split))
    size, stride = tuple(y_meta.shape), y_meta.stride()
    return ForwardPlan(False, "flat", view, size, stride, acc_dtype(x.dtype), grid, args,
                       like_input=allocated_like(x, stride), args_without_stats=dict(args, STORE_STATS=False),
                       stats_like=x.new_empty(0, dtype=acc_dtype(x.dtype)))


# How long a cooperative program waits for its channel block's flag before it
# hands its share to the merger (kernels/cooperative.py: wait_or_hand_over):
# 50 us of the GPU's global timer, where a co-resident group's wait takes a
# few; a number of polls under the interpreter, which has no timer, and with
# triton 3.6, whose sm_90 build of the fused forward (ReLU, fp32) spills 8
# bytes with the timer (python -m bench.traffic; tests/test_sm90_compile.py).
COOPERATIVE_WAIT_NS = 50_000
COOPERATIVE_SPIN_LIMIT = 1 << 14
_TIMED_WAIT = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 7)


def cooperative_launch() -> dict:
    """The cooperative kernels' wait budget and launch option: on a GPU a
    cooperative grid (launch_cooperative_grid: the driver starts it only with
    all its programs resident at once, so no member waits for one that is
    not scheduled) and a timed wait; under the interpreter polls."""
    from . import kernels
    if kernels.INTERPRETED:
        return dict(wait_limit=COOPERATIVE_SPIN_LIMIT, TIMED_WAIT=False)
    return dict(wait_limit=COOPERATIVE_WAIT_NS if _TIMED_WAIT else COOPERATIVE_SPIN_LIMIT, TIMED_WAIT=_TIMED_WAIT,
                launch_cooperative_grid=True)


def hand_over_piece(cfg: LaunchConfig, itemsize: int) -> dict:
    """PIECE_N, PIECE_S: the [PIECE_N, block_c, PIECE_S] pieces in which a
    cooperative merger finishes a share handed over to it, 16 bytes per
    thread: loads as wide as the share's own, few registers."""
    values = cfg.num_warps * 32 * 16 // itemsize
    piece_s = min(cfg.block_s, max(1, values // cfg.block_c))
    return dict(PIECE_N=min(cfg.block_n, max(1, values // (cfg.block_c * piece_s))), PIECE_S=piece_s)


def _cooperative(plan, view: View, cfg: LaunchConfig, device: torch.device, itemsize: int) -> None:
    plan.grid = cooperative_grid(view, cfg, device)
    plan.num_splits = group = plan.grid[0]
    blocks = cdiv(view.C, cfg.block_c)
    plan.num_flags = (3 + group) * blocks  # arrivals, flags, departures, then each member's share state
    plan.phases = cooperative_phases()
    plan.args.update(GROUP=group, MEMBERS=next_power_of_2(group), s_parts=cfg.split_s,
                     SPLIT_BLOCK=split_block(group, cfg.block_c), **cooperative_launch(),
                     **hand_over_piece(cfg, itemsize))


@dataclass(eq=False)
class BackwardPlan:
    """Backward (regime resident: one kernel; split: sums with their
    reduction, then dx where an elementwise gradient is asked for). ``args``:
    the dx (or resident) kernel's scalar and constexpr keyword arguments;
    ``sums_args``: the split regime's sums kernel's (its last program per
    channel block sums the partials)."""

    regime: str
    view: View
    size: tuple[int, ...]
    stride: tuple[int, ...]
    stats_dtype: torch.dtype
    dweight_dtype: torch.dtype | None  # None: no grad_weight
    dbias_dtype: torch.dtype | None    # None: no grad_bias
    need_dx: bool
    residual_grad: bool
    has_sums: bool
    reads_bias: bool
    grid: tuple[int, ...]
    args: dict
    like_input: bool = False  # dx and dr are allocated as torch.empty_like(x) (allocated_like)
    sums_args: dict = field(default_factory=dict)
    num_splits: int = 1
    phases: tuple[int, ...] = ()
    num_flags: int = 0
    launches: dict = field(default_factory=dict)  # call site -> launcher.Launch, made on first use
    dweight_like: torch.Tensor | None = None  # 0-element, of dweight_dtype on the device (ForwardPlan.stats_like)
    dbias_like: torch.Tensor | None = None    # 0-element, of dbias_dtype on the device


def backward_plan(grad_out, x, view: View, fmt, cfg: LaunchConfig, *, training: bool, weight,
                  output_mask, bias_dtype, output, residual_grad: bool, relu_from_input: bool,
                  has_bias: bool, partials_given: bool = False, count: float | None = None) -> BackwardPlan:
    """The plan of a backward of x with config cfg; grad_out and output (when
    given) fit `view` as x does. output_mask: (dx, dweight, dbias) wanted, and
    available (a weight, a bias_dtype). has_bias: a bias is read for the
    recomputed ReLU mask. partials_given (SyncBatchNorm): the two sums per
    channel come from all processes, [2, 1, C], already divided by m (count
    1.0), so the sums kernel does not run."""
    need_dx, need_dw, need_db = output_mask
    size, stride = _allocation(x, fmt)
    out_meta = torch.empty_strided(size, stride, dtype=x.dtype, device="meta")
    # dx and dr are allocated alike, so dr uses dx's strides; without either, x's
    dx_like = out_meta if (need_dx or residual_grad) else x
    relu = output is not None
    affine_args = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, RELU=relu,
                       RELU_FROM_X=relu_from_input)
    input_strides = dict(**named_strides("x", strides_in(x, view)),
                         **named_strides("g", strides_in(grad_out, view)),
                         **named_strides("y", (0, 0, 0) if output is None else strides_in(output, view)))
    args = dict(
        N=view.N, C=view.C, S=view.S, **input_strides,
        **named_strides("dx", strides_in(dx_like, view)),
        TRAINING=training, COMPUTE_DX=need_dx, STORE_DRESIDUAL=residual_grad, **affine_args,
        **meta(view, cfg, x, grad_out, dx_like, output),
    )
    grid, n_per_split, s_per_split = grid_split(view, cfg)
    has_sums = training or need_dw or need_db
    plan = BackwardPlan(cfg.regime, view, size, stride, acc_dtype(x.dtype),
                        weight.dtype if need_dw and weight is not None else None,
                        bias_dtype if need_db else None,
                        need_dx, residual_grad, has_sums, has_bias, grid, args,
                        like_input=allocated_like(x, stride))
    if plan.dweight_dtype is not None:
        plan.dweight_like = x.new_empty(0, dtype=plan.dweight_dtype)
    if plan.dbias_dtype is not None:
        plan.dbias_like = x.new_empty(0, dtype=plan.dbias_dtype)
    if cfg.regime in ("resident", "cooperative"):
        args.update(STORE_DWEIGHT=need_dw, STORE_DBIAS=need_db)
        plan.grid = (grid[0],)
        if cfg.regime == "cooperative":
            _cooperative(plan, view, cfg, x.device, x.element_size())
            count_hi, count_lo = hi_lo(float(view.N * view.S))
            args.update(count_hi=count_hi, count_lo=count_lo)
            if not training:  # eval's dx reads no totals: nobody waits, one launch anywhere
                plan.phases = (0,)
        return plan
    if has_sums and not partials_given:
        # sums kernel; its last program per channel block sums the partials (REDUCE)
        plan.num_splits = grid[1] * grid[2]
        plan.sums_args = dict(N=view.N, C=view.C, S=view.S, **input_strides, n_per_split=n_per_split,
                              s_per_split=s_per_split, **affine_args, REDUCE=True, STORE_DWEIGHT=need_dw,
                              STORE_DBIAS=need_db, STORE_SUMS=training,
                              SPLIT_BLOCK=split_block(plan.num_splits, cfg.block_c),
                              **meta(view, cfg, x, grad_out, output))
    count_hi, count_lo = hi_lo(float(view.N * view.S) if count is None else count)
    args.update(n_per_split=n_per_split, s_per_split=s_per_split, stride_sums=plan.num_splits * view.C,
                count_hi=count_hi, count_lo=count_lo)
    return plan

