"""tests/test_launcher.py's child process: tritonbn's launches under the
stand-in driver (bench/standin.py), interpreter off, with the launch settings
the heuristic picks on an H100 (132 SMs), so the kernel variants are the ones
a GPU launches:

    python tests/launch_worker.py OUT_FILE [QUICK]

For every case it runs the call through Triton's own dispatch
(``kernel[grid](...)`` at every launch), then twice more with direct
launches (the first finds the compiled kernels, the second launches them
directly), and compares what the compiled launcher was handed in the first
and the last: same compiled kernel (the JIT's own cache entry, so the same
specialization), grid, stream, function, metadata and, argument for
argument, the same values (tensors by role, dtype, shape, strides and
address mod 16). Writes a JSON report to OUT_FILE.
"""
import dataclasses
import itertools
import json
import math
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import standin  # noqa: E402

RECORDER = standin.install()

import torch  # noqa: E402
import triton  # noqa: E402

from tritonbn import autotune, launch, launcher, plan_cache  # noqa: E402
from tritonbn.autotune import config as config_module  # noqa: E402

SMS = 132
config_module._sm_count = lambda *args: SMS
config_module._warp_size = lambda *args: 32
RESNET50 = ((64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28), (256, 14),
            (1024, 14), (512, 14), (512, 7), (2048, 7))


class GPUHeuristic(autotune.Tuner):
    """The heuristic's config as on an H100, whatever device the tensors are on."""

    def choose(self, problem, trial):
        return autotune.heuristic(dataclasses.replace(problem, device=torch.device("cuda", 0)))


DISPATCHES = 0
_run = triton.runtime.jit.JITFunction.run


def _counted_run(self, *args, **kwargs):
    global DISPATCHES
    DISPATCHES += 1
    return _run(self, *args, **kwargs)


triton.runtime.jit.JITFunction.run = _counted_run


def tensors(shape, dtype, layout, offset=0):
    """An uninitialized tensor (the stand-in computes nothing), offset
    elements into its storage when asked (a misaligned pointer)."""
    flat = torch.empty(math.prod(shape) + offset, dtype=dtype)[offset:]
    if layout == "channels_last":
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


def case_calls(x: torch.Tensor, param_offset: int = 0):
    """The calls of one case: (label, no-argument function, named tensors)."""
    C = x.shape[1]
    pdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    stats = launch.acc_dtype(x.dtype)
    weight, bias = tensors((C,), pdtype, "", param_offset), tensors((C,), pdtype, "")
    rm, rv = torch.zeros(C, dtype=pdtype), torch.ones(C, dtype=pdtype)
    nbt = torch.zeros((), dtype=torch.long)
    mean, invstd = torch.zeros(C, dtype=stats), torch.ones(C, dtype=stats)
    grad, residual, output = (torch.empty_like(x) for _ in range(3))
    named = dict(x=x, weight=weight, bias=bias, running_mean=rm, running_var=rv, nbt=nbt, mean=mean,
                 invstd=invstd, grad=grad, residual=residual, output=output)
    calls = {
        "forward": lambda: launch.forward_training(x, weight, bias, rm, rv, nbt, 0.1, 1e-5),
        "forward, no affine, no running stats": lambda: launch.forward_training(
            x, None, None, None, None, None, 0.1, 1e-5),
        "forward, momentum None, add + relu": lambda: launch.forward_training(
            x, weight, bias, rm, rv, nbt, None, 1e-5, residual=residual, relu=True),
        "inference": lambda: launch.forward_inference(x, weight, bias, rm, rv, 1e-5),
        "inference, no stats, relu": lambda: launch.forward_inference(x, weight, bias, rm, rv, 1e-5, relu=True,
                                                                      keep_stats=False),
        "backward": lambda: launch.backward(grad, x, weight, mean, invstd, True, (True, True, True),
                                            bias.dtype),
        "backward, relu from x": lambda: launch.backward(grad, x, weight, mean, invstd, True, (True, True, True),
                                                         bias.dtype, relu_from_input=True, bias=bias),
        "backward, add + relu": lambda: launch.backward(grad, x, weight, mean, invstd, True, (True, True, True),
                                                        bias.dtype, output=output, residual_grad=True),
        "backward, eval, dx only": lambda: launch.backward(grad, x, weight, mean, invstd, False,
                                                           (True, False, False), bias.dtype),
        "backward, eval, all": lambda: launch.backward(grad, x, weight, mean, invstd, False,
                                                       (True, True, True), bias.dtype),
    }
    return calls, named


def launches_of(fn, named):
    RECORDER.names = {t.data_ptr(): name for name, t in named.items()}
    RECORDER.on = True
    fn()
    RECORDER.on = False
    return RECORDER.take()


