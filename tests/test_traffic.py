"""bench/traffic.py's byte model against the bytes the kernels really touch.

The launchers run small shapes on the Triton interpreter, in every regime
(resident, cooperative and split; inference split and flat), both layouts,
forward / backward / inference and the fused ReLU / residual epilogues, with every launch going through a spy that runs the
kernel while the interpreter's loads and stores are counted: each element a
tl.load or tl.store touches (masked-off lanes excluded; a repeated access
counts again), attributed to the launch's tensor arguments by address. The
model of the same recorded launch must give the same bytes per tensor and
direction. An access outside every argument fails the test too.

Also: the command line on one shape without compiling (CSV columns), and one
compiled row (interpreter off, in a subprocess) checking that the real
launch specialization gives an aligned NCHW bf16 shape 16-byte loads.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from triton.runtime import interpreter

from bench import traffic
from bench.kernel_report import Launch, bind, recording
from tritonbn import distributed
from tritonbn import launch as launcher
from tritonbn.autotune import LaunchConfig

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counts the interpreter's loads and stores")

SHAPE = (4, 6, 5, 5)  # C=6 in blocks of 4: a half-masked channel block; S=25: a masked spatial tail
RESIDENT = LaunchConfig("resident", 4, 4, 32, num_warps=4)
# grid (2, 2, 2): P = 4 partials per channel, two loop steps per program
SPLIT = LaunchConfig("split", 2, 4, 8, split_n=2, split_s=2, num_warps=4)
# two programs per channel block, one group (the interpreter's) taking both blocks
COOPERATIVE = LaunchConfig("cooperative", 2, 4, 32, split_n=2, num_warps=4)
# channel-strided: rows of 150 values in 5 chunks of 32, each reading 4
# channels (the last one 1: C=6); channel-inner: 100 rows of 6, two per split
FLAT = LaunchConfig("flat", 2, 1, 32, split_n=2, num_warps=4)
CONFIGS = {"resident": RESIDENT, "split": SPLIT, "cooperative": COOPERATIVE, "flat": FLAT}
INFERENCE = ("split", "flat")


class _Counter:
    """Bytes loaded and stored per group of aliasing arguments, for the launch
    being run."""

    def __init__(self):
        self.groups, self.counts = None, None

    def start(self, launch: Launch) -> None:
        self.groups = _groups(bind(launch.fn, launch.args, launch.kwargs))
        self.counts = {}

    def add(self, mode: str, ptrs, mask) -> None:
        if self.groups is None:
            return
        addresses = ptrs.data.astype(np.uint64).ravel()
        live = np.broadcast_to(mask.data, ptrs.data.shape).ravel().astype(bool)
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        seen = 0
        for label, (lo, hi) in self.groups.items():
            hits = int((live & (addresses >= lo) & (addresses < hi)).sum())
            seen += hits
            if hits:
                self.counts[(label, mode)] = self.counts.get((label, mode), 0) + hits * size
        if seen < live.sum():
            self.counts[("outside every argument", mode)] = int(live.sum() - seen) * size


def _span(t: torch.Tensor) -> tuple[int, int]:
    extent = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1 if t.numel() else 0
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _groups(bound: dict) -> dict[str, tuple[int, int]]:
    """Arguments whose memory overlaps (a dummy standing for an absent tensor
    is another argument) merged into one labelled address range."""
    spans = sorted((_span(v), k) for k, v in bound.items() if isinstance(v, torch.Tensor))
    merged: list[list] = []
    for (lo, hi), name in spans:
        if merged and lo < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
            merged[-1][2].append(name)
        else:
            merged.append([lo, hi, [name]])
    return {"/".join(sorted(names)): (lo, hi) for lo, hi, names in merged}


@pytest.fixture
def counted(monkeypatch):
    """(log, per-launch counts): launches made inside run and measured."""
    counter = _Counter()
    builder = interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store

    def counting_load(self, ptrs, mask, *rest):
        counter.add(traffic.READ, ptrs, mask)
        return load(self, ptrs, mask, *rest)

    def counting_store(self, ptrs, value, mask, *rest):
        counter.add(traffic.WRITE, ptrs, mask)
        return store(self, ptrs, value, mask, *rest)

    monkeypatch.setattr(builder, "create_masked_load", counting_load)
    monkeypatch.setattr(builder, "create_masked_store", counting_store)
    measured = []

    class Spy:
        def __init__(self, kernel, log):
            self.kernel, self.log = kernel, log

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launch = Launch(self.kernel, grid, args, kwargs)
                self.log.append(launch)
                counter.start(launch)
                try:
                    self.kernel[grid](*args, **kwargs)
                finally:
                    measured.append(counter.counts)
                    counter.groups = None
            return run

    def run(fn):
        measured.clear()
        with recording(wrap=Spy) as log:
            fn()
        return list(zip(log, measured))
    return run


def _modeled(launch: Launch) -> dict:
    """The model's bytes, keyed like the counter's."""
    groups = _groups(bind(launch.fn, launch.args, launch.kwargs))
    label_of = {name: label for label in groups for name in label.split("/")}
    out = {}
    for (arg, mode), size in traffic.launch_bytes(launch).items():
        key = (label_of[arg], mode)
        out[key] = out.get(key, 0) + size
    return {k: v for k, v in out.items() if v}


def _check(results) -> None:
    assert results, "no launch recorded"
    for launch, measured in results:
        assert _modeled(launch) == measured, f"{launch.fn.__name__}: model != interpreter (bytes per tensor)"


CASES = [(op, regime) for op in traffic.OPS for regime in CONFIGS
         if (regime in INFERENCE if op.startswith("inference") else regime != "flat")]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op,regime", CASES)
def test_model_matches_interpreter_bf16(counted, op, regime, layout):
    x = _input(torch.bfloat16, layout)
    _check(counted(lambda: traffic.call_op(op, x, CONFIGS[regime])))


@pytest.mark.parametrize("op,regime", [c for c in CASES if c[0] in traffic.DEFAULT_OPS])
def test_model_matches_interpreter_fp32(counted, op, regime):
    x = _input(torch.float32, "contiguous")
    _check(counted(lambda: traffic.call_op(op, x, CONFIGS[regime])))


@pytest.mark.parametrize("config", [RESIDENT, SPLIT, COOPERATIVE], ids=["resident", "split", "cooperative"])
def test_model_matches_interpreter_cumulative_average(counted, config):
    """momentum=None: one read of num_batches_tracked per channel block."""
    x = _input(torch.bfloat16, "channels_last")
    results = counted(lambda: traffic.call_op("forward", x, config, momentum=None))
    _check(results)
    reads = sum(traffic.launch_bytes(launch).get(("NumBatchesTracked", traffic.READ), 0)
                for launch, _ in results)
    assert reads == 8 * 2  # two channel blocks


@pytest.mark.parametrize("regime", INFERENCE)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_model_matches_interpreter_without_saved_statistics(counted, regime, layout):
    """Inference that needs no gradient writes neither save_mean nor save_invstd."""
    x = _input(torch.bfloat16, layout)
    C = x.shape[1]
    params = [torch.randn(C), torch.randn(C), torch.randn(C), torch.rand(C) + 0.5]
    results = counted(lambda: launcher.forward_inference(x, *params, 1e-5, config=CONFIGS[regime],
                                                         keep_stats=False))
    _check(results)
    (launch, measured), = results
    assert [label for label, mode in measured if mode == traffic.WRITE] == ["Y"], measured


def test_model_matches_interpreter_sync_batch_norm(counted):
    """SyncBatchNorm's launches: local partials, the merge kernel, statistics
    from gathered partials, the backward's local sums and dx from means."""
    x = _input(torch.float32, "contiguous")
    C = x.shape[1]
    weight, bias = torch.randn(C), torch.randn(C)
    running = [torch.zeros(C), torch.ones(C)]
    mean, invstd = torch.randn(C), torch.rand(C) + 0.5

    def run():
        stats = distributed.local_stats(x)
        gathered = torch.stack([stats, stats], dim=1)  # [3, 2 processes, C]
        distributed.forward_training_from_stats(x, gathered, weight, bias, *running, None, 0.1, 1e-5)
        distributed.forward_training_from_stats(x[:0], gathered, weight, bias, *running, None, 0.1, 1e-5)
        distributed.backward_local_sums(torch.randn_like(x), x, mean, invstd)
        distributed.backward_input_from_means(torch.randn_like(x), x, weight, mean, invstd, torch.randn(2, C))

    results = counted(run)
    _check(results)
    assert "bn_fwd_merge_kernel" in {launch.fn.__name__ for launch, _ in results}


