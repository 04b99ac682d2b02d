"""HBM traffic and launch plans of tritonbn on the ResNet-50 BatchNorm shapes,
modeled without a GPU.

    python -m bench.traffic                          # batch 32 64 256, bf16 fp32, both layouts, 3 ops
    python -m bench.traffic --batches 256 --dtypes bf16 --quiet --csv traffic.csv
    python -m bench.traffic --shape 256,64,56,56 --ops forward backward_relu --no-compile

For each (shape, dtype, layout, op) the launcher runs once on ``meta``
tensors, the kernels replaced by a recorder (bench.kernel_report.recording),
with the config the heuristic picks on an H100 (--sms 132). Each recorded
launch gives:

- bytes: what its programs request from global memory, per tensor, from a
  small declaration per kernel (MODEL): which pointer is read or written and
  how many elements, as an expression of the launch's own arguments and grid
  (``numel`` = N * C * S, ``splits`` = programs per channel block,
  ``blocks`` = channel blocks). Requests, not DRAM transactions: a re-read
  that L2 may serve counts in full, as does every program's re-merge of the
  partials. tests/test_traffic.py checks the model against the bytes the
  kernels touch under the Triton interpreter.
- the kernel compiled for sm_90 with the launch's real specialization
  (bench.kernel_report.specialize): registers, spills, shared memory,
  programs per SM (occupancy), waves = programs / (SMs x programs per SM)
  and the grid's shape (grid_shape: two waves or more, one wave of at least
  one program per SM, the cooperative kernels' persistent grid, or a tail
  between one and two waves, or fewer programs than SMs: the last two miss),
  and the narrowest global load / store of its per-element tensors (x, y,
  dy, dx, residual), read from the PTX.

A row (one per shape, dtype, layout, op; --csv writes them) compares the
bytes with the minimum (1 read + 1 write of each tensor) and with the
practical minimum of its regime (docs/design.md: x, and dy in the backward, read
twice where one channel's slab exceeds 192 KB), takes the worst figures of
its kernels, models the time as bytes / bandwidth at H100 (3.35 TB/s) and
H200 (4.8 TB/s) speeds beside the same for the minimal bytes, and lists the
targets it misses (bytes, spills, loads, waves: docs/performance.md).

Limits: the time model has no launch latency, tail effect, L2 reuse or
instruction cost; occupancy counts registers, threads and shared memory
only; min_load_bytes covers every load of the per-element tensors, not only
the hot loop's. Compiling needs the Triton interpreter off (TRITON_INTERPRET
unset); the full default set takes about 70 s on 2 cores (--jobs N: N
processes).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from bench.allocations import counting
from bench.kernel_report import Launch, Variant, bind, compile_variant, progress_bar, recording, tile_text
from tritonbn.autotune.config import FIT_BYTES  # a channel's slab the single-read regimes hold
from tritonbn.autotune.shapes import DTYPES, LAYOUTS, RESNET50_BATCHES, in_layout, select_shapes

ARCH = 90
H100_SMS = 132
BANDWIDTH = {"h100": 3.35e12, "h200": 4.8e12}  # bytes / s, HBM3 and HBM3e
# sm_90 per-SM limits for occupancy
SM90 = dict(registers=65536, threads=2048, shared=228 * 1024, blocks=32, reserved_shared=1024,
            register_granule=256)

# ---------------------------------------------------------------------------
# The byte model: per kernel, what each pointer argument reads or writes.

READ, WRITE = "read", "write"
VIEW = "numel"  # count of a per-element tensor: every value of the (N, C, S) view once


class Access(NamedTuple):
    """``count`` elements of pointer ``arg`` read or written by the whole launch,
    where ``when`` holds. Both are Python expressions over the launch's bound
    arguments plus numel, splits (grid[1] * grid[2]: programs per channel
    block), blocks (grid[0]) and programs."""

    arg: str
    mode: str
    count: str
    when: str = "True"


def _per_channel(arg: str, when: str = "True") -> tuple[Access, ...]:
    """A [C] vector read by every program (load_channel: C values per split row)."""
    return (Access(arg, READ, "C * splits", when),)


def _running_stats(when: str) -> tuple[Access, ...]:
    """store_channel_stats: one writer program per channel block."""
    return (Access("SaveMean", WRITE, "C", when), Access("SaveInvstd", WRITE, "C", when),
            Access("RunningMean", READ, "C", f"({when}) and UPDATE_RUNNING"),
            Access("RunningMean", WRITE, "C", f"({when}) and UPDATE_RUNNING"),
            Access("RunningVar", READ, "C", f"({when}) and UPDATE_RUNNING"),
            Access("RunningVar", WRITE, "C", f"({when}) and UPDATE_RUNNING"),
            Access("NumBatchesTracked", READ, "blocks", f"({when}) and UPDATE_RUNNING and CUMULATIVE_AVERAGE"))


_LOOP = "COMPUTE_DX or STORE_DRESIDUAL"
_SUMS = "TRAINING or STORE_DWEIGHT or STORE_DBIAS"


def _per_coop_program(arg: str, when: str = "True") -> tuple[Access, ...]:
    """A [C] vector a cooperative kernel's every program reads for each of its channel blocks."""
    return (Access(arg, READ, "C * GROUP", when),)
