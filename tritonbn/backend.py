"""Which backend computes tritonbn's batch norm for a device, and the one
warning given when it is not the Triton kernels.

    "triton"              CUDA tensors: the compiled Triton kernels
    "triton-interpreter"  CPU tensors with the Triton interpreter on
                          (TRITON_INTERPRET=1 before ``import tritonbn``)
    "triton-standin"      CPU tensors through Triton's dispatch to a stand-in
                          driver that launches nothing (bench/standin.py:
                          host-time measurements and launch checks only)
    "torch"               other CPU tensors and other devices: PyTorch's own
                          batch_norm (tritonbn/fallback.py)

Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when tritonbn is
imported (kernels.INTERPRETED); setting it later changes nothing, which the
fallback warning explains.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

from . import kernels
from .autotune import forced_configs


class FallbackWarning(UserWarning):
    """tritonbn ran PyTorch's batch_norm instead of its Triton kernels. Given once
    per process; silence it with
    ``warnings.filterwarnings("ignore", category=tritonbn.FallbackWarning)``."""


_standin = False


def use_standin_driver() -> None:
    """CPU tensors take the Triton path through a stand-in driver (set by
    bench/standin.py, which also makes compilation a stub): their results are
    not computed. For measuring and checking the host path only."""
    global _standin
    _standin = True


def backend(tensor_or_device) -> str:
    """"triton", "triton-interpreter" or "torch": what runs tritonbn's batch norm
    for a tensor, or for tensors on a device (a torch.device or a string such as
    "cuda:0" or "cpu")."""
    device = tensor_or_device.device if isinstance(tensor_or_device, torch.Tensor) \
        else torch.device(tensor_or_device)
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and kernels.INTERPRETED:
        return "triton-interpreter"
    if device.type == "cpu" and _standin:
        return "triton-standin"
    return "torch"


def runs_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels (compiled or interpreted) handle this tensor.
    On every call's path: one device lookup; the fallback branch also warns
    (once) through note_fallback."""
    kind = t.device.type
    if kind == "cuda" or (kind == "cpu" and (kernels.INTERPRETED or _standin)):
        return True
    note_fallback(kind)
    return False


_warned_fallback = False
_warned_override = False


def note_fallback(device_type: str) -> None:
    """Called where a call falls back to PyTorch's batch_norm: the first time,
    warn why and how to run the kernels; and once more if an
    autotune.override block is in force there, since it then does nothing."""
    global _warned_fallback, _warned_override
    if not _warned_fallback:
        _warned_fallback = True
        _warn(fallback_message(device_type))
    if not _warned_override:
        if forced_configs():
            _warned_override = True
            _warn(f"tritonbn.autotune.override(...) has no effect on {device_type} tensors here: they run "
                  f"PyTorch's batch_norm (backend 'torch'), not the Triton kernels whose launch "
                  f"settings it forces.")


def fallback_message(device_type: str) -> str:
    """Why a tensor on ``device_type`` runs PyTorch's batch_norm, and how to run the kernels."""
    tail = ("tritonbn.backend(x) names the backend; silence this with "
            'warnings.filterwarnings("ignore", category=tritonbn.FallbackWarning).')
    if device_type != "cpu":
        return (f"tritonbn is running PyTorch's own batch_norm on {device_type} tensors: its Triton kernels "
                f"run on CUDA tensors (and on CPU tensors through the Triton interpreter). {tail}")
    where = "" if torch.cuda.is_available() else "no CUDA GPU here; "
    if _interpreter_requested():
        why = ("TRITON_INTERPRET=1 is set now, but it was not when tritonbn was imported: Triton reads it "
               "when the kernels are defined, at `import tritonbn`, so setting it afterwards leaves the "
               "interpreter off. Set it before that import (TRITON_INTERPRET=1 python ..., or os.environ "
               "before the first import of tritonbn or of anything that imports it).")
    else:
        why = ("The Triton interpreter is off. To run the Triton kernels on CPU tensors (slow; for tests "
               "and checks), set TRITON_INTERPRET=1 before `import tritonbn`; on a GPU, use CUDA tensors.")
    return (f"tritonbn is running PyTorch's own batch_norm on CPU tensors, not its Triton kernels ({where}"
            f"the results are PyTorch's). {why} {tail}")


def _interpreter_requested() -> bool:
    """TRITON_INTERPRET as Triton parses it now ("1", "true", "on", ...)."""
    try:
        import triton
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # a triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# frames in these folders are tritonbn's or torch's, not the user's
_INTERNAL = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__))


def _warn(message: str) -> None:
    """warnings.warn attributed to the first caller outside tritonbn and torch,
    so the warning names the user's line (and its filters apply there)."""
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, FallbackWarning, stacklevel=level)
