"""Triton kernels of tritonbn (installed as ``tritonbn.kernels``).

Only @triton.jit code lives here: no torch.nn, no autograd, no launch logic.
``tritonbn.launch`` picks the views, blocks and grids and calls these.
"""
from .backward import (
    bn_bwd_coop_kernel, bn_bwd_dx_kernel, bn_bwd_reduce_kernel, bn_bwd_resident_kernel, bn_bwd_sums_kernel,
)
from .forward import (
    bn_fwd_coop_kernel, bn_fwd_merge_kernel, bn_fwd_normalize_kernel, bn_fwd_resident_kernel, bn_fwd_stats_kernel,
)
from .inference import bn_inference_flat_kernel, bn_inference_kernel

try:  # triton >= 3.0 returns an InterpretedFunction from @jit when TRITON_INTERPRET=1
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted

    INTERPRETED = isinstance(bn_inference_kernel, _Interpreted)
except ImportError:  # pragma: no cover - layout of older/newer triton
    import os

    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = [
    "INTERPRETED",
    "bn_bwd_coop_kernel",
    "bn_bwd_dx_kernel",
    "bn_bwd_reduce_kernel",
    "bn_bwd_resident_kernel",
    "bn_bwd_sums_kernel",
    "bn_fwd_coop_kernel",
    "bn_fwd_merge_kernel",
    "bn_fwd_normalize_kernel",
    "bn_fwd_resident_kernel",
    "bn_fwd_stats_kernel",
    "bn_inference_flat_kernel",
    "bn_inference_kernel",
]
