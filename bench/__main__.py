"""python -m bench: see bench/runner.py."""
import os

import torch

if not torch.cuda.is_available():
    # no GPU: run the same Triton kernels on the interpreter (set before tritonbn is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .runner import run  # noqa: E402

run()
