"""The benchmark runner: check every row against the float64 reference, then
time it, and append the rows to a long-format CSV.

Timing on a GPU: triton.testing.do_bench, median of CUDA-event timings after
warm-up, with the L2 cache flushed before every repetition so small shapes are
not flattered. Bandwidth: the minimal-bytes model (docs/performance.md; PASSES tensor
passes per mode, the same for every provider) over the median time, and as a
fraction of a device-to-device copy of the same tensor timed in the same run.
Without a GPU the kernels run on the Triton interpreter, and the run checks
correctness only: interpreter timings say nothing about GPU speed, so rows are
timed there (wall-clock medians) only with --interpreter-timings.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import math
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import pandas as pd
import torch
import triton

from . import providers
from .providers import MODES, PASSES, PROVIDERS, Inputs, make_call, regime_of, regime_providers
from tritonbn.autotune.shapes import DTYPES, LAYOUTS, SUITES, layouts_for, select_shapes

try:
    from tqdm import tqdm
except ImportError as error:  # not a dependency of tritonbn itself: the bench extra
    raise SystemExit('python -m bench needs tqdm (and matplotlib for its plot): pip install -e ".[bench]"') \
        from error

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ["timestamp", "device", "gpu_run", "torch", "triton", "commit", "autotune", "mode", "shape",
          "dtype", "layout", "provider", "regime", "median_ms", "gbps", "copy_gbps", "frac_copy", "max_error",
          "correct", "speedup_vs_eager", "speedup_vs_compile", "note"]
# max |out - ref| / max(1, max |ref|) allowed, per dtype
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@functools.lru_cache(maxsize=1)
def _reference_module():
    """tests/reference.py, the float64 reference the test suite uses."""
    spec = importlib.util.spec_from_file_location("tritonbn_bench_reference", ROOT / "tests" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_outputs(mode: str, i: Inputs, outputs=None) -> tuple[torch.Tensor, ...]:
    """The float64 reference of what make_call returns. The epilogue modes take
    the ReLU mask from the provider's own output (``outputs[0]``): where the
    pre-activation is within rounding of 0, either side is right, and the
    gradients must follow the side the forward took."""
    ref = _reference_module()
    if mode in providers.EPILOGUES:
        y, _, _ = ref.reference_batch_norm(i.x, i.running_mean, i.running_var, i.weight, i.bias, True,
                                           providers.MOMENTUM, providers.EPS)
        grad = torch.where(outputs[0] > 0, i.grad_out.double(), 0.0)
        grads = ref.reference_grads(i.x, i.weight, i.bias, grad, i.running_mean, i.running_var, True,
                                    providers.EPS)
        if providers.EPILOGUES[mode]:  # with a residual, whose gradient is the masked grad_out
            return (torch.relu(y + i.residual.double()), *grads, grad)
        return (torch.relu(y), *grads)
    training = mode != "inference"
    y = ref.reference_batch_norm(i.x, i.running_mean, i.running_var, i.weight, i.bias, training,
                                 providers.MOMENTUM, providers.EPS)[0]
    if mode in ("forward", "inference"):
        return (y,)
    grads = ref.reference_grads(i.x, i.weight, i.bias, i.grad_out, i.running_mean, i.running_var,
                                True, providers.EPS)
    return (y, *grads) if mode == "fwd_bwd" else grads


def max_error(outputs, references) -> float:
    return max(((o.double() - r).abs().max() / max(1.0, r.abs().max().item())).item()
               for o, r in zip(outputs, references))


def measure_ms(fn) -> float:
    """Median milliseconds of fn()."""
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "tritonbn", "bench"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "triton-interpreter-cpu"


UNTIMED = "correct; not timed (interpreter: --interpreter-timings)"


def bench_group(mode, shape, dtype_name, layout, provider_names, device, context, timed=True,
                regimes=False) -> list[dict]:
    """All providers of one (mode, shape, dtype, layout): check, then time
    (unless not ``timed``: then the timing columns stay NaN). regimes: also
    tritonbn in each regime that can run the shape (tritonbn[REGIME])."""
    dtype = DTYPES[dtype_name]
    inputs = Inputs.make(shape, dtype, layout == "channels_last", device)
    if regimes:
        provider_names = [*provider_names, *regime_providers(mode, inputs.x)]
    references = None if mode in providers.EPILOGUES else reference_outputs(mode, inputs)
    tensor_bytes = inputs.x.numel() * inputs.x.element_size()
    copy_gbps = math.nan
    if timed:
        copy_dst = torch.empty_like(inputs.x)
        copy_gbps = 2 * tensor_bytes / measure_ms(lambda: copy_dst.copy_(inputs.x)) / 1e6
    rows = []
    for provider in provider_names:
        row = dict(context, mode=mode, shape="x".join(map(str, shape)), dtype=dtype_name, layout=layout,
                   provider=provider, regime="", copy_gbps=copy_gbps, median_ms=math.nan, gbps=math.nan,
                   frac_copy=math.nan, max_error=math.nan, correct=False, note="")
        try:
            call = make_call(provider, mode, inputs)
            outputs = call()
            row["regime"] = regime_of(provider, mode, inputs.x)
            row["max_error"] = max_error(outputs, references or reference_outputs(mode, inputs, outputs))
            row["correct"] = row["max_error"] <= TOLERANCE[dtype]
            if row["correct"] and not timed:
                row["note"] = UNTIMED
            elif row["correct"]:  # a wrong result is not timed
                row["median_ms"] = measure_ms(call)
                row["gbps"] = PASSES[mode] * tensor_bytes / row["median_ms"] / 1e6
                row["frac_copy"] = row["gbps"] / copy_gbps
            else:
                row["note"] = "wrong result: not timed"
        except Exception as error:  # one failing provider must not end the run
            row["note"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        rows.append(row)
    times = {r["provider"]: r["median_ms"] for r in rows}
    for row in rows:
        row["speedup_vs_eager"] = times.get("eager", math.nan) / row["median_ms"]
        row["speedup_vs_compile"] = times.get("compile", math.nan) / row["median_ms"]
    return rows


def plan_rows(args) -> list[tuple]:
    return [(mode, shape, dtype, layout)
            for shape in select_shapes(args.shape, args.suite, args.batches)
            for mode in args.modes for dtype in args.dtypes
            for layout in layouts_for(shape, args.layouts)]


def summarize(df: pd.DataFrame) -> str:
    """Correctness per mode, dtype and provider; speed-ups and bandwidth where rows were timed."""
    tolerances = ", ".join(f"{name} {TOLERANCE[DTYPES[name]]:g}" for name in sorted(set(df.dtype)))
    lines = [f"largest error, max |out - ref| / max(1, max |ref|) (tolerance: {tolerances}):",
             df.pivot_table(index=["mode", "dtype"], columns="provider", values="max_error", aggfunc="max")
             .map(lambda e: f"{e:.1e}").to_string(), ""]
    timed = df[df.correct & df.median_ms.notna()]
    if not timed.empty:
        lines += _speed_summary(timed)
        if timed.provider.str.startswith("tritonbn[").any():
            lines += _regime_summary(timed)
    wrong = df[~df.correct]
    lines.append(f"{len(df)} rows, {len(wrong)} not correct or failed"
                 + ("" if wrong.empty else ":\n" + wrong[["mode", "shape", "dtype", "layout", "provider",
                                                            "max_error", "note"]].to_string()))
    return "\n".join(lines)


def _speed_summary(df: pd.DataFrame) -> list[str]:
    caveat = "" if df.gpu_run.all() else " (Triton interpreter wall-clock, NOT GPU speed)"
    ours = df[df.provider == "tritonbn"]
    lines = []
    if len(ours):
        geomean = ours.groupby(["mode", "dtype", "layout"])[["speedup_vs_eager", "speedup_vs_compile"]].agg(
            lambda s: math.exp(s.dropna().map(math.log).mean()) if s.notna().any() else math.nan)
        lines += [f"geometric-mean speedup of tritonbn{caveat}:", geomean.round(3).to_string(), ""]
    bandwidth = df.pivot_table(index="mode", columns="provider", values="frac_copy", aggfunc="median")
    return lines + [f"median fraction of copy bandwidth{caveat}:", bandwidth.round(3).to_string(), ""]


def _regime_summary(df: pd.DataFrame) -> list[str]:
    """Per shape: milliseconds in each regime, the regime tritonbn picks, the
    fastest, and the pick's time over the fastest's (1.0: the pick is right)."""
    ours = df[df.provider.str.startswith("tritonbn")]
    index = ["mode", "shape", "dtype", "layout"]
    table = ours.pivot_table(index=index, columns="provider", values="median_ms", aggfunc="min")
    forced = [c for c in table.columns if c.startswith("tritonbn[")]
    picks = ours[ours.provider == "tritonbn"].set_index(index)["regime"]
    table["pick"] = picks.reindex(table.index)
    table["fastest"] = table[forced].idxmin(axis=1).str.slice(9, -1)
    table["pick_over_fastest"] = table["tritonbn"] / table[forced].min(axis=1)
    caveat = "" if df.gpu_run.all() else " (Triton interpreter wall-clock, NOT GPU speed)"
    return [f"milliseconds per regime, tritonbn's pick and the fastest{caveat}:",
            table.round(4).to_string(), ""]


def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", nargs="+", choices=SUITES,
                        default=["resnet50", "mlp", "video"] if gpu else ["tiny"],
                        help="shape sets (default: resnet50 mlp video on a GPU, tiny on the interpreter)")
    parser.add_argument("--quick", action="store_true",
                        help="fp16 and fp32 only; on a GPU the 'quick' suite (the interpreter keeps 'tiny')")
    parser.add_argument("--shape", action="append", help="an explicit shape, e.g. 32,64,56,56 (repeatable)")
    parser.add_argument("--batches", type=lambda s: tuple(int(v) for v in s.split(",")),
                        default=(32, 64, 256), help="batch sizes of the resnet50 suite (default 32,64,256)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
                        help="channels_last applies to 4-D and 5-D shapes")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / ("results" if gpu else "out"),
                        help="folder of the CSV (default bench/results on a GPU, bench/out otherwise)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    parser.add_argument("--regimes", action="store_true",
                        help="also time tritonbn in every regime that can run each shape (resident, "
                             "cooperative, split; flat and split for inference): providers tritonbn[REGIME]")
    parser.add_argument("--host", action="store_true",
                        help="per-call host time of tritonbn against torch on tiny tensors (bench/host.py); "
                             "without a GPU the kernel launches are stubbed out")
    parser.add_argument("--interpreter-timings", action="store_true",
                        help="without a GPU, time the rows too and print speed-ups: wall-clock of the "
                             "Triton interpreter, which says nothing about GPU speed (default: correctness only)")
    parser.add_argument("--no-autotune", action="store_true",
                        help="tritonbn with its heuristic configs (TRITONBN_AUTOTUNE=0); by default a "
                             "shape seen first is tuned during its correctness check, before timing")
    args = parser.parse_args(argv)
    if args.quick:
        args.dtypes = [d for d in args.dtypes if d in ("fp16", "fp32")]
        if gpu:
            args.suite = ["quick"]
    return args


def append_csv(path: Path, df: pd.DataFrame) -> None:
    """Append rows to a long-format CSV; a file written with other columns is
    rewritten in these first (columns it lacks stay empty)."""
    if path.exists():
        with path.open() as f:
            header = f.readline().rstrip("\n").split(",")
        if header != list(df.columns):
            old = pd.read_csv(path)
            pd.concat([old, df], ignore_index=True).reindex(
                columns=list(df.columns) + [c for c in old.columns if c not in df.columns]).to_csv(
                path, index=False)
            return
    df.to_csv(path, mode="a", header=not path.exists(), index=False)


def _csv_path(folder: Path, suffix: str = "") -> Path:
    return folder / (re.sub(r"[^A-Za-z0-9]+", "-", device_name()).strip("-") + suffix + ".csv")


def run_host(args, context: dict) -> pd.DataFrame:
    """python -m bench --host: rows appended to <device>-host.csv beside the bench CSV."""
    from . import host
    gpu = torch.cuda.is_available()
    rows = host.measure() if gpu else host.measure_standin()
    print(f"per-call host time, CPU us per call, best of {host.REPEATS} means; kernel launches: "
          f"{rows[0]['launch_path']}", flush=True)
    df = pd.DataFrame([dict(context, **row) for row in rows])
    shown = ["call", "shape", "own_us", "dispatch_us", "direct_us", "torch_us", "ratio", "launches",
             "allocations"]
    print(df[shown].round(2).to_string(index=False))
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = _csv_path(args.out, "-host")
    df.to_csv(csv_path, mode="a", header=not csv_path.exists(), index=False)
    print(f"rows appended to {csv_path.relative_to(ROOT) if csv_path.is_relative_to(ROOT) else csv_path}")
    return df


def run(argv=None) -> pd.DataFrame:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    context = dict(timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   device=device_name(), gpu_run=device == "cuda", torch=torch.__version__,
                   triton=triton.__version__, commit=_commit())
    if args.host:
        return run_host(args, context)
    if device == "cpu":
        from tritonbn import kernels
        if not kernels.INTERPRETED:
            raise SystemExit("no GPU: set TRITON_INTERPRET=1 before tritonbn is imported "
                             "(python -m bench does)")
        if args.interpreter_timings:
            print("tritonbn bench: NO GPU - kernels run on the Triton interpreter on the CPU. Timed as asked "
                  "(--interpreter-timings): interpreter wall-clock, which says NOTHING about GPU speed.",
                  flush=True)
        else:
            print("tritonbn bench: NO GPU - kernels run on the Triton interpreter on the CPU. This run checks "
                  "correctness only (each provider against the float64 reference); interpreter timings say "
                  "nothing about GPU speed (--interpreter-timings times them anyway).", flush=True)
    else:
        print(f"tritonbn bench: real GPU run on {device_name()} (CUDA-event medians, L2 flushed)", flush=True)
    if args.no_autotune:
        os.environ["TRITONBN_AUTOTUNE"] = "0"
    # tuning happens on CUDA only, and not when switched off
    context["autotune"] = device == "cuda" and os.environ.get("TRITONBN_AUTOTUNE", "1") != "0"
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = _csv_path(args.out)
    groups = plan_rows(args)
    timed = device == "cuda" or args.interpreter_timings
    rows = []
    with tqdm(groups, desc="bench", unit="group") as bar:
        for mode, shape, dtype, layout in bar:
            bar.set_postfix_str(f"{mode} {'x'.join(map(str, shape))} {dtype} {layout}")
            new = bench_group(mode, shape, dtype, layout, args.providers, device, context, timed,
                              args.regimes)
            append_csv(csv_path, pd.DataFrame(new, columns=SCHEMA))
            rows += new
    df = pd.DataFrame(rows, columns=SCHEMA)
    print(summarize(df))
    print(f"rows appended to {csv_path.relative_to(ROOT) if csv_path.is_relative_to(ROOT) else csv_path}")
    if not args.no_plot:
        from .plot import plot
        try:
            print(f"plot: {plot(csv_path)}")
        except ImportError:
            print('plot skipped: matplotlib is not installed (pip install -e ".[bench]"; '
                  f"then python -m bench.plot {csv_path})")
    return df
