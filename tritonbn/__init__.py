"""tritonbn: Batch Normalization for PyTorch, written in Triton.

Nothing here touches a GPU at import time.
"""
import importlib.util
import sys
from pathlib import Path


def _map_checkout_folders() -> None:
    """Make ``tritonbn.kernels`` and ``tritonbn.autotune_cache`` importable from a
    source checkout (PYTHONPATH=.), where those folders sit beside tritonbn/.
    An installed wheel or an editable install maps them itself."""
    root = Path(__file__).resolve().parent.parent
    for name in ("kernels", "autotune_cache"):
        full = f"{__name__}.{name}"
        if full in sys.modules or importlib.util.find_spec(full) is not None:
            continue
        init = root / name / "__init__.py"
        spec = importlib.util.spec_from_file_location(
            full, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)


_map_checkout_folders()

__version__ = "0.1.0"

from . import functional, ops  # noqa: E402  (ops registers the torch.library ops)
from .backend import FallbackWarning, backend  # noqa: E402
from .functional import batch_norm, batch_norm_relu  # noqa: E402
from .fuse import fuse_epilogues  # noqa: E402
from .modules import (  # noqa: E402
    BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm, convert_batchnorm, revert_batchnorm,
)

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FallbackWarning", "SyncBatchNorm", "backend", "batch_norm",
    "batch_norm_relu", "convert_batchnorm", "functional", "fuse_epilogues", "ops", "revert_batchnorm",
]
