"""python -m bench.model: a whole training step of ResNet-50 (forward,
backward, SGD step) with torch's BatchNorm and with tritonbn's.

Providers: torch (torch.nn.BatchNorm2d, cuDNN), tritonbn (convert_batchnorm),
fused (fuse_epilogues: each bn -> relu and bn -> + residual -> relu one call),
compile (torch.compile of the torch model, the compiler's reference) and
identity (every BatchNorm replaced by nn.Identity: no model, a bound on
BatchNorm's share of the step). Each runs eager and, except compile, captured
whole in a CUDA graph (graphed). Before anything is timed, the first steps of
every provider start from the same weights on the same batch, and their losses,
gradients and running statistics are compared with the torch model's in
float64: a provider more than ERROR_RATIO times further from it than torch's
own step (and past TOLERANCE) is wrong, and is never timed.

On a GPU: ms per step (median over CUDA events), speed-up over torch in the
same mode, BatchNorm's share of torch's step (1 - identity / torch); rows are
appended to bench/results/<gpu>-model.csv and drawn beside it. tritonbn runs
its heuristic configs unless --autotune (tuning a whole ResNet-50 on first
sight compiles hundreds of kernel variants). Without a GPU: the tiny ResNet
(bench/resnet.py) for a few steps on the Triton interpreter, checked against
torch's BatchNorm as above, no times.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

GPU = torch.cuda.is_available()
if not GPU:  # the kernels on the interpreter: set before tritonbn is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pandas as pd  # noqa: E402

import tritonbn  # noqa: E402

from . import resnet  # noqa: E402
from .runner import ROOT, _commit, _csv_path, append_csv, device_name  # noqa: E402

PROVIDERS = ("torch", "tritonbn", "fused", "compile", "identity")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = ("channels_last", "contiguous")
SCHEMA = ["timestamp", "device", "gpu_run", "torch", "triton", "commit", "autotune", "model", "batch",
          "image", "dtype", "layout", "provider", "graphed", "ms_per_step", "speedup_vs_torch",
          "speedup_vs_compile", "bn_share", "loss_error", "grad_error", "stats_error", "correct", "note"]
# a provider's step against the float64 model: losses over the checked steps, parameter
# gradients (norm of the difference over the norm) and running statistics after them, each
# at most ERROR_RATIO x torch's own difference or TOLERANCE, whichever is larger (a small
# batch's BatchNorm is ill-conditioned: at batch 2 torch's own fp32 steps of the tiny ResNet
# end 2-4e-2 from float64's, python -m bench.model --batches 2)
ERRORS = ("loss_error", "grad_error", "stats_error")
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
ERROR_RATIO = 3.0
LR, MOMENTUM = 0.01, 0.9


COMPILE_BACKEND = "inductor"  # --compile-backend


def build(provider: str, base: nn.Module) -> nn.Module:
    """A copy of ``base`` (same weights) with the provider's BatchNorm."""
    model = copy.deepcopy(base)
    if provider == "tritonbn":
        return tritonbn.convert_batchnorm(model)
    if provider == "fused":
        return tritonbn.fuse_epilogues(model)
    if provider == "compile":
        return torch.compile(model, backend=COMPILE_BACKEND)
    if provider == "identity":
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(module, child_name, nn.Identity())
    return model


