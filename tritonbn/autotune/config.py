"""Launch settings: what a kernel launch needs beyond its tensors, and the plain
heuristic that chooses them without measuring anything.

A ``Problem`` names one kernel family on one canonical (N, C, S) view; a
``LaunchConfig`` says how to run it. The heuristic always gives a valid,
reasonable config; the tuner (tritonbn.autotune.tuner) only improves on it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import asdict, dataclass

import torch

OPS = ("forward", "backward", "inference")
REGIMES = ("resident", "cooperative", "split", "flat")

# Largest tile a resident program may hold in registers, in elements, at 16
# warps. Measured with python -m bench.traffic (sm_90, the launch's own
# specialization): the forward's 16384 (a 7x7 channel at batch 256, a 14x14
# one at batch 64) compile with 121-128 registers and no spill; the backward
# holds x and dy: 8192 channel-strided compile with 94-104 registers and no
# spill (channel-inner, the fused epilogue's 16-bit variants spill 4-16
# bytes there: 4096); 16384 spill in float32, and in the fused epilogue's
# 16-bit variants (40-84 bytes at 16 or 32 warps).
RESIDENT_LIMIT = {"forward": 16384, "backward": 8192, "inference": 0}
RESIDENT_LIMIT_CHANNEL_INNER_BACKWARD = 4096
# A channel's slab (x; x and dy in the backward) up to this many bytes is read
# once: by one resident program, or by the cooperative regime's group of
# programs (each holding a tile of the sizes above), which exchange partials.
FIT_BYTES = 192 * 1024
# Tile elements of one cooperative program, measured as above: the backward
# keeps g and x - mean across the exchange, and spilled 16-28 bytes at 8192
# (16 or 32 warps); 4096 compile with 64-121 registers and no spill, except
# channel-inner float32 (8 bytes at 16 warps): 2048 there. The forward's
# channel-inner float32 variants with a fused residual spilled 8-20 bytes at
# 16384 (bench.kernel_report --ops fused): 8192 there.
# With the hand-over path (kernels/cooperative.py: wait_or_hand_over) the forward's
# 16384-value tiles spilled 8 bytes at 128 registers for (N, C) inputs
# (16-bit) and channel-strided float32 with a fused residual: 8192 there.
COOPERATIVE_LIMIT = {"forward": 16384, "backward": 4096}
COOPERATIVE_LIMIT_CHANNEL_INNER_FP32 = {"forward": 8192, "backward": 2048}
COOPERATIVE_LIMIT_FORWARD_HAND_OVER = 8192


def _cooperative_limit(problem: Problem) -> int:
    if problem.channel_inner and problem.dtype.itemsize > 2:
        return COOPERATIVE_LIMIT_CHANNEL_INNER_FP32[problem.op]
    if problem.op == "forward" and (problem.dtype.itemsize > 2 or problem.S == 1):
        return COOPERATIVE_LIMIT_FORWARD_HAND_OVER
    return COOPERATIVE_LIMIT[problem.op]


# Elements per tile of a looping program, and the number of programs a split
# grid aims for, per streaming multiprocessor: at the 4-8 programs of 4-8
# warps an SM holds (bench.traffic's occupancy), about two waves or more.
TILE = 2048
PROGRAMS_PER_SM = 16
# The interpreter pays ~10 ms per program and ~5 ms per loop step whatever
# the block size, so there the heuristic picks few, large tiles.
INTERPRETER_TILE = 16384
INTERPRETER_RESIDENT_LIMIT = 65536
MAX_SPLITS = 1024
# Tile elements one thread may hold without spilling registers, measured with
# `python -m bench.kernel_report --candidates` (sm_90): the split kernels keep
# three Welford accumulators per element (32 per thread spilled, 16 did not),
# the resident forward holds x and x - mean, the resident backward x and dy;
# the flat inference pass keeps nothing across its loop.
MAX_ELEMENTS_PER_THREAD = {"split": 16, "flat": 32, "resident forward": 32, "resident backward": 16}


@dataclass(frozen=True)
class Problem:
    """One kernel family on one canonical view: the key a config is chosen for."""

    op: str              # "forward" (training), "backward" or "inference"
    N: int
    C: int
    S: int
    channel_inner: bool  # True: channel stride 1 (channels_last, 2-D); False: spatial stride 1
    dtype: torch.dtype
    device: torch.device

    @property
    def layout(self) -> str:
        return "channel_inner" if self.channel_inner else "channel_strided"


@dataclass(frozen=True)
class LaunchConfig:
    """Block shape, grid split and warps for one launch.

    regime "resident" (forward/backward only) holds a whole channel block in
    one tile: block_n >= N and block_s >= S, split_n == split_s == 1.
    regime "split" loops over tiles; the grid is
    (cdiv(C, block_c), split_n, split_s), each program taking an equal run of
    whole tiles along N and along S.
    regime "cooperative" (forward/backward only) holds a channel block in
    split_n x split_s programs of one tile each (split_n = cdiv(N, block_n),
    split_s = cdiv(S, block_s)). The launcher runs a persistent grid of at
    most one program per SM (tritonbn.plans.cooperative_grid).
    regime "flat" (inference only) reads the tensor as rows of contiguous
    values (kernels/inference.py: a sample's C * S values channel-strided, a
    pixel's C channels channel-inner): tiles of block_n rows by block_s
    values, grid (cdiv(row length, block_s), split_n), each program taking
    an equal run of whole row tiles; block_c and split_s are 1. A tensor that
    cannot be read as such rows takes the split regime instead.
    """

    regime: str
    block_n: int
    block_c: int
    block_s: int
    split_n: int = 1
    split_s: int = 1
    num_warps: int = 4

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LaunchConfig":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def validate(self, problem: Problem) -> None:
        """Raise ValueError naming the first thing that makes this config unusable."""
        if self.regime not in REGIMES:
            raise ValueError(f"unknown regime {self.regime!r}; expected one of {REGIMES}")
        for name in ("block_n", "block_c", "block_s", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.split_n < 1 or self.split_s < 1:
            raise ValueError(f"splits must be >= 1, got ({self.split_n}, {self.split_s})")
        if self.regime == "flat":
            if problem.op != "inference":
                raise ValueError(f"the flat regime is for inference only, not {problem.op}")
            if self.block_c != 1 or self.split_s != 1:
                raise ValueError(f"a flat config has block_c == split_s == 1, got block_c={self.block_c}, "
                                 f"split_s={self.split_s}")
        if self.regime == "cooperative":
            if problem.op == "inference":
                raise ValueError("inference has no cooperative regime")
            if (cdiv(problem.N, self.block_n), cdiv(problem.S, self.block_s)) != (self.split_n, self.split_s):
                raise ValueError(
                    f"cooperative config (block_n={self.block_n}, block_s={self.block_s}, "
                    f"split_n={self.split_n}, split_s={self.split_s}) does not give one tile per program "
                    f"over N={problem.N}, S={problem.S}: needs split_n == cdiv(N, block_n) and "
                    f"split_s == cdiv(S, block_s)")
        if self.regime == "resident":
            if problem.op == "inference":
                raise ValueError("inference has no resident regime")
            if self.block_n < problem.N or self.block_s < problem.S:
                raise ValueError(
                    f"resident config ({self.block_n} x {self.block_s}) does not cover "
                    f"N={problem.N}, S={problem.S}")


# Host-side integer helpers in plain Python: triton.cdiv / next_power_of_2
# carry a few microseconds of wrapper overhead each, on every launch.
def next_power_of_2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else 0).multi_processor_count
    return 1


@functools.lru_cache(maxsize=None)
def _warp_size(device_type: str, index: int | None) -> int:
    """Threads per warp: 32 on NVIDIA, 64 on most AMD GPUs (Triton's num_warps counts those)."""
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(index if index is not None else 0)
        return getattr(props, "warp_size", 32)
    return 32


def _num_warps(tile_elements: int) -> int:
    return max(1, min(16, next_power_of_2(tile_elements // 256)))


def _blocks(problem: Problem, tile: int) -> tuple[int, int, int]:
    """(block_n, block_c, block_s) for a tile of about `tile` elements.

    channel-inner: channels along the contiguous axis (32 of them = 128 B of
    fp32 per row), then spatial, then batch rows. channel-strided: the
    contiguous spatial run first, then batch rows, and several channels per
    program only when one channel's plane is small.
    """
    N, C, S = problem.N, problem.C, problem.S
    if problem.channel_inner:
        block_c = min(next_power_of_2(C), 32 if tile <= TILE else 64)
        block_s = min(next_power_of_2(S), max(1, tile // block_c))
        block_n = min(next_power_of_2(N), max(1, tile // (block_c * block_s)))
    else:
        block_s = min(next_power_of_2(S), tile)
        block_n = min(next_power_of_2(N), max(1, tile // block_s))
        block_c = min(next_power_of_2(C), max(1, tile // (block_n * block_s)))
    return block_n, block_c, block_s


def _resident(problem: Problem, limit: int) -> LaunchConfig | None:
    N, C, S = problem.N, problem.C, problem.S
    block_n, block_s = next_power_of_2(N), next_power_of_2(S)
    if block_n * block_s > limit:
        return None
    block_c = 1
    if problem.channel_inner:
        # channels are the contiguous axis: fewer than 8 per row wastes most of each 32 B sector
        block_c = min(next_power_of_2(C), 32, limit // (block_n * block_s))
        if block_c < min(next_power_of_2(C), 8):
            return None
    elif block_n * block_s < 1024:
        # small planes: several channels per program
        block_c = min(next_power_of_2(C), 16, limit // (block_n * block_s))
    return LaunchConfig("resident", block_n, block_c, block_s,
                        num_warps=_num_warps(block_n * block_c * block_s))


def slab_fits(problem: Problem) -> bool:
    """Whether one channel's slab (x; x and dy for the backward) is at most FIT_BYTES."""
    tensors = 2 if problem.op == "backward" else 1
    return tensors * problem.N * problem.S * problem.dtype.itemsize <= FIT_BYTES


def cooperative_enabled() -> bool:
    """TRITONBN_COOPERATIVE=0 keeps the heuristic, the tuner and cached
    entries off the cooperative regime: for a GPU shared so that a process
    may get fewer SMs than the device has (MPS with an active-thread
    percentage, green contexts), where a group's programs might not all be
    resident at once."""
    return os.environ.get("TRITONBN_COOPERATIVE", "1") != "0"


def _cooperative(problem: Problem, limit: int, sms: int) -> LaunchConfig | None:
    """A channel block over the programs of a [split_n, split_s] grid of
    `limit`-element tiles, whole planes where they fit (channel-inner: 32 bytes
    of channels per row, one sector). None where a group would be one program
    (the resident regime) or more programs than SMs (they must be co-resident)."""
    if not cooperative_enabled():
        return None
    N, C, S = problem.N, problem.C, problem.S
    block_c = min(next_power_of_2(C), max(1, 32 // problem.dtype.itemsize)) if problem.channel_inner else 1
    block_s = min(next_power_of_2(S), max(1, limit // block_c))
    block_n = min(next_power_of_2(N), max(1, limit // (block_s * block_c)))
    split_n, split_s = cdiv(N, block_n), cdiv(S, block_s)
    if not 2 <= split_n * split_s <= sms:
        return None
    warps = _num_warps(block_n * block_c * block_s)
    if problem.op == "backward" and S == 1:
        # (N, C) inputs: at 16 warps ptxas kept a value in local memory (4
        # bytes at 40-64 registers, bench.kernel_report); 8 do not spill
        warps = min(warps, 8)
    return LaunchConfig("cooperative", block_n, block_c, block_s, split_n=split_n, split_s=split_s,
                        num_warps=warps)


def _resident_limit(problem: Problem) -> int:
    if problem.op == "backward" and problem.channel_inner:
        return RESIDENT_LIMIT_CHANNEL_INNER_BACKWARD
    return RESIDENT_LIMIT[problem.op]


def _split(problem: Problem, tile: int, target_programs: int) -> LaunchConfig:
    block_n, block_c, block_s = _blocks(problem, tile)
    channel_blocks = cdiv(problem.C, block_c)
    tiles_n = cdiv(problem.N, block_n)
    tiles_s = cdiv(problem.S, block_s)
    want = min(MAX_SPLITS, max(1, cdiv(target_programs, channel_blocks)))
    split_n = min(tiles_n, want)
    split_s = min(tiles_s, cdiv(want, split_n))
    if not problem.channel_inner:
        # whole tiles per program rounded down, so that the grid
        # (plans.grid_split) has at least the programs asked for: 32 tiles over
        # 9 wanted splits is 11 programs of 3 tiles, not 8 of 4. (Channel-inner
        # programs each re-read 32 channels' parameters and write 32 channels'
        # partials: there the rounding up of tiles per program stays.)
        split_n = cdiv(tiles_n, tiles_n // split_n)
        split_s = cdiv(tiles_s, tiles_s // split_s)
    return LaunchConfig("split", block_n, block_c, block_s, split_n, split_s,
                        num_warps=_num_warps(block_n * block_c * block_s))


# The flat inference pass (regime "flat"): values per tile (16 per thread at
# 8 warps: two 16-byte loads of 16-bit data in flight per thread), and the
# registers per thread assumed when sizing its grid to one wave (bench.traffic
# measures the kernel's own: under this, every program is resident at once).
FLAT_TILE = 4096
FLAT_REGISTERS = 64
# Values of a row per tile: channel-inner, 64 channels (128 bytes of 16-bit
# data); channel-strided, 1024 (a program keeps each position's scale and
# shift in registers across its loop: 4096 took 53-64 registers).
FLAT_ROW = {"channel_inner": 64, "channel_strided": 1024}
# Most of a program's traffic its per-channel vectors (running mean and var,
# weight, bias: 16 bytes a channel) may be; it sets the fewest rows a program
# streams (bench.traffic's bytes target: 1.05 x the minimal bytes, the saved
# statistics included), so that small tensors are not spread thinner than that.
FLAT_PARAMETER_SHARE = 0.045


def flat_rows(problem: Problem) -> tuple[int, int]:
    """(rows, values per row) of the flat regime's view of the problem."""
    if problem.channel_inner:
        return problem.N * problem.S, problem.C
    return problem.N, problem.C * problem.S


def _programs_per_sm(num_warps: int, registers: int) -> int:
    warp = 32
    return max(1, min(2048 // (warp * num_warps), 65536 // (registers * warp * num_warps)))


def _flat(problem: Problem, tile: int, sms: int) -> LaunchConfig:
    """Tiles of rows by FLAT_ROW contiguous values (on a GPU); a grid of one
    wave where the tensor allows (every program resident from the start,
    each streaming an equal run of row tiles, no tail), at least two where
    the row chunks alone pass one wave, and no program streaming so few rows
    that its per-channel vectors pass FLAT_PARAMETER_SHARE of its bytes."""
    rows, length = flat_rows(problem)
    width = FLAT_ROW[problem.layout] if problem.device.type == "cuda" else tile
    block_s = min(next_power_of_2(length), width)
    block_n = min(next_power_of_2(rows), max(1, tile // block_s))
    num_warps = _num_warps(block_n * block_s // 2)
    chunks, row_tiles = cdiv(length, block_s), cdiv(rows, block_n)
    channels = block_s if problem.channel_inner else block_s // problem.S + 2
    parameter_bytes, value_bytes = 16 * channels, 2 * problem.dtype.itemsize * block_s
    fewest_rows = math.ceil(parameter_bytes / (FLAT_PARAMETER_SHARE * value_bytes))
    if problem.device.type != "cuda":
        splits = 1
    elif chunks <= sms * _programs_per_sm(num_warps, FLAT_REGISTERS):  # one wave at most
        splits = sms * _programs_per_sm(num_warps, FLAT_REGISTERS) // chunks
    else:  # two waves or more, however few registers the kernel takes
        splits = cdiv(2 * sms * _programs_per_sm(num_warps, 1), chunks)
    splits = max(1, min(splits, row_tiles, rows // fewest_rows))
    # fewer rows per tile (and warps) where whole tiles per program would leave
    # SMs without a program; not below 1024 values, which keep 16 bytes per
    # thread in flight (the grid's bytes in flight matter more than its shape)
    while (problem.device.type == "cuda" and block_n > 1 and block_n * block_s > 1024
           and chunks * cdiv(rows, cdiv(cdiv(rows, block_n), splits) * block_n) < sms):
        block_n //= 2
    return LaunchConfig("flat", block_n, 1, block_s, split_n=splits,
                        num_warps=min(num_warps, _num_warps(block_n * block_s // 2)))


def heuristic(problem: Problem, allow_resident: bool = True, allow_flat: bool = True) -> LaunchConfig:
    """A config from shape alone: no timing, no cache. allow_resident=False:
    the split regime (SyncBatchNorm merges split partials across processes).
    allow_flat=False: inference in the split regime (a tensor the flat
    regime cannot read as rows)."""
    if problem.op == "inference":
        if allow_flat:
            sms = _sm_count(problem.device.type, problem.device.index)
            return _flat(problem, FLAT_TILE if problem.device.type == "cuda" else INTERPRETER_TILE, sms)
        allow_resident = False
    if problem.device.type != "cuda":  # the Triton interpreter
        resident = _resident(problem, INTERPRETER_RESIDENT_LIMIT) if allow_resident else None
        return resident or _split(problem, INTERPRETER_TILE, target_programs=1)
    sms = _sm_count(problem.device.type, problem.device.index)
    if allow_resident:
        limit = _resident_limit(problem)
        resident = _resident(problem, limit)
        # one program per channel block is enough when that fills the GPU,
        # or when the whole problem is small enough that launches dominate
        numel = problem.N * problem.C * problem.S
        if resident is not None and (
                cdiv(problem.C, resident.block_c) >= sms or numel <= (1 << 20)):
            return resident
        cooperative = _cooperative(problem, _cooperative_limit(problem), sms) if slab_fits(problem) else None
        if cooperative is not None:
            return cooperative
    return _split(problem, TILE, target_programs=PROGRAMS_PER_SM * sms)


def regime_config(problem: Problem, regime: str, sms: int | None = None) -> LaunchConfig | None:
    """The heuristic's config of one regime for the problem, None where that
    regime cannot run it (no resident regime for a slab past the register
    budget, no cooperative one past FIT_BYTES or past `sms` programs per
    group): the configs a regime comparison sets side by side. sms: the SM
    count a cooperative group must fit in (default: the device's; on the
    interpreter, whose programs run one after another, any)."""
    sms = sms or _sm_count(problem.device.type, problem.device.index)
    cuda = problem.device.type == "cuda"
    if problem.op == "inference":
        if regime == "flat":
            return _flat(problem, FLAT_TILE if cuda else INTERPRETER_TILE, sms)
        return heuristic(problem, allow_flat=False) if regime == "split" else None
    if regime == "resident":
        return _resident(problem, _resident_limit(problem) if cuda else INTERPRETER_RESIDENT_LIMIT)
    if regime == "cooperative":
        return _cooperative(problem, _cooperative_limit(problem), sms) if slab_fits(problem) else None
    return heuristic(problem, allow_resident=False) if regime == "split" else None


def _fits(config: LaunchConfig, problem: Problem) -> bool:
    """Whether one program of this config stays within the device's limits:
    at most 1024 threads per block, and a tile share per thread that fits in
    registers."""
    warp = _warp_size(problem.device.type, problem.device.index)
    tile = config.block_n * config.block_c * config.block_s
    per_thread = tile / (warp * config.num_warps)
    return config.num_warps * warp <= 1024 and per_thread <= _per_thread_limit(config, problem)


def _per_thread_limit(config: LaunchConfig, problem: Problem) -> int:
    if config.regime in ("split", "flat"):
        return MAX_ELEMENTS_PER_THREAD[config.regime]
    # resident and cooperative programs hold one tile
    return MAX_ELEMENTS_PER_THREAD[f"resident {problem.op}"]


def candidates(problem: Problem) -> list[LaunchConfig]:
    """The tuner's search space, the heuristic's choice first: the resident
    regime at several register budgets where a channel block fits (inference:
    flat grids of three tile sizes), and split grids of small and large tiles
    filling the GPU 2 or 8 programs deep, each with two warp counts.
    Deduplicated and filtered by _fits."""
    sms = _sm_count(problem.device.type, problem.device.index)
    found = [heuristic(problem)]
    if problem.op == "inference":
        for tile in (2048, FLAT_TILE, 8192):
            flat = _flat(problem, tile, sms)
            found += [dataclasses.replace(flat, num_warps=w) for w in (4, 8)]
    else:
        for limit in (2048, 4096, 8192, 16384):
            resident = _resident(problem, limit)
            if resident is not None:
                found += [dataclasses.replace(resident, num_warps=w) for w in (4, 8, 16)]
            cooperative = _cooperative(problem, limit, sms) if problem.device.type == "cuda" else None
            if cooperative is not None and limit <= _cooperative_limit(problem):
                found += [dataclasses.replace(cooperative, num_warps=w) for w in (8, 16)]
    for tile in (1024, 4096):
        for per_sm in (2, 8):
            split = _split(problem, tile, per_sm * sms)
            # 16 warps caps registers at 64 per thread: the loops then spill
            found += [dataclasses.replace(split, num_warps=w) for w in (4, 8)]
    unique = list(dict.fromkeys(found))
    return [unique[0]] + [c for c in unique[1:] if _fits(c, problem)]