def check(label: str, fn, named, report: dict, fresh: bool = True) -> list:
    """Direct launches (after the launch that finds the kernels), then
    Triton's own path with no plan kept; returns the direct launches'
    kernels. fresh=False: the plans of earlier cases stay, so a key that
    missed a specialization would hand this call an earlier case's kernel.
    Appends a failure to the report where the two differ."""
    global DISPATCHES
    if fresh:
        plan_cache.clear()
    launcher.enabled = True
    launches_of(fn, named)  # a new plan's launches go through the JIT and find the compiled kernels
    DISPATCHES = 0
    direct = launches_of(fn, named)
    dispatched = DISPATCHES
    for plan in plan_cache._plans.values():
        for prepared in plan.launches.values():
            if prepared.direct is not None:
                report["entries"][prepared.direct[-1] is not None] += 1
    launcher.enabled = False
    plan_cache.clear()
    jit = launches_of(fn, named)
    launcher.enabled = True
    if dispatched:
        report["failures"].append(f"{label}: {dispatched} launches went through Triton's dispatch")
    if jit != direct:
        report["failures"].append(f"{label}: launcher arguments differ:\n  jit    {jit}\n  direct {direct}")
    for name, kernel, *rest in direct:
        report["cooperative"].add((name, kernel.launch_cooperative_grid))
        if len(rest) == 1 and rest[0][5] != kernel.launch_cooperative_grid:  # the C entry's cooperative flag
            report["failures"].append(f"{label}: {name} reached the launcher with cooperative={rest[0][5]}")
        variant = (name, tuple(sorted(kernel.constants.items(), key=str)), tuple(sorted(kernel.attrs.items(),
                                                                                         key=str)))
        report["variants"].add(repr(variant))
    report["launches"] += len(direct)
    return [kernel for _, kernel, *_ in direct]


def main(out_file: str, quick: bool) -> None:
    report = dict(failures=[], variants=set(), launches=0, cases=0, respecialized=0, cooperative=set(),
                  entries={True: 0, False: 0})  # prepared direct launches: through the C entry, or not
    shapes = RESNET50[::4] if quick else RESNET50
    dtypes = (torch.bfloat16, torch.float32) if quick else (torch.bfloat16, torch.float16, torch.float32)
    with autotune.use_tuner(GPUHeuristic()):
        for (C, H), dtype, layout in itertools.product(shapes, dtypes, ("contiguous", "channels_last")):
            x = tensors((32, C, H, H), dtype, layout)
            calls, named = case_calls(x)
            for label, fn in calls.items():
                report["cases"] += 1
                check(f"{label} {tuple(x.shape)} {dtype} {layout}", fn, named, report)
        # What the JIT specializes on changes: the plan key changes with it, and
        # the direct launch takes the kernel the JIT picks for the new arguments.
        base = tensors((32, 64, 7, 7), torch.float32, "contiguous")
        calls_base, named = case_calls(base)
        kernels = check("base", calls_base["forward"], named, report)

        def base_plan():  # the base call's plan, launching directly, kept for the next variation
            calls_base["forward"]()
            calls_base["forward"]()

        base_plan()
        variations = {
            "misaligned weight": case_calls(base, param_offset=1),
            "misaligned x": case_calls(tensors((32, 64, 7, 7), torch.float32, "contiguous", offset=1)),
            "a stride of 1 (N = 1)": case_calls(tensors((1, 64, 7, 7), torch.float32, "contiguous")),
            "float64": case_calls(tensors((32, 64, 7, 7), torch.float64, "contiguous")),
            "S divisible by 16": case_calls(tensors((32, 64, 8, 8), torch.float32, "contiguous")),
        }
        for label, (calls, named) in variations.items():
            changed = check(label, calls["forward"], named, report, fresh=False)
            base_plan()
            if any(a is b for a, b in zip(changed, kernels)):
                report["failures"].append(f"{label}: the same compiled kernel as before the change")
            else:
                report["respecialized"] += 1
        # A launch hook (a profiler) set: launches go back through Triton's
        # dispatch, which builds the hooks' metadata and calls them.
        global DISPATCHES
        base_plan()

        def hook(metadata):
            pass

        triton.knobs.runtime.launch_enter_hook.add(hook)
        DISPATCHES = 0
        calls_base["forward"]()
        report["dispatches_with_hook"] = DISPATCHES
        triton.knobs.runtime.launch_enter_hook.remove(hook)
        DISPATCHES = 0
        calls_base["forward"]()
        report["dispatches_without_hook"] = DISPATCHES
        # Another device current than the tensors' (device 0 under the stand-in, as
        # with several GPUs in one process and no torch.cuda.set_device): every
        # launch, the JIT's first and the direct ones after, runs with the
        # tensors' device current, and the caller's is current again after it.
        driver = triton.runtime.driver.active
        calls_other, _ = case_calls(tensors((32, 96, 10, 10), torch.bfloat16, "channels_last"))
        RECORDER.devices.clear()
        RECORDER.on = True
        driver.set_current_device(1)
        report["current_after"] = []
        for _ in range(3):
            for label in ("forward", "backward", "inference"):
                calls_other[label]()
                report["current_after"].append(driver.get_current_device())
        RECORDER.on = False
        driver.set_current_device(0)
        report["launch_devices"] = list(RECORDER.devices)
        RECORDER.take()
    report["variants"] = sorted(report["variants"])
    report["cooperative"] = sorted(report["cooperative"])  # (kernel, launched as a cooperative grid)
    report["triton"] = triton.__version__
    report["direct_enabled"] = launcher.enabled
    report["launcher"] = standin.LAUNCHER
    report["driver_launches"] = standin.driver_launches()
    report["entries"] = {"c": report["entries"][True], "python": report["entries"][False]}
    with open(out_file, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "quick")