class Step:
    """One SGD training step of a model on a fixed batch (static tensors, so
    that the step can be captured in a CUDA graph): zero the gradients,
    forward under autocast for 16-bit dtypes, cross-entropy, backward, step."""

    def __init__(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, dtype: torch.dtype):
        self.model, self.x, self.target, self.dtype = model, x, target, dtype
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        self.loss = None

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        autocast = (torch.autocast(self.x.device.type, self.dtype, cache_enabled=False)
                    if self.dtype != torch.float32 else contextlib.nullcontext())
        with autocast:
            self.loss = F.cross_entropy(self.model(self.x), self.target)
        self.loss.backward()
        self.optimizer.step()
        return self.loss

    def graphed(self, warmup: int = 3) -> Callable[[], torch.Tensor]:
        """The step captured in a CUDA graph (after warm-up steps on a side
        stream, which also create the optimizer's momentum buffers)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            self()
        loss = self.loss

        def replay() -> torch.Tensor:
            graph.replay()
            return loss
        return replay


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _named(items) -> dict[str, torch.Tensor]:
    """name -> a detached copy; names as in the torch model (torch.compile's
    wrapper prefix dropped; a fused GraphModule keeps the names, not the order)."""
    return {name.removeprefix("_orig_mod."): t.detach().clone() for name, t in items}


def check(models: dict[str, nn.Module], base: nn.Module, x, target, dtype, steps: int) -> dict[str, dict]:
    """Each provider's first ``steps`` steps against the torch model in
    float64 (no autocast), from the same weights on the same batch: the
    largest relative difference of the losses, of the first step's parameter
    gradients, and of the running statistics after the last step. torch's own
    row is its fp32 / autocast step's difference, which sets how close the
    others must come (identity is not compared: it is another model)."""
    runs = {**models, "float64": copy.deepcopy(base).double()}
    losses, grads, stats = {}, {}, {}
    for provider, model in runs.items():
        if provider == "identity":
            continue
        reference = provider == "float64"
        step = Step(model, x.double() if reference else x, target, torch.float32 if reference else dtype)
        losses[provider] = []
        for index in range(steps):
            losses[provider].append(step().item())
            if index == 0:
                grads[provider] = _named((name, p.grad) for name, p in model.named_parameters())
        stats[provider] = _named((name, t) for name, t in model.named_buffers()
                                 if name.endswith(("running_mean", "running_var")))
    del runs["float64"]
    results = {}
    for provider in models:
        if provider == "identity":
            results[provider] = dict(loss_error=math.nan, grad_error=math.nan, stats_error=math.nan)
            continue
        results[provider] = dict(
            loss_error=max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(losses[provider], losses["float64"])),
            grad_error=_largest(grads[provider], grads["float64"]),
            stats_error=_largest(stats[provider], stats["float64"]))
    return results


def within(errors: dict, torch_errors: dict, dtype: torch.dtype) -> bool:
    """Whether a provider's step is as close to float64 as torch's own, up to
    ERROR_RATIO, or within TOLERANCE (a well-conditioned model's torch error
    is far below it)."""
    return all(errors[k] <= max(TOLERANCE[dtype], ERROR_RATIO * torch_errors[k]) for k in ERRORS)


def _largest(ours: dict, theirs: dict) -> float:
    """The largest relative difference over the torch model's tensors (inf where one is missing)."""
    if ours.keys() != theirs.keys():
        return math.inf
    return max(_relative(ours[name], theirs[name]) for name in theirs)


