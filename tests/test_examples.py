"""examples/ keep working: each example trains a few steps into tmp_path and
writes its CSV (and PNG where matplotlib is installed), and tritonbn's
kernels train the Figure 1 MLP as torch.nn.BatchNorm1d does.

Under tests/conftest.py a CPU-only machine runs tritonbn's Triton kernels
through the interpreter in-process, so these calls exercise the same path
as ``python -m examples.mnist_figure1 --interpret``.
"""
import gzip
import importlib.util

import numpy as np
import pytest

from examples import common, compare, inception_variants, mnist_figure1

needs_digits = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None or importlib.util.find_spec("tqdm") is None,
    reason="the examples need scikit-learn (bundled digits) and tqdm: pip install -e '.[examples]'")
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

MNIST_COLUMNS = {"experiment", "data", "net", "backend", "device", "seed", "lr", "batch_size", "init_std",
                 "unit", "step", "train_loss", "test_accuracy", "p15", "p50", "p85"}
INCEPTION_COLUMNS = {"experiment", "data", "variant", "batch_norm", "activation", "lr", "backend", "device",
                     "seed", "batch_size", "step", "train_loss", "test_accuracy"}


def kernel_backend() -> str:
    """What tritonbn's modules run on in this test process."""
    import torch

    return "tritonbn-triton" if torch.cuda.is_available() else "tritonbn-interpreter"


@needs_digits
def test_mnist_figure1_writes_every_curve(tmp_path):
    mnist_figure1.main(["--steps", "4", "--eval-every", "2", "--out", str(tmp_path), "--name", "run",
                        "--no-progress"])
    rows = common.read_csv(tmp_path / "run.csv")
    assert set(rows[0]) == MNIST_COLUMNS
    assert [(r["net"], r["step"]) for r in rows] == [(n, s) for n in ("bn", "no_bn") for s in ("0", "2", "4")]
    assert {r["backend"] for r in rows} == {kernel_backend()}
    assert all(float(r["p15"]) <= float(r["p50"]) <= float(r["p85"]) for r in rows)
    if HAS_MATPLOTLIB:
        assert (tmp_path / "run.png").stat().st_size > 0


@needs_digits
def test_inception_variants_writes_curves_and_table(tmp_path):
    inception_variants.main(["--steps", "2", "--eval-every", "2", "--width", "2", "--batch-size", "8",
                             "--out", str(tmp_path), "--name", "run", "--no-progress"])
    rows = common.read_csv(tmp_path / "run.csv")
    assert set(rows[0]) == INCEPTION_COLUMNS
    assert list(dict.fromkeys(r["variant"] for r in rows)) == list(inception_variants.VARIANTS)
    assert all(float(r["lr"]) == pytest.approx(30 * 0.003) for r in rows if r["variant"] == "BN-x30")
    table = (tmp_path / "run.md").read_text().splitlines()
    assert len(table) == 2 + len(inception_variants.VARIANTS)
    if HAS_MATPLOTLIB:
        assert (tmp_path / "run.png").stat().st_size > 0


def test_steps_table_counts_steps_to_the_baselines_best():
    curves = {"Baseline": [0.1, 0.5, 0.8, 0.7], "BN-x5": [0.1, 0.9, 0.9, 0.9], "Baseline-Sigmoid": [0.1] * 4}
    rows = [{"variant": v, "lr": 0.1, "step": 10 * i, "test_accuracy": a}
            for v, accs in curves.items() for i, a in enumerate(accs)]
    table = inception_variants.steps_table(rows)
    assert "| Baseline | 0.1 | 20 | 80.0% |" in table
    assert "| BN-x5 | 0.1 | 10 | 90.0% |" in table
    assert "| Baseline-Sigmoid | 0.1 | not reached | 10.0% |" in table


@needs_digits
def test_kernels_train_the_mlp_as_torch_batchnorm_does(tmp_path):
    """Same seed => same weights and batches: after a few SGD steps the tritonbn
    run (interpreter on CPU) and the torch.nn.BatchNorm1d run agree."""
    argv = ["--nets", "bn", "--steps", "6", "--eval-every", "3", "--out", str(tmp_path), "--no-progress"]
    mnist_figure1.main(argv + ["--name", "kernels"])
    mnist_figure1.main(argv + ["--name", "torch", "--torch-bn"])
    assert {r["backend"] for r in common.read_csv(tmp_path / "kernels.csv")} == {kernel_backend()}
    stats = compare.compare(tmp_path / "kernels.csv", tmp_path / "torch.csv")
    assert stats["bn"]["steps"] == 3
    assert stats["bn"]["test_accuracy"] <= 1 / 359  # at most one test image classified differently
    for col in ("p15", "p50", "p85"):
        assert stats["bn"][col] < 1e-4, col
    torch_rows = common.read_csv(tmp_path / "torch.csv")
    assert float(torch_rows[-1]["train_loss"]) < float(torch_rows[1]["train_loss"])  # it trains


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_reads_idx_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": np.arange(5, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": np.array([7, 8, 9], dtype=np.uint8)}
    for name, a in arrays.items():
        raw = bytes([0, 0, 8, a.ndim]) + np.array(a.shape, dtype=">i4").tobytes() + a.tobytes()
        path = tmp_path / (name + (".gz" if compress else ""))
        path.write_bytes(gzip.compress(raw) if compress else raw)
    x_train, y_train, x_test, y_test, side = common.load_data(tmp_path)
    assert side == 28 and x_train.shape == (5, 784) and x_test.shape == (3, 784)
    np.testing.assert_allclose(x_train[2], arrays["train-images-idx3-ubyte"][2].ravel() / 255.0, rtol=1e-6)
    assert y_train.tolist() == [0, 1, 2, 3, 4] and y_test.tolist() == [7, 8, 9]


def test_load_mnist_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-labels|train-images"):
        common.load_mnist(tmp_path)
