"""What both examples share: choosing the batch-norm backend (before tritonbn
is imported), the data (real MNIST from IDX files, or scikit-learn's bundled
8x8 digits), seeded batches, evaluation, and the CSV every curve goes to.

Backends, all with the same seed => the same initial weights and batches:

- ``tritonbn`` (default): tritonbn.BatchNorm1d/2d. On CUDA tensors the
  compiled Triton kernels; on CPU tensors PyTorch's own batch_norm
  (tritonbn's fallback) unless the interpreter is on.
- ``--interpret``: TRITON_INTERPRET=1 is set before tritonbn is imported, so
  the same Triton kernels run on CPU tensors through the Triton interpreter
  (slow: about 0.25 s per MLP step).
- ``--torch-bn``: torch.nn.BatchNorm1d/2d, for reference.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


def add_common_args(parser: argparse.ArgumentParser, steps: int, eval_every: int) -> None:
    parser.add_argument("--data", type=Path, help="folder with the four MNIST IDX files "
                        "(optionally .gz); default: scikit-learn's 8x8 digits")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--eval-every", type=int, default=eval_every)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    backend = parser.add_mutually_exclusive_group()
    backend.add_argument("--interpret", action="store_true",
                         help="run tritonbn's Triton kernels on CPU through the Triton interpreter (slow)")
    backend.add_argument("--torch-bn", action="store_true", help="torch.nn.BatchNorm instead of tritonbn")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV and PNG")
    parser.add_argument("--name", help="file stem (default: the script's name plus the backend)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (small nets gain nothing from more)")
    parser.add_argument("--no-progress", action="store_true")


def configure(args: argparse.Namespace, script: str) -> None:
    """Set the interpreter flag before tritonbn is imported, the thread count,
    and args.bn / args.backend / args.device / args.stem; say what runs."""
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
        args.device = "cpu"
    torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    args.bn = "torch" if args.torch_bn else "tritonbn"
    args.backend = backend_name(args.bn, args.device)
    if args.interpret and args.backend != "tritonbn-interpreter":
        raise RuntimeError("--interpret: tritonbn was imported before TRITON_INTERPRET=1 was set")
    suffix = {"torch.nn": "_torch_bn", "tritonbn-interpreter": "_interpret"}.get(args.backend, "")
    if args.device.type == "cuda":
        suffix += "_cuda"
    args.stem = args.name or script + suffix
    print(f"device: {device_name(args.device)}; batch norm: {args.backend}")
    if args.backend == "tritonbn-torch-fallback":
        print("NOTE: the Triton kernels are NOT running. On CPU tensors tritonbn's modules run "
              "PyTorch's own batch_norm unless TRITON_INTERPRET=1 is set before tritonbn is "
              "imported; pass --interpret to run the Triton kernels through the interpreter "
              "(about 0.25 s per MLP step, so use e.g. --steps 1000).")
        import tritonbn  # imported by backend_name already

        # said just above; tritonbn's own warning would repeat it at the first step
        warnings.filterwarnings("ignore", category=tritonbn.FallbackWarning)


def backend_name(bn: str, device: torch.device) -> str:
    """What computes the batch norm: torch.nn, or tritonbn's kernels (compiled or
    interpreted), or tritonbn's modules on PyTorch's batch_norm."""
    if bn == "torch":
        return "torch.nn"
    import tritonbn  # only now: TRITON_INTERPRET must be set first

    return {"torch": "tritonbn-torch-fallback", "triton": "tritonbn-triton",
            "triton-interpreter": "tritonbn-interpreter"}[tritonbn.backend(device)]


def device_name(device: torch.device) -> str:
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"


def batch_norm_class(bn: str, dims: int) -> type[nn.Module]:
    """BatchNorm1d / 2d of tritonbn or torch.nn."""
    if bn == "torch":
        return getattr(nn, f"BatchNorm{dims}d")
    import tritonbn

    return getattr(tritonbn, f"BatchNorm{dims}d")


# ----------------------------------------------------------------------------- data

def load_args_data(args: argparse.Namespace):
    """load_data for the scripts' --data / --seed; sets args.data_name and says what was loaded."""
    data = load_data(args.data, args.seed)
    args.data_name = "MNIST" if args.data else "digits 8x8"
    print(f"data: {args.data_name}, {len(data[1])} train / {len(data[3])} test images")
    return data


def load_data(data_dir: Path | None, seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test, side): float32 images in [0, 1] of shape
    (n, side * side), int64 labels. MNIST from data_dir's IDX files (its own
    train / test split), else the 8x8 digits with a seeded stratified split."""
    if data_dir is not None:
        return (*load_mnist(data_dir), 28)
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):  # the same share of every digit in the test set
        idx = rng.permutation(np.flatnonzero(y == label))
        test[idx[:round(test_fraction * len(idx))]] = True
    return x[~test], y[~test], x[test], y[test], 8


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzip'd or not: big-endian header of a magic
    number (0, 0, dtype code, ndim) and ndim int32 sizes, then the data."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(data_dir: Path):
    """MNIST's train and test images (flattened, scaled to [0, 1]) and labels."""
    def find(prefix: str) -> Path:
        hits = sorted(p for p in Path(data_dir).iterdir() if p.name.startswith(prefix))
        if not hits:
            raise FileNotFoundError(f"no {prefix}* file in {data_dir} (need the four MNIST IDX files)")
        return hits[0]

    out = []
    for split in ("train", "t10k"):
        images = read_idx(find(f"{split}-images"))
        out += [(images.reshape(len(images), -1) / 255.0).astype(np.float32),
                read_idx(find(f"{split}-labels")).astype(np.int64)]
    return tuple(out)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, device: torch.device):
    """Endless mini-batches, reshuffled every epoch; the same order for a seed."""
    rng = np.random.default_rng(seed)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    while True:
        order = torch.from_numpy(rng.permutation(len(y)))
        for start in range(0, len(y) - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield x[idx].to(device), y[idx].to(device)


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


def progress(total: int, desc: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------- CSV

def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        # 6 significant digits: accuracies are multiples of 1 / (test images)
        writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()}
                         for row in rows)
    print(f"wrote {path}")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def matplotlib_pyplot():
    """pyplot on the Agg backend, or None (and a note) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[examples]'): no figure drawn")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Lay out, write (the folder made if needed) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def train_loop(model: nn.Module, opt: torch.optim.Optimizer, stream, steps: int, eval_every: int, evaluate,
               fixed: dict, desc: str, no_progress: bool, device: torch.device) -> list[dict]:
    """`steps` steps of cross-entropy SGD on batches from `stream`; every
    eval_every steps and at the end, a row: fixed, the step, the mean training
    loss since the last row, and what evaluate(model) returns (with
    test_accuracy)."""
    rows, loss_sum, losses = [], torch.zeros((), device=device), 0
    with progress(steps, desc, no_progress) as bar:
        for step in range(steps + 1):
            if step % eval_every == 0 or step == steps:
                train_loss = (loss_sum / losses).item() if losses else math.nan
                rows.append({**fixed, "step": step, "train_loss": train_loss, **evaluate(model)})
                loss_sum, losses = torch.zeros((), device=device), 0
                bar.set_postfix(acc=f"{rows[-1]['test_accuracy']:.3f}")
            if step == steps:
                break
            x, y = next(stream)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, losses = loss_sum + loss.detach(), losses + 1
            bar.update()
    return rows