MODEL: dict[str, tuple[Access, ...]] = {
    # MERGE: the last program of a channel block to arrive reads its block's
    # partials back and writes the statistics (counters: atomics only)
    "bn_fwd_stats_kernel": (
        Access("X", READ, VIEW),
        Access("Partials", WRITE, "3 * splits * C"),
        Access("Partials", READ, "3 * splits * C", "MERGE"),
        *_running_stats("MERGE"),
        Access("Counters", READ, "0"),
    ),
    "bn_fwd_normalize_kernel": (
        # the statistics the stats kernel's merging programs wrote, once per channel
        *_per_channel("SaveMean"), *_per_channel("SaveInvstd"),
        *_per_channel("Weight", "HAS_WEIGHT"), *_per_channel("Bias", "HAS_BIAS"),
        Access("X", READ, VIEW), Access("R", READ, VIEW, "HAS_RESIDUAL"), Access("Y", WRITE, VIEW),
    ),
    "bn_fwd_resident_kernel": (
        *_running_stats("True"),
        *_per_channel("Weight", "HAS_WEIGHT"), *_per_channel("Bias", "HAS_BIAS"),
        Access("X", READ, VIEW), Access("R", READ, VIEW, "HAS_RESIDUAL"), Access("Y", WRITE, VIEW),
    ),
    # grid (GROUP, groups); every program takes each of its group's channel
    # blocks in turn. PHASE 0 (GPU) reads x once; under the interpreter PHASE 1
    # and 2 each read it. The last program of a block to arrive merges GROUP
    # partials; the others read the statistics it wrote. Flags are touched by
    # atomics only, which are not loads or stores here.
    "bn_fwd_coop_kernel": (
        Access("X", READ, VIEW),
        Access("Partials", WRITE, "3 * GROUP * C", "PHASE != 2"),
        Access("Partials", READ, "3 * GROUP * C", "PHASE != 2"),
        *_running_stats("PHASE != 2")[:-1],
        Access("NumBatchesTracked", READ, "cdiv(C, BLOCK_C)", "PHASE != 2 and UPDATE_RUNNING and CUMULATIVE_AVERAGE"),
        *_per_coop_program("SaveMean", "PHASE != 1"), *_per_coop_program("SaveInvstd", "PHASE != 1"),
        *_per_coop_program("Weight", "PHASE != 1 and HAS_WEIGHT"),
        *_per_coop_program("Bias", "PHASE != 1 and HAS_BIAS"),
        Access("R", READ, VIEW, "PHASE != 1 and HAS_RESIDUAL"), Access("Y", WRITE, VIEW, "PHASE != 1"),
        Access("Flags", READ, "0"),
    ),
    "bn_fwd_merge_kernel": (
        Access("Partials", READ, "3 * num_splits * C"),
        Access("Merged", WRITE, "3 * C", "STORE_MERGED"),
        *_running_stats("STORE_STATS"),
    ),
    "bn_inference_kernel": (
        *_per_channel("RunningMean"), *_per_channel("RunningVar"),
        Access("SaveMean", WRITE, "C", "STORE_STATS"), Access("SaveInvstd", WRITE, "C", "STORE_STATS"),
        *_per_channel("Weight", "HAS_WEIGHT"), *_per_channel("Bias", "HAS_BIAS"),
        Access("X", READ, VIEW), Access("R", READ, VIEW, "HAS_RESIDUAL"), Access("Y", WRITE, VIEW),
    ),
    # grid (position chunks, row splits): every program reads its positions'
    # channels (flat_channels per row split), the row-0 programs write each
    # channel's saved statistics once
    "bn_inference_flat_kernel": (
        Access("RunningMean", READ, "splits * flat_channels"), Access("RunningVar", READ, "splits * flat_channels"),
        Access("Weight", READ, "splits * flat_channels", "HAS_WEIGHT"),
        Access("Bias", READ, "splits * flat_channels", "HAS_BIAS"),
        Access("SaveMean", WRITE, "C", "STORE_STATS"), Access("SaveInvstd", WRITE, "C", "STORE_STATS"),
        Access("X", READ, VIEW), Access("R", READ, VIEW, "HAS_RESIDUAL"), Access("Y", WRITE, VIEW),
    ),
    "bn_bwd_sums_kernel": (
        *_per_channel("Mean"),
        Access("Invstd", READ, "C * splits * (1 + RELU_FROM_X)"),  # the mask's scale, then xhat
        *_per_channel("Weight", "RELU_FROM_X and HAS_WEIGHT"), *_per_channel("Bias", "RELU_FROM_X and HAS_BIAS"),
        Access("X", READ, VIEW), Access("DY", READ, VIEW), Access("Y", READ, VIEW, "RELU"),
        Access("Partials", WRITE, "2 * splits * C"),
        # REDUCE: the last program of a channel block sums its partials (as bn_bwd_reduce_kernel)
        Access("Partials", READ, "2 * splits * C", "REDUCE"),
        Access("Partials", WRITE, "2 * C", "REDUCE and STORE_SUMS"),  # the totals, over row 0
        Access("DWeight", WRITE, "C", "REDUCE and STORE_DWEIGHT"),
        Access("DBias", WRITE, "C", "REDUCE and STORE_DBIAS"),
        Access("Counters", READ, "0"),
    ),
    "bn_bwd_reduce_kernel": (
        Access("Partials", READ, "2 * num_splits * C"),
        Access("Partials", WRITE, "2 * C", "STORE_SUMS"),  # the totals, over row 0
        Access("DWeight", WRITE, "C", "STORE_DWEIGHT"), Access("DBias", WRITE, "C", "STORE_DBIAS"),
    ),
    "bn_bwd_dx_kernel": (
        *_per_channel("Mean"), *_per_channel("Invstd"),
        *_per_channel("Weight", "HAS_WEIGHT"), *_per_channel("Bias", "HAS_BIAS"),
        # the two totals the sums kernel's last programs wrote, once per channel
        Access("Sums", READ, "2 * C * splits", "TRAINING"),
        Access("DY", READ, VIEW, _LOOP), Access("Y", READ, VIEW, f"RELU and ({_LOOP})"),
        Access("DR", WRITE, VIEW, "STORE_DRESIDUAL"),
        Access("X", READ, VIEW, "COMPUTE_DX and TRAINING"), Access("DX", WRITE, VIEW, "COMPUTE_DX"),
    ),
    # as bn_fwd_coop_kernel; the last program of a block sums GROUP partials
    # and writes the totals the others read for dx
    "bn_bwd_coop_kernel": (
        *_per_coop_program("Mean"), *_per_coop_program("Invstd"),
        *_per_coop_program("Weight", "HAS_WEIGHT"), *_per_coop_program("Bias", "HAS_BIAS"),
        Access("X", READ, VIEW, f"{_SUMS} or RELU_FROM_X"), Access("DY", READ, VIEW),
        Access("Y", READ, VIEW, "RELU"),
        Access("Partials", WRITE, "2 * GROUP * C", f"({_SUMS}) and PHASE != 2"),
        Access("Partials", READ, "2 * GROUP * C", f"({_SUMS}) and PHASE != 2"),
        Access("DWeight", WRITE, "C", "STORE_DWEIGHT and PHASE != 2"),
        Access("DBias", WRITE, "C", "STORE_DBIAS and PHASE != 2"),
        Access("Totals", WRITE, "2 * C", f"({_SUMS}) and PHASE != 2"),
        Access("Totals", READ, "2 * C * GROUP", "TRAINING and COMPUTE_DX and PHASE != 1"),
        Access("DR", WRITE, VIEW, "STORE_DRESIDUAL and PHASE != 1"),
        Access("DX", WRITE, VIEW, "COMPUTE_DX and PHASE != 1"),
        Access("Flags", READ, "0"),
    ),
    "bn_bwd_resident_kernel": (
        *_per_channel("Mean"), *_per_channel("Invstd"),
        *_per_channel("Weight", "HAS_WEIGHT"), *_per_channel("Bias", "HAS_BIAS"),
        Access("X", READ, VIEW), Access("DY", READ, VIEW), Access("Y", READ, VIEW, "RELU"),
        Access("DR", WRITE, VIEW, "STORE_DRESIDUAL"),
        Access("DWeight", WRITE, "C", "STORE_DWEIGHT"), Access("DBias", WRITE, "C", "STORE_DBIAS"),
        Access("DX", WRITE, VIEW, "COMPUTE_DX"),
    ),
}

