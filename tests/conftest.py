"""Test setup: on a machine without CUDA, run the Triton kernels on the CPU
through the Triton interpreter. The variable must be set before tritonbn's
kernels are decorated, i.e. before anything imports tritonbn."""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# never read or write the user's autotune cache from the tests, and test the
# heuristic's configs (tests/test_autotune.py turns tuning on where it tests it)
os.environ["TRITONBN_CACHE_DIR"] = tempfile.mkdtemp(prefix="tritonbn-test-cache-")
os.environ["TRITONBN_AUTOTUNE"] = "0"

import pytest  # noqa: E402

import tritonbn  # noqa: E402,F401


@pytest.fixture(scope="session")
def device() -> str:
    """Where the kernels under test run: the GPU if there is one, else the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