def test_partials_are_merged_once():
    """The split regime's partials are read once per channel (by the last
    program of each channel block in the statistics / sums kernel), not by
    each of the P programs of a channel block (P^2); 2 launches a call."""
    x = torch.empty(SHAPE, dtype=torch.float32, device="meta")
    P = SPLIT.split_n * SPLIT.split_s
    stats, normalize = traffic.record("forward", x, SPLIT)
    assert traffic.launch_bytes(stats)[("Partials", traffic.READ)] == 3 * P * SHAPE[1] * 4
    assert ("Partials", traffic.READ) not in traffic.launch_bytes(normalize)
    sums, dx = traffic.record("backward", x, SPLIT)
    assert traffic.launch_bytes(sums)[("Partials", traffic.READ)] == 2 * P * SHAPE[1] * 4
    assert traffic.launch_bytes(dx)[("Sums", traffic.READ)] == 2 * SHAPE[1] * P * 4


def test_unknown_kernel_fails_loudly():
    with pytest.raises(KeyError, match="no byte model"):
        traffic.model_for("bn_new_kernel")


def test_cli_without_compiling(tmp_path):
    out = tmp_path / "traffic.csv"
    assert traffic.main(["--shape", "32,64,56,56", "--no-compile", "--quiet", "--csv", str(out)]) == 0
    table = pd.read_csv(out)
    required = ["N", "C", "H", "W", "dtype", "layout", "op", "regime", "launches", "bytes_model", "bytes_min",
                "bytes_practical_min", "spills", "min_load_bytes", "waves", "us_model_h100"]
    assert set(required) <= set(table.columns)
    assert len(table) == 2 * 2 * 3  # dtypes x layouts x ops
    assert (table.bytes_model >= table.bytes_min).all()
    assert (table.bytes_practical_min >= table.bytes_min).all()
    inference = table[table.op == "inference"]
    assert (inference.bytes_min == 2 * inference.tensor_bytes).all()