# what a pointer holds, for the per-role byte columns (anything else: params)
ROLES = {"X": "x", "Y": "y", "R": "residual", "DY": "dy", "DX": "dx", "DR": "dresidual",
         "Partials": "partials", "Merged": "partials", "Sums": "partials", "Totals": "partials"}
ROLE_COLUMNS = ("x", "y", "residual", "dy", "dx", "dresidual", "partials", "params")


def model_for(name: str) -> tuple[Access, ...]:
    try:
        return MODEL[name]
    except KeyError:
        raise KeyError(f"bench/traffic.py has no byte model for kernel {name!r}: declare its reads and "
                       "writes in MODEL") from None


def grid_of(launch: Launch, bound: dict) -> tuple[int, int, int]:
    grid = launch.grid(bound) if callable(launch.grid) else launch.grid
    grid = tuple(grid) + (1,) * (3 - len(grid))
    return tuple(int(g) for g in grid)


def launch_bytes(launch: Launch) -> dict[tuple[str, str], int]:
    """{(pointer arg, read | write): bytes} the launch's programs request."""
    name = launch.fn.__name__
    model = model_for(name)
    bound = bind(launch.fn, launch.args, launch.kwargs)
    pointers = {k for k, v in bound.items() if isinstance(v, torch.Tensor)}
    undeclared = pointers - {a.arg for a in model}
    if undeclared:
        raise KeyError(f"{name}: pointer arguments {sorted(undeclared)} have no entry in bench.traffic.MODEL")
    grid = grid_of(launch, bound)
    scope = dict(bound, blocks=grid[0], splits=grid[1] * grid[2], programs=math.prod(grid),
                 cdiv=lambda a, b: -(-a // b))
    if {"N", "C", "S"} <= bound.keys():
        scope["numel"] = bound["N"] * bound["C"] * bound["S"]
    if {"rows", "L"} <= bound.keys():  # the flat regime's rows of L values
        scope["numel"] = bound["rows"] * bound["L"]
        scope["flat_channels"] = flat_channels(bound, grid[0])
    out: dict[tuple[str, str], int] = {}
    for access in model:
        if access.arg not in pointers:
            raise KeyError(f"{name}: MODEL names {access.arg!r}, which is not a pointer argument of the launch")
        if not _evaluate(access.when, scope, name):
            continue
        size = int(_evaluate(access.count, scope, name)) * bound[access.arg].element_size()
        out[(access.arg, access.mode)] = out.get((access.arg, access.mode), 0) + size
    return out


def flat_channels(bound: dict, chunks: int) -> int:
    """Channels the programs of one row split of bn_inference_flat_kernel read:
    channel-inner, their positions are the channels (C in all); channel-strided,
    each reads the CHANNELS channels from its first position's, those below C."""
    if bound["CHANNEL_INNER"]:
        return bound["C"]
    C, S, width = bound["C"], bound["S"], bound["CHANNELS"]
    return sum(min(width, C - j * bound["BLOCK_F"] // S) for j in range(chunks))


def _evaluate(expression: str, scope: dict, kernel: str):
    try:
        return eval(expression, {"__builtins__": {}}, scope)  # our own declarations, not input
    except NameError as error:
        raise KeyError(f"{kernel}: the byte model uses {error}; the kernel's arguments changed") from None


def data_pointers(name: str) -> set[str]:
    """The per-element tensors of a kernel (its loads and stores of the view)."""
    return {a.arg for a in model_for(name) if a.count == VIEW}


# ---------------------------------------------------------------------------
# The operations: one launcher call each, and their minimal traffic.

@dataclass(frozen=True)
class Op:
    """tuned: the config family; reads / writes: per-element tensors at 1 pass
    each; reread: read again by a second pass where a channel's slab (these
    tensors) does not fit on chip."""

    tuned: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    reread: tuple[str, ...]


OPS = {
    "forward": Op("forward", ("x",), ("y",), ("x",)),
    "backward": Op("backward", ("x", "dy"), ("dx",), ("x", "dy")),
    "inference": Op("inference", ("x",), ("y",), ()),
    # fused epilogues: y = relu(bn(x)) (backward: mask recomputed from x) and y = relu(bn(x) + r)
    "forward_relu": Op("forward", ("x",), ("y",), ("x",)),
    "backward_relu": Op("backward", ("x", "dy"), ("dx",), ("x", "dy")),
    "forward_add_relu": Op("forward", ("x", "residual"), ("y",), ("x",)),
    "backward_add_relu": Op("backward", ("x", "dy", "y"), ("dx", "dresidual"), ("x", "dy", "y")),
    "inference_add_relu": Op("inference", ("x", "residual"), ("y",), ()),
}
DEFAULT_OPS = ("forward", "backward", "inference")


def call_op(op: str, x: torch.Tensor, config, momentum: float | None = 0.1) -> None:
    """Run the launcher of ``op`` once on x (meta or real), as nn.BatchNorm2d
    calls it: affine, running stats; the backward after a training forward."""
    from tritonbn import launch
    C, dev = x.shape[1], x.device
    params = dict(device=dev, dtype=torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
    weight, bias, running_mean = (torch.randn(C, **params) for _ in range(3))
    running_var = torch.rand(C, **params) + 0.5
    stats = dict(device=dev, dtype=launch.acc_dtype(x.dtype))
    mean, invstd = torch.randn(C, **stats), torch.rand(C, **stats) + 0.5
    grad = torch.randn_like(x)
    relu, residual = op.endswith("relu"), op.endswith("add_relu")
    if op.startswith("forward"):
        nbt = torch.tensor(1, dtype=torch.long, device=dev)  # not a fill: only the call's own are counted
        launch.forward_training(x, weight, bias, running_mean, running_var, nbt, momentum, 1e-5, config=config,
                                residual=torch.randn_like(x) if residual else None, relu=relu)
    elif op.startswith("inference"):
        launch.forward_inference(x, weight, bias, running_mean, running_var, 1e-5, config=config,
                                 residual=torch.randn_like(x) if residual else None, relu=relu)
    elif op in ("backward", "backward_relu"):
        launch.backward(grad, x, weight, mean, invstd, True, (True, True, True), bias.dtype, config=config,
                        relu_from_input=relu, bias=bias if relu else None)
    elif op == "backward_add_relu":
        launch.backward(grad, x, weight, mean, invstd, True, (True, True, True), bias.dtype, config=config,
                        output=torch.randn_like(x), residual_grad=True)
    else:
        raise ValueError(f"unknown op {op!r}; expected one of {list(OPS)}")


def gpu_config(op: str, x: torch.Tensor, sms: int = H100_SMS):
    """The heuristic's config for op on x, as on a GPU with `sms` SMs."""
    from tritonbn import views
    from tritonbn.autotune import Problem, heuristic
    from tritonbn.autotune import config as config_module
    config_module._sm_count = lambda *args: sms  # what the heuristic would see on that GPU
    config_module._warp_size = lambda *args: 32
    _, view, _ = views.canonical(x)
    problem = Problem(OPS[op].tuned, view.N, view.C, view.S, view.channel_inner, x.dtype, torch.device("cuda", 0))
    return heuristic(problem)


def record(op: str, x: torch.Tensor, config) -> list[Launch]:
    return record_with_fills(op, x, config)[0]


def record_with_fills(op: str, x: torch.Tensor, config) -> tuple[list[Launch], int]:
    """The kernel launches of one call of op, and how many filled tensors
    (torch.zeros, ...: a memset launch of its own on a GPU) the call makes."""
    from tritonbn import counters
    counters.zeroed(x.device, 1)  # the per-stream counters: made (filled) once per process, not per call
    with counting() as made, recording() as log:
        call_op(op, x, config)
    return log, made["fills"]


def minimal_bytes(op: str, x: torch.Tensor) -> tuple[int, int, bool]:
    """(bytes_min, bytes_practical_min, fits): 1 read + 1 write per tensor, and
    that plus the regime's second read where a channel's slab exceeds FIT_BYTES."""
    spec = OPS[op]
    tensor = x.numel() * x.element_size()
    per_channel = tensor // x.shape[1]
    fits = len(spec.reread) * per_channel <= FIT_BYTES
    bytes_min = (len(spec.reads) + len(spec.writes)) * tensor
    return bytes_min, bytes_min + (0 if fits else len(spec.reread) * tensor), fits


# ---------------------------------------------------------------------------
# Compiled kernels: occupancy and access widths.

def programs_per_sm(registers: int, num_warps: int, shared: int) -> int:
    """Co-resident programs on one sm_90 SM, limited by registers (allocated
    per warp in 256-register granules), threads, shared memory (1 KB reserved
    per block) and the 32-block cap."""
    per_warp = math.ceil(registers * 32 / SM90["register_granule"]) * SM90["register_granule"]
    by_registers = SM90["registers"] // max(per_warp * num_warps, 1)
    by_threads = SM90["threads"] // (32 * num_warps)
    by_shared = SM90["shared"] // (shared + SM90["reserved_shared"])
    return min(SM90["blocks"], by_registers, by_threads, by_shared)


def access_widths(name: str, accesses) -> tuple[int | None, int | None]:
    """(narrowest load, narrowest store) in bytes of the kernel's per-element tensors."""
    data = data_pointers(name)
    loads = [w for kind, ptr, w in accesses if kind == "ld" and ptr in data]
    stores = [w for kind, ptr, w in accesses if kind == "st" and ptr in data]
    return min(loads, default=None), min(stores, default=None)


def compile_all(launches: list[Launch], arch: int = ARCH, jobs: int = 1) -> dict:
    """{Variant.key: compile_variant result}, each distinct variant compiled
    once; jobs > 1 compiles in forked worker processes (Linux)."""
    global _PENDING
    variants = {}
    for launch in launches:
        variant = Variant.of(launch)
        variants.setdefault(variant.key, variant)
    _PENDING = list(variants.values())  # what forked workers read, by index
    indices, arches = range(len(_PENDING)), [arch] * len(_PENDING)
    pool = None
    if jobs > 1:
        import concurrent.futures
        import multiprocessing
        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"))
    results = {}
    try:
        outcomes = pool.map(_compile_pending, indices, arches) if pool else map(_compile_pending, indices, arches)
        for key, result in progress_bar(zip(variants, outcomes), f"compiling for sm_{arch}", len(variants)):
            results[key] = result
    finally:
        if pool is not None:
            pool.shutdown()
    return results


_PENDING: list[Variant] = []


def _compile_pending(index: int, arch: int) -> dict:
    return compile_variant(_PENDING[index], arch)


# ---------------------------------------------------------------------------
# Rows.

def kernel_row(launch: Launch, compiled: dict | None, sms: int) -> dict:
    """One launch: its plan, bytes per role, and what the compiler made of it."""
    bound = bind(launch.fn, launch.args, launch.kwargs)
    grid = grid_of(launch, bound)
    name = launch.fn.__name__
    row = dict(kernel=name, blocks=tile_text(bound),
               warps=launch.kwargs.get("num_warps", 4), stages=launch.kwargs.get("num_stages"),
               grid=grid, programs=math.prod(grid),
               **{f"bytes_{role}": 0 for role in ROLE_COLUMNS})
    for (arg, _), size in launch_bytes(launch).items():
        row[f"bytes_{ROLES.get(arg, 'params')}"] += size
    row["bytes"] = sum(row[f"bytes_{role}"] for role in ROLE_COLUMNS)
    row["data"] = bool(data_pointers(name) & set(bound))
    if compiled is not None:
        key = Variant.of(launch).key
        result = compiled[key]
        load, store = access_widths(name, result["accesses"]) if result["ok"] else (None, None)
        per_sm = programs_per_sm(result["registers"], row["warps"], result["shared"]) if result["ok"] else None
        waves = row["programs"] / (sms * per_sm) if per_sm else None
        row.update(registers=result["registers"], spills=result["spill_bytes"], shared=result["shared"],
                   per_sm=per_sm, waves=waves, grid_shape=grid_shape(name, row["programs"], waves, sms),
                   min_load_bytes=load, min_store_bytes=store, error=result["error"])
    return row


# grid shapes, worst last: what the waves target accepts, then not
GRID_SHAPES = ("waves", "one wave", "persistent", "tail", "short")
PERSISTENT = {"bn_fwd_coop_kernel", "bn_bwd_coop_kernel"}  # one program per SM by design


def grid_shape(kernel: str, programs: int, waves: float | None, sms: int) -> str | None:
    """How a launch's programs fill the GPU: "waves" (two waves or more: the
    last one partial at worst half the time), "one wave" (every program
    resident from the start and at least one per SM: no later wave, no tail),
    "persistent" (the cooperative kernels' grid), "tail" (between one and two
    waves: the second wave partly empty) or "short" (fewer programs than SMs)."""
    if waves is None:
        return None
    if kernel in PERSISTENT:
        return "persistent"
    if waves >= 2:
        return "waves"
    if waves > 1:
        return "tail"
    return "one wave" if programs >= sms else "short"


def op_row(op: str, shape, dtype_name: str, layout: str, config, kernels: list[dict], fills: int = 0) -> dict:
    """One summary row; ``launches`` counts the kernels and the fills (memsets) of the call."""
    x = in_layout(torch.empty(shape, dtype=DTYPES[dtype_name], device="meta"), layout)
    bytes_min, bytes_practical, fits = minimal_bytes(op, x)
    total = sum(k["bytes"] for k in kernels)
    N, C, *spatial = shape
    row = dict(N=N, C=C, H=spatial[0] if spatial else 1, W=spatial[1] if len(spatial) > 1 else 1,
               dtype=dtype_name, layout=layout, op=op, regime=config.regime, fits=fits,
               tensor_bytes=x.numel() * x.element_size(),
               blocks=f"{config.block_n}x{config.block_c}x{config.block_s}",
               splits=f"{config.split_n}x{config.split_s}", warps=config.num_warps,
               launches=len(kernels) + fills, fills=fills, kernels="+".join(k["kernel"].removeprefix("bn_").removesuffix("_kernel")
                                                      for k in kernels),
               bytes_model=total, bytes_min=bytes_min, bytes_practical_min=bytes_practical,
               ratio_min=total / bytes_min, ratio_practical=total / bytes_practical,
               **{f"bytes_{r}": sum(k[f"bytes_{r}"] for k in kernels) for r in ROLE_COLUMNS})
    data = [k for k in kernels if k["data"]]
    compiled = kernels and "registers" in kernels[0]
    row.update(_worst(data, compiled))
    for gpu, bandwidth in BANDWIDTH.items():
        row[f"us_model_{gpu}"] = total / bandwidth * 1e6
        row[f"us_min_{gpu}"] = bytes_min / bandwidth * 1e6
    row["misses"] = ",".join(_misses(row, x, compiled))
    return row


def _worst(data: list[dict], compiled: bool) -> dict:
    """Row-level figures: the worst over the kernels that stream the tensors."""
    def pick(key, choose):
        values = [k[key] for k in data if compiled and k.get(key) is not None]
        return choose(values) if values else None

    return dict(registers=pick("registers", max), spills=pick("spills", max), shared=pick("shared", max),
                min_load_bytes=pick("min_load_bytes", min), min_store_bytes=pick("min_store_bytes", min),
                waves=pick("waves", min), grid_shape=pick("grid_shape", lambda v: max(v, key=GRID_SHAPES.index)),
                error="; ".join(k["error"] for k in data if compiled and k.get("error")))


def _misses(row: dict, x: torch.Tensor, compiled: bool) -> list[str]:
    """The targets this row misses (loads: where alignment permits)."""
    misses = []
    if row["ratio_practical"] > 1.05:
        misses.append("bytes")
    if not compiled:
        return misses
    aligned = (row["layout"] == "channels_last" or row["op"] == "inference"
               or (x[0, 0].numel() * x.element_size()) % 16 == 0)
    if row["spills"]:
        misses.append("spills")
    if aligned and (row["min_load_bytes"] or 0) < 8:
        misses.append("loads")
    if row["grid_shape"] in ("tail", "short"):
        misses.append("waves")
    if row["error"]:
        misses.append("compile")
    return misses


def report(items, compile_kernels: bool, sms: int = H100_SMS, jobs: int = 1) -> tuple[list[dict], list[list[dict]]]:
    """(rows, kernel rows per row) for (shape, dtype, layout, op) items."""
    recorded = []
    for shape, dtype_name, layout, op in items:
        x = in_layout(torch.empty(shape, dtype=DTYPES[dtype_name], device="meta"), layout)
        config = gpu_config(op, x, sms)
        recorded.append((shape, dtype_name, layout, op, config, *record_with_fills(op, x, config)))
    launches = [launch for *_, log, _ in recorded for launch in log]
    compiled = compile_all(launches, jobs=jobs) if compile_kernels else None
    rows, plans = [], []
    for shape, dtype_name, layout, op, config, log, fills in recorded:
        kernels = [kernel_row(launch, compiled, sms) for launch in log]
        rows.append(op_row(op, shape, dtype_name, layout, config, kernels, fills))
        plans.append(kernels)
    return rows, plans


# ---------------------------------------------------------------------------
# Output.

_SUMMARY = ["N", "C", "H", "W", "dtype", "layout", "op", "regime", "blocks", "splits", "launches",
            "ratio_min", "ratio_practical", "partials_x", "registers", "spills", "min_load_bytes", "waves",
            "us_model_h100", "us_min_h100", "misses"]
_PLAN = ["kernel", "blocks", "warps", "stages", "grid", "programs", "registers", "spills", "shared", "per_sm", "waves",
         "grid_shape", "min_load_bytes", "min_store_bytes", "bytes_x", "bytes_y", "bytes_dy", "bytes_dx", "bytes_partials",
         "bytes_params"]


def print_report(rows, plans, out=sys.stdout) -> None:
    import pandas as pd
    for row, kernels in zip(rows, plans):
        out.write(f"\n{row['N']}x{row['C']}x{row['H']}x{row['W']} {row['dtype']} {row['layout']} {row['op']}: "
                  f"{row['regime']} {row['blocks']} splits {row['splits']} warps {row['warps']}; "
                  f"{row['bytes_model'] / 1e6:.2f} MB = {row['ratio_min']:.2f}x min, "
                  f"{row['ratio_practical']:.2f}x practical min; {row['us_model_h100']:.1f} us at H100 "
                  f"bandwidth (ideal {row['us_min_h100']:.1f})\n")
        out.write(_text(pd.DataFrame(kernels), _PLAN) + "\n")
    out.write("\n" + _text(summary(rows), _SUMMARY) + "\n")


def _text(table, columns) -> str:
    table = table[[c for c in columns if c in table]].copy()
    for column in ("stages", "registers", "spills", "shared", "per_sm", "min_load_bytes", "min_store_bytes"):
        if column in table:  # whole numbers, blank where unknown
            table[column] = ["-" if v is None or v != v else int(v) for v in table[column]]
    return table.to_string(index=False, float_format="{:.2f}".format, na_rep="-")


def summary(rows):
    import pandas as pd
    table = pd.DataFrame(rows)
    table["partials_x"] = table.bytes_partials / table.tensor_bytes  # partials requested, in x's sizes
    return table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="an explicit shape, e.g. 256,64,56,56 (repeatable)")
    parser.add_argument("--batches", type=lambda s: tuple(int(v) for v in s.split(",")), default=RESNET50_BATCHES,
                        help="batch sizes of the ResNet-50 shapes (default 32,64,256)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--ops", nargs="+", choices=list(OPS), default=list(DEFAULT_OPS))
    parser.add_argument("--sms", type=int, default=H100_SMS, help="SM count the heuristic assumes (default 132)")
    parser.add_argument("--no-compile", action="store_true", help="bytes and plans only (fast; no registers, "
                        "spills, load widths or waves)")
    parser.add_argument("--csv", type=str, help="also write one row per (shape, dtype, layout, op) here")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    parser.add_argument("--quiet", action="store_true", help="the summary table only, no per-kernel plans")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.no_compile and os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the report compiles the kernels (or pass --no-compile)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    shapes = select_shapes(args.shape, ["resnet50"], args.batches)
    layouts = {len(s): [l for l in args.layouts if l == "contiguous" or len(s) in (4, 5)] for s in shapes}
    items = [(s, d, l, op) for s in shapes for d in args.dtypes for l in layouts[len(s)] for op in args.ops]
    rows, plans = report(items, not args.no_compile, args.sms, args.jobs)
    if args.quiet:
        print(_text(summary(rows), _SUMMARY))
    else:
        print_report(rows, plans)
    if args.csv:
        summary(rows).to_csv(args.csv, index=False)
        print(f"{len(rows)} rows written to {args.csv}")
    training = [r["launches"] for r in rows if r["op"].startswith(("forward", "backward"))]
    if training:
        print(f"launches per training call (forward and backward rows, fills included): "
              f"{sum(training) / len(training):.2f} mean over {len(training)} rows")
    missed = sum(bool(r["misses"]) for r in rows)
    print(f"{len(rows)} rows, {missed} miss a target; {time.perf_counter() - start:.0f} s",
          file=sys.stderr)
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