def time_step(step: Callable[[], object], steps: int) -> float:
    """Median milliseconds of a step over CUDA events, after warm-up steps."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_config(base_fn: Callable[[], nn.Module], batch: int, image: int, num_classes: int, dtype_name: str,
               layout: str, provider_names, graphs: bool, check_steps: int, steps: int, device: str,
               context: dict) -> list[dict]:
    """Check, then (on a GPU) time every provider on one (batch, dtype, layout)."""
    dtype = DTYPES[dtype_name]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    base = base_fn().to(device=device, memory_format=fmt)
    x = torch.randn(batch, 3, image, image, device=device).to(memory_format=fmt)
    target = torch.randint(0, num_classes, (batch,), device=device)
    names = ["torch", *(p for p in provider_names if p != "torch")]
    failure = ""
    try:
        models = {p: build(p, base) for p in names}
        errors = check(models, base, x, target, dtype, check_steps)
    except Exception as error:  # out of memory, a compile error: this config's rows say so, the next run
        failure = f"check failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        models, errors = {}, {p: dict.fromkeys(ERRORS, math.nan) for p in names}
    rows = []
    for provider in names:
        for graphed in ((False, True) if graphs and GPU and provider != "compile" else (False,)):
            row = dict(context, model=base.__class__.__name__, batch=batch, image=image, dtype=dtype_name,
                       layout=layout, provider=provider, graphed=graphed, ms_per_step=math.nan,
                       **errors[provider], note="")
            row["correct"] = not failure and (provider == "identity" or
                                              within(errors[provider], errors["torch"], dtype))
            if failure:
                row["note"] = failure
            elif not row["correct"]:
                row["note"] = "further from the float64 step than torch's: not timed"
            elif not GPU:
                row["note"] = "checked; not timed (interpreter)"
            else:
                try:  # the checked model itself (compiled once), a fresh optimizer
                    step = Step(models[provider], x, target, dtype)
                    row["ms_per_step"] = time_step(step.graphed() if graphed else step, steps)
                except Exception as error:  # one failing provider must not end the run
                    row["note"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            rows.append(row)
    eager = {(r["provider"], r["graphed"]): r["ms_per_step"] for r in rows}
    for row in rows:
        row["speedup_vs_torch"] = eager.get(("torch", row["graphed"]), math.nan) / row["ms_per_step"]
        row["speedup_vs_compile"] = eager.get(("compile", False), math.nan) / row["ms_per_step"]
        row["bn_share"] = 1 - eager.get(("identity", row["graphed"]), math.nan) / eager.get(
            ("torch", row["graphed"]), math.nan)
    return rows


def summarize(df: pd.DataFrame) -> str:
    index = ["batch", "dtype", "layout"]
    lines = ["largest relative difference from the float64 step (losses, first gradients, running "
             "statistics); torch's own sets the bar:",
             df[df.provider != "identity"].assign(
                 error=df[["loss_error", "grad_error", "stats_error"]].max(axis=1)).pivot_table(
                 index=index, columns="provider", values="error", aggfunc="max").map(
                 lambda e: f"{e:.1e}").to_string(), ""]
    timed = df[df.ms_per_step.notna()]
    if not timed.empty:
        lines += ["ms per step (graphed: the whole step in one CUDA graph):",
                  timed.pivot_table(index=[*index, "graphed"], columns="provider", values="ms_per_step")
                  .round(2).to_string(), "",
                  "speed-up over torch's step in the same mode, and BatchNorm's share of torch's step:",
                  timed[timed.provider.isin(["tritonbn", "fused", "compile"])].pivot_table(
                      index=[*index, "graphed"], columns="provider", values="speedup_vs_torch").join(
                      timed[timed.provider == "torch"].set_index([*index, "graphed"])["bn_share"])
                  .round(3).to_string(), ""]
    wrong = df[~df.correct.astype(bool)]
    lines.append(f"{len(df)} rows, {len(wrong)} not correct" + (
        "" if wrong.empty else ":\n" + wrong[[*index, "provider", "loss_error", "grad_error",
                                              "stats_error", "note"]].to_string()))
    return "\n".join(lines)


def plot(csv_path: Path) -> Path | None:
    """Bars of ms per step, one panel per (batch, dtype, layout), from the
    latest commit's rows; None where none of them was timed (the interpreter)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    df = pd.read_csv(csv_path)
    df = df[(df.commit == df.commit.iloc[-1]) & df.ms_per_step.notna()]
    if df.empty:
        return None
    groups = list(df.groupby(["batch", "dtype", "layout"]))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(4 * max(1, len(groups)), 3.5), squeeze=False)
    for ax, ((batch, dtype, layout), group) in zip(axes[0], groups):
        labels = [f"{p}{' (graph)' if g else ''}" for p, g in zip(group.provider, group.graphed)]
        ax.barh(labels, group.ms_per_step)
        ax.set_title(f"batch {batch} {dtype} {layout}", fontsize=9)
        ax.set_xlabel("ms per training step")
    fig.suptitle(f"{df.model.iloc[0] if len(df) else ''} training step, {df.device.iloc[0] if len(df) else ''}")
    fig.tight_layout()
    out = csv_path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256] if GPU else [4],
                        help="batch sizes (default 32 256 on a GPU, 4 on the interpreter)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES) if GPU else ["fp32"],
                        help="bf16: autocast with fp32 weights; fp32 (default: both on a GPU, fp32 on the "
                             "interpreter)")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS,
                        default=list(PROVIDERS) if GPU else ["torch", "tritonbn", "fused"],
                        help="torch is always run (the reference); compile compiles a whole ResNet-50")
    parser.add_argument("--no-graphs", action="store_true", help="eager steps only, no CUDA graph capture")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row (median)")
    parser.add_argument("--check-steps", type=int, default=3, help="steps compared with torch's (default 3)")
    parser.add_argument("--tiny", action="store_true", help="the tiny ResNet (the default on the interpreter)")
    parser.add_argument("--autotune", action="store_true",
                        help="tune tritonbn's kernels on first sight (default: heuristic configs)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend for the compile provider (default inductor; "
                             "aot_eager traces the same step without generating code)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / ("results" if GPU else "out"))
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def run(argv=None) -> pd.DataFrame:
    args = parse_args(argv)
    global COMPILE_BACKEND
    COMPILE_BACKEND = args.compile_backend
    if not args.autotune:
        os.environ["TRITONBN_AUTOTUNE"] = "0"
    device = "cuda" if GPU else "cpu"
    tiny = args.tiny or not GPU
    base_fn, image, classes = (resnet.tiny_resnet, 32, 10) if tiny else (resnet.resnet50, 224, 1000)
    import triton
    context = dict(timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   device=device_name(), gpu_run=GPU, torch=torch.__version__, triton=triton.__version__,
                   commit=_commit(), autotune=GPU and args.autotune)
    print(f"bench.model: {'tiny ResNet' if tiny else 'ResNet-50'}, {image}x{image} images, "
          + (f"real GPU run on {device_name()}" if GPU else
             "NO GPU - tritonbn's kernels on the Triton interpreter: steps are checked against torch's, "
             "not timed"), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = _csv_path(args.out, "-model")
    rows = []
    for batch in args.batches:
        for dtype in args.dtypes:
            for layout in args.layouts:
                print(f"  batch {batch} {dtype} {layout} ...", flush=True)
                new = run_config(base_fn, batch, image, classes, dtype, layout, args.providers,
                                 not args.no_graphs, args.check_steps, args.steps, device, context)
                append_csv(csv_path, pd.DataFrame(new, columns=SCHEMA))  # a run cut off keeps these
                rows += new
                if GPU:
                    torch.cuda.empty_cache()
    df = pd.DataFrame(rows, columns=SCHEMA)
    print(summarize(df))
    print(f"rows appended to {csv_path}")
    if GPU and not args.no_plot:
        try:
            print(f"plot: {plot(csv_path)}")
        except ImportError:
            print("plot skipped: matplotlib is not installed")
    if not df.correct.astype(bool).all():
        sys.exit(1)
    return df


if __name__ == "__main__":
    run()