def test_compiled_row_gets_wide_loads_with_the_launch_specialization(tmp_path):
    """NCHW bf16 at S=3136 is 16-byte aligned per channel: with the hints
    Triton's JIT derives from the launch, every kernel loads >= 8 bytes."""
    out = tmp_path / "row.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "bench.traffic", "--shape", "256,64,56,56", "--dtypes", "bf16",
                             "--layouts", "contiguous", "--quiet", "--csv", str(out)],
                            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(out)
    assert len(table) == 3 and table.registers.notna().all(), table
    assert (table.min_load_bytes >= 8).all(), table[["op", "kernels", "min_load_bytes"]]


SPECIALIZATION = """
import torch
from bench import traffic
from bench.kernel_report import Variant
from tritonbn.autotune import LaunchConfig
x = torch.empty((4, 6, 5, 5), dtype=torch.bfloat16, device="meta")[:, 1:]  # starts 50 bytes in
(launch,) = traffic.record("inference", x, LaunchConfig("split", 2, 4, 8, split_n=2, split_s=2))
v = Variant.of(launch)
hinted = {launch.fn.arg_names[i] for (i,) in v.attrs}
print(v.sig["X"], "X" in hinted, "Y" in hinted, v.sig["stride_xs"], v.constexprs["stride_xs"],
      "stride_xn" in hinted, "s_per_split" in hinted)
"""


def test_specialization_follows_the_launch():
    """As Triton's JIT does: a pointer 50 bytes into its storage gets no
    divisibility hint and a fresh output does; the unit stride becomes the
    constexpr 1; ints get the hint where divisible by 16 (s_per_split = 16)
    and not elsewhere (stride_xn = 150)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", SPECIALIZATION], env=env, capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["*bf16", "False", "True", "constexpr", "1", "False", "True"]


def _input(dtype, layout):
    x = torch.randn(SHAPE, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
