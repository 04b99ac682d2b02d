"""The Inception comparison of Ioffe & Szegedy (2015) (their Figure 2 and the
table of steps to the baseline's accuracy), on a small conv net with tritonbn.

The net: 4 blocks of conv 3x3 -> [tritonbn.BatchNorm2d] -> ReLU or sigmoid,
global average pooling, a linear softmax head; SGD with momentum 0.9 on
mini-batches of 32. Variants, as in the paper:

    Baseline          no BN, ReLU,    lr       (the paper's "Inception")
    BN-Baseline       BN,    ReLU,    lr
    BN-x5             BN,    ReLU,    5 lr
    BN-x30            BN,    ReLU,    30 lr
    BN-x5-Sigmoid     BN,    sigmoid, 5 lr
    Baseline-Sigmoid  no BN, sigmoid, lr       (the paper's Inception with sigmoid)

For each: steps until the test accuracy first reaches the Baseline's best,
and the best accuracy. Only the learning rate changes between the BN
variants (the paper's BN-x5 / x30 also dropped dropout, lowered the L2
weight, sped up the decay, removed LRN and shuffled more; none of those
exist in this net).

    python -m examples.inception_variants              # 8x8 digits, CPU: minutes
    python -m examples.inception_variants --torch-bn   # torch.nn.BatchNorm2d reference

Writes examples/results/<stem>.csv, <stem>.md (the table) and <stem>.png.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

from . import common

# name: (batch norm, activation, learning-rate multiplier)
VARIANTS = {
    "Baseline": (False, "relu", 1),
    "BN-Baseline": (True, "relu", 1),
    "BN-x5": (True, "relu", 5),
    "BN-x30": (True, "relu", 30),
    "BN-x5-Sigmoid": (True, "sigmoid", 5),
    "Baseline-Sigmoid": (False, "sigmoid", 1),
}


class ConvNet(nn.Module):
    """Blocks of conv 3x3 -> [batch norm] -> activation, global average pool,
    linear head. With batch norm the convs have no bias."""

    def __init__(self, side: int, batch_norm: type[nn.Module] | None, activation: str,
                 width: int = 16, n_out: int = 10) -> None:
        super().__init__()
        self.side = side
        act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[activation]
        layers, c_in = [], 1
        for c_out, stride in ((width, 1), (2 * width, 2), (2 * width, 1), (4 * width, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=batch_norm is None),
                       batch_norm(c_out) if batch_norm else nn.Identity(), act()]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, self.side, self.side)))


def he_init_(model: nn.Module, seed: int) -> nn.Module:
    """He-normal weights from a seeded generator, biases 0: every variant (and
    backend) starts from the same weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.zero_()
    return model


def train(variant: str, args: argparse.Namespace, data) -> list[dict]:
    """Train one variant for args.steps steps; one row per evaluation."""
    x_train, y_train, x_test, y_test, side = data
    use_bn, activation, multiplier = VARIANTS[variant]
    batch_norm = common.batch_norm_class(args.bn, 2) if use_bn else None
    model = he_init_(ConvNet(side, batch_norm, activation, args.width), args.seed).to(args.device)
    lr = args.lr * multiplier
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    stream = common.batches(x_train, y_train, args.batch_size, args.seed, args.device)
    x_test, y_test = torch.from_numpy(x_test).to(args.device), torch.from_numpy(y_test).to(args.device)
    fixed = {"experiment": "inception_variants", "data": args.data_name, "variant": variant,
             "batch_norm": use_bn, "activation": activation, "lr": lr, "backend": args.backend,
             "device": common.device_name(args.device), "seed": args.seed, "batch_size": args.batch_size}

    def evaluate(m: nn.Module) -> dict:
        m.eval()
        with torch.no_grad():
            acc = common.accuracy(m(x_test), y_test)
        m.train()
        return {"test_accuracy": acc}

    return common.train_loop(model, opt, stream, args.steps, args.eval_every, evaluate, fixed,
                             f"{variant} ({args.backend})", args.no_progress, args.device)


def steps_table(rows: list[dict]) -> str:
    """Markdown: per variant, steps until the test accuracy first reaches the
    Baseline's best, and the best accuracy (the paper's table)."""
    curves = {}
    for r in rows:
        curves.setdefault(r["variant"], []).append((int(r["step"]), float(r["test_accuracy"])))
    target = max(acc for _, acc in curves["Baseline"])
    lines = [f"| model | lr | steps to {100 * target:.1f}% | max accuracy |", "|---|---|---:|---:|"]
    for variant, curve in curves.items():
        lr = next(r["lr"] for r in rows if r["variant"] == variant)
        reached = next((step for step, acc in curve if acc >= target), None)
        steps = f"{reached:,}" if reached is not None else "not reached"
        lines.append(f"| {variant} | {float(lr):g} | {steps} | {100 * max(a for _, a in curve):.1f}% |")
    return "\n".join(lines) + "\n"


def plot(csv_path: Path, png_path: Path) -> bool:
    """Test accuracy against steps, one line per variant, and the Baseline's best."""
    plt = common.matplotlib_pyplot()
    if plt is None:
        return False
    rows = common.read_csv(csv_path)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        curve = [r for r in rows if r["variant"] == variant]
        for ax in axes:
            ax.plot([int(r["step"]) for r in curve], [float(r["test_accuracy"]) for r in curve],
                    "--" if variant.startswith("Baseline") else "-",
                    label=f"{variant} (lr {float(curve[0]['lr']):g})")
    if any(r["variant"] == "Baseline" for r in rows):
        best = max(float(r["test_accuracy"]) for r in rows if r["variant"] == "Baseline")
        for ax in axes:
            ax.axhline(best, color="gray", lw=0.8, ls=":")
    axes[0].set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1), title="test accuracy")
    axes[1].set(xlabel="training step", ylim=(0.9, 1.0), title="zoom; dotted: the Baseline's best")
    axes[0].legend(fontsize=8, loc="center right")
    fig.suptitle(f"small conv net, {rows[0]['data']}, SGD momentum 0.9, batch {rows[0]['batch_size']}; "
                 f"batch norm: {rows[0]['backend']} on {rows[0]['device']}", fontsize=9)
    common.save_figure(fig, png_path)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, steps=3000, eval_every=50)
    parser.add_argument("--lr", type=float, default=0.003, help="the Baseline's learning rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=16, help="channels of the first block")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    common.configure(args, "inception_variants")
    data = common.load_args_data(args)
    rows = [row for variant in args.variants for row in train(variant, args, data)]
    csv_path = args.out / f"{args.stem}.csv"
    common.write_csv(rows, csv_path)
    if "Baseline" in args.variants:
        table = steps_table(rows)
        print(table)
        csv_path.with_suffix(".md").write_text(table)
    plot(csv_path, csv_path.with_suffix(".png"))
    return rows


if __name__ == "__main__":
    main()
