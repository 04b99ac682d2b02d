"""Kernel launches of a launch plan: Triton's dispatch once, then the
compiled kernel's launcher directly.

``kernel[grid](*args, **kwargs)`` pays Triton's dispatch on every call
(``JITFunction.run``: binding 20-50 arguments, specializing each one, the
cache key and its lookup, the grid): 14-57 us of host time per launch, more
than most BatchNorm kernels take on the GPU at training batch sizes. A plan's
launch sees the same key every time -- the plan key holds everything the JIT
specializes on: shapes, strides, dtypes, constexprs and every pointer's
16-byte alignment (tritonbn.plans) -- so after its first call, which goes
through the JIT (compiling or finding the kernel), a ``Launch`` keeps that
compiled kernel with every non-tensor argument packed in signature order and
hands its launcher only the tensors and the stream.

What a direct launch passes is what Triton's own path passes the launcher,
argument for argument (tests/test_launcher.py checks it for every kernel
variant the reference shapes launch), except that the launch-hook slots are
None where Triton's hook chains are empty: the launcher then calls nothing,
as it does for an empty chain. A launch goes back through the JIT whenever
that could differ: a launch hook or a pre-run hook is set.

Every launch runs on its tensors' device: where another device is current
(several GPUs in one process, no ``torch.cuda.set_device``), that device is
made current for the launch and restored after it; the common case, the
tensors' device current, only compares two integers.

The launcher's signature is the same in every Triton this supports
(``SUPPORTED``); under another version, under the interpreter, or with
``TRITONBN_FAST_LAUNCH=0`` in the environment every launch goes through
``kernel[grid](...)``.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import triton

from . import kernels

# Triton versions whose JITFunction.run calls the compiled kernel as
# kernel.run(grid_0, grid_1, grid_2, stream, function, packed_metadata,
# launch_metadata, enter_hook, exit_hook, *bound_args.values()).
SUPPORTED = ("3.6", "3.7", "3.8", "3.9")
VERSION = ".".join(triton.__version__.split(".")[:2])


def _enabled_by_environment() -> bool:
    return os.environ.get("TRITONBN_FAST_LAUNCH", "1").lower() not in ("0", "false", "off", "no")


try:
    from triton import knobs as _knobs
    _RUNTIME = _knobs.runtime
    _HOOKS = (_RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook)
    _HOOK_CALLS = (_HOOKS[0].calls, _HOOKS[1].calls)  # each chain's list, changed in place
except (ImportError, AttributeError):  # pragma: no cover - a triton without knobs
    _RUNTIME, _HOOKS, _HOOK_CALLS = None, None, ([], [])
_ENTER_CALLS, _EXIT_CALLS = _HOOK_CALLS

# Whether launches may bypass Triton's dispatch (the interpreter's kernels are
# not JITFunctions: tritonbn.kernels turns this off under it).
enabled = (VERSION in SUPPORTED and _HOOKS is not None and not kernels.INTERPRETED
           and _enabled_by_environment())


class Launch:
    """One kernel launch of a plan: ``launch(*tensors)`` with the tensor
    arguments (the kernel's leading parameters, positionally); ``kwargs``
    holds every other parameter and the launch options (num_warps). The
    kernel is tritonbn.kernels' attribute ``name``, read at every launch, so
    that a kernel swapped there (a test's spy, a tool's recorder) is the one
    launched; a direct launch is taken only for the kernel it was found for."""

    __slots__ = ("name", "grid", "kwargs", "kernel", "direct")

    def __init__(self, name: str, grid: tuple[int, ...], kwargs: dict):
        self.name = name
        self.grid = grid
        self.kwargs = kwargs
        self.kernel = None  # the kernel the direct launch was prepared for
        # once known (_prepare): (launcher, grid_0, grid_1, grid_2, function, packed metadata, tail,
        # device, the driver's get_current_device, set_current_device, get_current_stream, C entry or None)
        self.direct = None

    def __call__(self, *tensors) -> None:
        kernel = getattr(kernels, self.name)
        direct = self.direct
        if (direct is not None and kernel is self.kernel and enabled and not kernel.pre_run_hooks
                and not _ENTER_CALLS and not _EXIT_CALLS  # Triton's launch hooks: its empty chains
                and _RUNTIME.launch_enter_hook is _HOOKS[0] and _RUNTIME.launch_exit_hook is _HOOKS[1]):
            run, g0, g1, g2, function, packed, tail, device, get_device, set_device, get_stream, entry = direct
            current = get_device()
            if current != device:  # the tensors' device, current for this launch only
                set_device(device)
            try:
                if entry is None:
                    run(g0, g1, g2, get_stream(device), function, packed, None, None, None, *tensors, *tail)
                else:
                    tupled, launch_c, cooperative, pdl, annotations, signature = entry
                    if tupled:  # triton 3.7-3.9: the arguments as one tuple
                        launch_c(g0, g1, g2, get_stream(device), function, cooperative, pdl, packed, None, None,
                                 None, None, None, annotations, signature, (*tensors, *tail))
                    else:  # triton 3.6: scratch before the metadata, the arguments flat
                        launch_c(g0, g1, g2, get_stream(device), function, cooperative, pdl, None, None, packed,
                                 None, None, None, *tensors, *tail)
            finally:
                if current != device:
                    set_device(current)
            return
        device = None if kernels.INTERPRETED else _device_of(tensors)
        if device is None:  # the interpreter; meta tensors (a recording tool): no device to launch on
            kernel[self.grid](*tensors, **self.kwargs)
            return
        driver = triton.runtime.driver.active
        current = driver.get_current_device()
        if current != device:  # Triton launches on the current device: make it the tensors'
            driver.set_current_device(device)
        try:
            compiled = kernel[self.grid](*tensors, **self.kwargs)
            if enabled and kernel is not self.kernel and compiled is not None:
                self.kernel, self.direct = kernel, _prepare(kernel, compiled, self.grid, len(tensors),
                                                            self.kwargs)
        finally:
            if current != device:
                driver.set_current_device(current)


def on_device(device: torch.device):
    """A context with ``device`` the current CUDA device, for work outside a
    Launch that runs on the current one: a ``kernel[grid](...)`` launch,
    CUDA events, the tuner's L2 flush. Nothing to do off CUDA or where the
    device is current already."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _device_of(tensors) -> int | None:
    """The index of the CUDA device the launch's tensors are on; for CPU
    tensors, which reach here only under bench/standin.py's stand-in driver,
    its device 0; None for tensors on no device (meta)."""
    t = next(t for t in tensors if t is not None)
    if t.is_cuda:
        return t.get_device()
    # the module, not the tritonbn.backend function of the same name
    return 0 if t.device.type == "cpu" and sys.modules["tritonbn.backend"]._standin else None


def _prepare(kernel, compiled, grid, num_tensors: int, kwargs: dict):
    """What a direct launch of ``compiled`` needs: its launcher and function
    (loaded by the launch that just ran), and the parameters after the
    tensors in signature order (constexprs included: the launcher skips
    them, as it does for Triton's own call). None where kernel is not a
    JITFunction (a test's spy)."""
    params = getattr(kernel, "params", None)
    if params is None or not hasattr(kernel, "pre_run_hooks") or not hasattr(compiled, "packed_metadata"):
        return None
    tail = []
    for param in params[num_tensors:]:
        if param.name in kwargs:
            tail.append(kwargs[param.name])
        elif param.has_default:
            tail.append(param.default)
        else:  # pragma: no cover - the JIT call above would have raised
            return None
    driver = triton.runtime.driver.active
    g0, g1, g2 = (*grid, 1, 1)[:3]
    return (compiled.run, g0, g1, g2, compiled.function, compiled.packed_metadata, tuple(tail),
            driver.get_current_device(), *_device_functions(driver), _c_entry(compiled.run))


def _c_entry(run):
    """Where ``run`` is Triton's CUDA launcher (CudaLauncher) and the kernel
    needs no scratch memory: its compiled C entry and the fixed arguments
    CudaLauncher.__call__ adds (about a microsecond of Python a launch, most
    of it building scratch allocators that return None here), for the direct
    launch to call that entry as __call__ would; None elsewhere (another
    backend, scratch memory, GSan, an unknown version)."""
    try:
        from triton.backends.nvidia.driver import CudaLauncher
    except ImportError:  # pragma: no cover - a triton without the CUDA backend
        return None
    if (not isinstance(run, CudaLauncher) or type(run).__call__ is not CudaLauncher.__call__
            or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1)
            or getattr(run, "gsan_enabled", False)):
        return None
    if VERSION in ("3.7", "3.8", "3.9"):
        return (True, run.launch, run.launch_cooperative_grid, run.launch_pdl, run.arg_annotations,
                run.kernel_signature)
    if VERSION == "3.6":
        return (False, run.launch, run.launch_cooperative_grid, run.launch_pdl, None, None)
    return None


def _device_functions(driver) -> tuple:
    """The driver's get_current_device, set_current_device and
    get_current_stream, with torch's C function for the first where the
    driver's is torch.cuda.current_device (whose Python wrapper initializes
    CUDA: done before any launch)."""
    device = driver.get_current_device
    if device is torch.cuda.current_device:
        device = torch._C._cuda_getDevice
    return device, driver.set_current_device, driver.get_current_stream


def launch(plan, site: str, name: str, grid: tuple[int, ...], kwargs: dict, **extra) -> Launch:
    """The plan's Launch for one call site (kernel ``name`` of
    tritonbn.kernels, grid and arguments fixed by the plan), made on first
    use; ``extra`` keyword arguments (a cooperative launch's PHASE) are
    merged into kwargs then, not on every call."""
    found = plan.launches.get(site)
    if found is None:
        found = plan.launches[site] = Launch(name, grid, dict(kwargs, **extra) if extra else kwargs)
    return found
