"""Triton's dispatch on a machine without a GPU: a stand-in driver.

``install()`` makes Triton believe it targets an sm_90 GPU: a stand-in driver
is set active (device 0, stream 0, target ``GPUTarget("cuda", 90, 32)``) and
compilation returns a stub kernel. ``kernel[grid](...)`` then runs Triton's
whole Python dispatch on CPU tensors -- binding the arguments, specializing
each one (pointer alignment, integers divisible by 16 or equal to 1, dtypes),
the cache key and lookup, the grid -- and calls the stub's launcher with the
arguments a real launcher would get.

Where it can be built (a C compiler, Triton's CUDA launcher module), the stub
kernel's launcher is Triton's own compiled CUDA launcher, linked against a
stand-in libcuda.so.1 (bench/standin_libcuda/libcuda_stub.c) that answers
every driver call with success: the launcher's C work -- parsing every
argument, a tensor's data_ptr() included, and the call into the driver --
runs for real, and only the driver's own work is missing. Elsewhere the
launcher is a Python function that records and returns, as it is with
TRITONBN_STANDIN_LAUNCHER=python in the environment (``LAUNCHER`` says
which ran: "triton-c" or "python").

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
        self.devices: list[int] = []  # the device current at each recorded launch
        self.names: dict[int, str] = {}
        self.on = False

    def describe(self, value):
        if type(value).__name__ == "HookChain" and not value.calls:
            return None
        if isinstance(value, torch.Tensor):
            return ("tensor", self.names.get(value.data_ptr()), value.dtype, tuple(value.shape),
                    value.stride(), value.data_ptr() % 16)
        return value

    def record(self, kernel, grid, stream, function, packed_metadata, launch_metadata, enter_hook,
               exit_hook, args):
        if self.on:
            self.devices.append(_current_device())
            self.launches.append((kernel.name, kernel, grid, stream, function, packed_metadata,
                                  tuple(self.describe(a) for a in args)))

    def record_entry(self, kernel, args):
        """A launch as it reaches Triton's compiled C launcher: every argument
        of its entry (the kernel's arguments as one tuple or flat), an empty
        launch-hook chain as None (the launcher calls neither: a direct launch
        passes None)."""
        if self.on:
            self.devices.append(_current_device())
            self.launches.append((kernel.name, kernel, tuple(
                tuple(self.describe(a) for a in arg) if isinstance(arg, tuple) else self.describe(arg)
                for arg in args)))

    def take(self) -> list[tuple]:
        out, self.launches = self.launches, []
        return out


def _current_device() -> int:
    import triton
    return triton.runtime.driver.active.get_current_device()


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
        self.launch_cooperative_grid = bool(options.get("launch_cooperative_grid", False))
        self.function = id(self)
        self.packed_metadata = (self.num_warps, options.get("num_ctas", 1), 0)
        self.metadata = None
        recorder = recorder or Recorder()
        if LAUNCHER == "triton-c":
            # Triton's own launcher: what its dispatch and a direct launch call alike; the
            # recorder sees what reaches its compiled C entry
            from triton.backends.nvidia.driver import CudaLauncher
            self.run = CudaLauncher(src, _LauncherMetadata(options))
            if _RECORD:
                entry = self.run.launch

                def recorded(*args):
                    recorder.record_entry(self, args)
                    return entry(*args)
                self.run.launch = recorded
            return
        record = recorder.record

        def run(grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata,
                enter_hook, exit_hook, *args):
            record(self, (grid_0, grid_1, grid_2), stream, function, packed_metadata,
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
        self.device = 0  # the current device: a test may make another current, as torch.cuda.set_device

    def get_current_device(self):
        return self.device

    def set_current_device(self, device):
        self.device = device

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
_RECORD = True  # whether launches can be recorded (install's record)
LAUNCHER = "python"  # "triton-c" once install() has built Triton's C launcher against the stand-in libcuda


class _LauncherMetadata:
    """The compiled-kernel metadata Triton's CudaLauncher reads: no scratch
    memory, one CTA, no PDL; a cooperative grid where the launch asked for
    one (launch_cooperative_grid)."""
    num_ctas = 1
    global_scratch_size = profile_scratch_size = 0
    global_scratch_align = profile_scratch_align = 1
    launch_pdl = False
    tensordesc_meta = None

    def __init__(self, options):
        self.launch_cooperative_grid = bool(options.get("launch_cooperative_grid", False))


_libcuda = None  # the stand-in libcuda, once loaded


def driver_launches() -> int:
    """Launches that reached the stand-in libcuda (through Triton's C launcher)."""
    import ctypes
    return 0 if _libcuda is None else ctypes.c_ulonglong.in_dll(_libcuda, "tritonbn_stub_launches").value


def _build_c_launcher(driver) -> bool:
    """Compile the stand-in libcuda, load it under its soname (libcuda.so.1,
    which Triton's launcher links and dlopens), and give the driver Triton's
    CudaUtils built against it. False where any step fails (no compiler, a
    Triton without that module): the Python launcher is used."""
    import ctypes
    import subprocess
    import tempfile
    here = os.path.dirname(os.path.abspath(__file__))
    source = os.path.join(here, "standin_libcuda", "libcuda_stub.c")
    out = os.path.join(tempfile.gettempdir(), f"tritonbn-standin-libcuda-{os.getuid()}")
    try:
        os.makedirs(out, exist_ok=True)
        library = os.path.join(out, "libcuda.so.1")
        if not os.path.exists(library) or os.path.getmtime(library) < os.path.getmtime(source):
            built = f"{library}.{os.getpid()}"  # several processes (test workers) may build at once
            subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-Wl,-soname,libcuda.so.1", "-o", built, source],
                           check=True, capture_output=True)
            os.replace(built, library)
        if not os.path.exists(os.path.join(out, "libcuda.so")):
            try:
                os.symlink("libcuda.so.1", os.path.join(out, "libcuda.so"))
            except FileExistsError:
                pass
        global _libcuda
        _libcuda = ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
        os.environ["TRITON_LIBCUDA_PATH"] = out
        from triton.backends.nvidia.driver import CudaUtils
        driver.utils = CudaUtils()
        return True
    except Exception:  # noqa: BLE001 - any failure: the Python launcher
        return False


def install(record: bool = True) -> Recorder:
    """Set the stand-in driver active and stub compilation (once per process);
    returns the process's Recorder (recording off until ``recorder.on``).
    record=False (a benchmark): Triton's C launcher is called as it is, with
    nothing in front of it, and the recorder sees no launch."""
    global _installed, LAUNCHER, _RECORD
    if _installed is not None:
        return _installed
    _RECORD = record
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        raise RuntimeError("the stand-in driver needs Triton's compiled path: unset TRITON_INTERPRET")
    import triton
    import triton.compiler

    recorder = Recorder()

    def compile_stub(src, target=None, options=None, **_):
        return StubKernel(src, options or {}, recorder)

    triton.compiler.compile = compile_stub
    driver = StandInDriver()
    if os.environ.get("TRITONBN_STANDIN_LAUNCHER", "c") == "c" and _build_c_launcher(driver):
        LAUNCHER = "triton-c"
    triton.runtime.driver.set_active(driver)
    import importlib  # tritonbn after the driver: its kernels are then JITFunctions
    importlib.import_module("tritonbn.backend").use_standin_driver()
    _installed = recorder
    return recorder
