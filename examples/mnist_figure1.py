"""Figure 1 of Ioffe & Szegedy (2015), "Batch Normalization", with tritonbn.

An MLP of 3 hidden layers of 100 sigmoid units and a softmax output, weights
drawn from a small Gaussian, trained with plain SGD on mini-batches of 60,
with and without tritonbn.BatchNorm1d before each sigmoid. Recorded every
--eval-every steps on the test set: accuracy (the figure's panel a) and the
15th / 50th / 85th percentiles of one last-hidden-layer sigmoid's input
(panels b, without BN, and c, with BN).

    python -m examples.mnist_figure1                         # 8x8 digits, CPU: minutes
    python -m examples.mnist_figure1 --data ~/mnist          # the four MNIST IDX files
    python -m examples.mnist_figure1 --interpret --steps 500 --nets bn   # Triton interpreter
    python -m examples.mnist_figure1 --torch-bn              # torch.nn.BatchNorm1d reference

Writes examples/results/<stem>.csv (one row per net and evaluation) and
<stem>.png. See examples/common.py for the backends.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from . import common

NETS = {"bn": "with BN", "no_bn": "without BN"}


class SigmoidMLP(nn.Module):
    """depth x (Linear -> [batch norm] -> sigmoid), then a linear softmax layer.
    With batch norm the hidden Linear layers have no bias (BN's shift replaces it)."""

    def __init__(self, n_in: int, batch_norm: type[nn.Module] | None,
                 hidden: int = 100, depth: int = 3, n_out: int = 10) -> None:
        super().__init__()
        sizes = [n_in] + [hidden] * depth
        self.linears = nn.ModuleList(nn.Linear(a, b, bias=batch_norm is None)
                                     for a, b in zip(sizes, sizes[1:]))
        self.norms = nn.ModuleList(batch_norm(hidden) if batch_norm else nn.Identity()
                                   for _ in range(depth))
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_and_last_input(x)[0]

    def logits_and_last_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the last hidden layer's sigmoid inputs."""
        for linear, norm in zip(self.linears, self.norms):
            z = norm(linear(x))
            x = torch.sigmoid(z)
        return self.head(x), z


def gaussian_init_(model: nn.Module, std: float, seed: int) -> nn.Module:
    """Weights ~ N(0, std^2) from a seeded generator (the same for either net and
    every backend, since the Linear shapes are the same), biases 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                if m.bias is not None:
                    m.bias.zero_()
    return model


@torch.no_grad()
def evaluate(model: SigmoidMLP, x: torch.Tensor, y: torch.Tensor, unit: int) -> dict:
    model.eval()
    logits, z = model.logits_and_last_input(x)
    model.train()
    p15, p50, p85 = torch.quantile(z[:, unit].float(), torch.tensor([0.15, 0.5, 0.85], device=z.device))
    return {"test_accuracy": common.accuracy(logits, y),
            "p15": p15.item(), "p50": p50.item(), "p85": p85.item()}


def train(net: str, args: argparse.Namespace, data) -> list[dict]:
    """Train one net for args.steps steps; one row per evaluation."""
    x_train, y_train, x_test, y_test, _ = data
    batch_norm = common.batch_norm_class(args.bn, 1) if net == "bn" else None
    model = gaussian_init_(SigmoidMLP(x_train.shape[1], batch_norm), args.init_std, args.seed)
    model.to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    stream = common.batches(x_train, y_train, args.batch_size, args.seed, args.device)
    x_test, y_test = torch.from_numpy(x_test).to(args.device), torch.from_numpy(y_test).to(args.device)
    fixed = {"experiment": "mnist_figure1", "data": args.data_name, "net": net, "backend": args.backend,
             "device": common.device_name(args.device), "seed": args.seed, "lr": args.lr,
             "batch_size": args.batch_size, "init_std": args.init_std, "unit": args.unit}
    return common.train_loop(model, opt, stream, args.steps, args.eval_every,
                             lambda m: evaluate(m, x_test, y_test, args.unit), fixed,
                             f"{net} ({args.backend})", args.no_progress, args.device)


def plot(csv_path: Path, png_path: Path) -> bool:
    """Figure 1's layout from a CSV: (a) test accuracy, (b) / (c) percentiles of
    the sigmoid input without / with BN. False when matplotlib is missing."""
    plt = common.matplotlib_pyplot()
    if plt is None:
        return False
    rows = common.read_csv(csv_path)
    curves = {net: [r for r in rows if r["net"] == net] for net in NETS}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[2].sharey(axes[1])
    for net, style in (("no_bn", "--"), ("bn", "-")):
        if curves[net]:
            axes[0].plot([int(r["step"]) for r in curves[net]],
                         [float(r["test_accuracy"]) for r in curves[net]], style, label=NETS[net])
    axes[0].set(title="(a) test accuracy", xlabel="training step", ylabel="accuracy")
    axes[0].legend()
    for ax, net, label in ((axes[1], "no_bn", "(b)"), (axes[2], "bn", "(c)")):
        ax.set(title=f"{label} last-layer sigmoid input, {NETS[net]}", xlabel="training step")
        if not curves[net]:
            ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
            continue
        steps = [int(r["step"]) for r in curves[net]]
        for col in ("p85", "p50", "p15"):
            values = [float(r[col]) for r in curves[net]]
            ax.plot(steps, values, "k-", lw=1)
            ax.annotate(f"{col[1:]}th", (steps[-1], values[-1]), fontsize=8, va="bottom", ha="right")
    first = rows[0]
    fig.suptitle(f"MLP 3x100 sigmoid, {first['data']}, SGD lr {first['lr']}, batch {first['batch_size']}; "
                 f"batch norm: {first['backend']} on {first['device']}", fontsize=9)
    common.save_figure(fig, png_path)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, steps=50_000, eval_every=50)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--init-std", type=float, default=0.05, help="std of the Gaussian initial weights")
    parser.add_argument("--unit", type=int, default=0, help="which last-hidden-layer sigmoid to follow")
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS))
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    common.configure(args, "mnist_figure1")
    data = common.load_args_data(args)
    rows = [row for net in args.nets for row in train(net, args, data)]
    for net in args.nets:
        last = [r for r in rows if r["net"] == net][-1]
        print(f"{NETS[net]:>10}: test accuracy {last['test_accuracy']:.4f} after {last['step']} steps")
    csv_path = args.out / f"{args.stem}.csv"
    common.write_csv(rows, csv_path)
    plot(csv_path, csv_path.with_suffix(".png"))
    return rows


if __name__ == "__main__":
    main()
