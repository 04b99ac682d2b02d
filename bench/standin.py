"""Triton's dispatch on a machine without a GPU: a stand-in driver.

``install()`` makes Triton believe it targets an sm_90 GPU: a stand-in driver
is set active (device 0, stream 0, target ``GPUTarget("cuda", 90, 32)``) and
compilation returns a stub kernel. ``kernel[grid](...)`` then runs Triton's
whole Python dispatch on CPU tensors -- binding the arguments, specializing
each one (pointer alignment, integers divisible by 16 or equal to 1, dtypes),
the cache key and lookup, the grid -- and calls the stub's launcher with the
arguments a real launcher would get. Only the compiled launcher's own work
(parsing those arguments in C, the driver call) is missing.

tritonbn runs its Triton path on CPU tensors while a stand-in is installed
(tritonbn.backend), so a whole call -- tritonbn's Python, Triton's dispatch
or tritonbn's direct launch of the compiled kernel -- can be timed here, and
the arguments each launch hands to the launcher can be recorded and
compared (``Recorder``).

It must be installed before tritonbn is imported, in a process where the
Triton interpreter is off (TRITON_INTERPRET unset): the kernels are then
Triton's real JITFunctions.
"""
from __future__ import annotations

import os

import torch

TARGET = ("cuda", 90, 32)


class Recorder:
    """Collects, per launch, what the launcher was handed. ``launches`` holds
    (kernel name, stub kernel, grid, stream, arguments) tuples; a tensor
    argument is recorded as ("tensor", name-or-None, dtype, shape, strides,
    data_ptr % 16), its name taken from ``names`` (data_ptr -> name) for the
    caller's own tensors."""

    def __init__(self):
        self.launches: list[tuple] = []
        self.names: dict[int, str] = {}
        self.on = False

    def describe(self, value):
        if isinstance(value, torch.Tensor):
            return ("tensor", self.names.get(value.data_ptr()), value.dtype, tuple(value.shape),
                    value.stride(), value.data_ptr() % 16)
        return value

    def record(self, kernel, grid, stream, function, packed_metadata, launch_metadata, enter_hook,
               exit_hook, args):
        if self.on:
            self.launches.append((kernel.name, kernel, grid, stream, function, packed_metadata,
                                  tuple(self.describe(a) for a in args)))

    def take(self) -> list[tuple]:
        out, self.launches = self.launches, []
        return out


class StubKernel:
    """What compilation returns under the stand-in: the fields Triton's
    dispatch reads, and a launcher (``run``) that records and returns."""

    def __init__(self, src, options, recorder: Recorder | None):
        self.src = src
        self.name = src.fn.__name__
        self.signature = dict(src.signature)
        self.constants = dict(src.constants)
        self.attrs = dict(src.attrs)
        self.num_warps = options.get("num_warps")
        self.function = id(self)
        self.packed_metadata = (self.num_warps, options.get("num_ctas", 1), 0)
        self.metadata = None
        recorder = recorder or Recorder()

        def run(grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata,
                enter_hook, exit_hook, *args):
            recorder.record(self, (grid_0, grid_1, grid_2), stream, function, packed_metadata,
                            launch_metadata, enter_hook, exit_hook, args)

        self.run = run

    def launch_metadata(self, grid, stream, *args):
        return None

    def __repr__(self):
        return f"StubKernel({self.name}, attrs={self.attrs})"


class StandInDriver:
    """The driver interface Triton's JIT and tritonbn's launcher call."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget(*TARGET)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def is_active(self):
        return True

    def get_benchmarker(self):
        raise RuntimeError("the stand-in driver has no GPU to time kernels on")


_installed: Recorder | None = None


def install() -> Recorder:
    """Set the stand-in driver active and stub compilation (once per process);
    returns the process's Recorder (recording off until ``recorder.on``)."""
    global _installed
    if _installed is not None:
        return _installed
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        raise RuntimeError("the stand-in driver needs Triton's compiled path: unset TRITON_INTERPRET")
    import triton
    import triton.compiler

    recorder = Recorder()

    def compile_stub(src, target=None, options=None, **_):
        return StubKernel(src, options or {}, recorder)

    triton.compiler.compile = compile_stub
    triton.runtime.driver.set_active(StandInDriver())
    import importlib  # tritonbn after the driver: its kernels are then JITFunctions
    importlib.import_module("tritonbn.backend").use_standin_driver()
    _installed = recorder
    return recorder
