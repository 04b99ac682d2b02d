"""Draw a benchmark CSV: fraction of copy bandwidth per shape, one line per
provider, one panel per (mode, dtype, layout); for rows that were not timed
(the interpreter's correctness-only run), each provider's error as a fraction
of the dtype's tolerance instead. Needs matplotlib (the bench extra).

    python -m bench.plot bench/results/<gpu>.csv [--out plot.png]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd


def plot(csv_path: Path, out: Path | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.read_csv(csv_path)
    # the newest measurement of each row
    df = df.sort_values("timestamp").drop_duplicates(
        ["device", "mode", "shape", "dtype", "layout", "provider"], keep="last")
    column, label, title = _metric(df)
    panels = sorted(df.groupby(["mode", "dtype", "layout"]).groups)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, (mode, dtype, layout) in zip(axes.flat, panels):
        panel = df[(df["mode"] == mode) & (df.dtype == dtype) & (df.layout == layout)]
        shapes = sorted(set(panel["shape"]), key=lambda s: math.prod(int(v) for v in s.split("x")))
        for provider, group in panel.groupby("provider"):
            by_shape = group.set_index("shape")[column].reindex(shapes)
            ax.plot(range(len(shapes)), by_shape.values, marker="o", label=provider)
        ax.set_title(f"{mode} {dtype} {layout}", fontsize=10)
        ax.set_xticks(range(len(shapes)), shapes, rotation=70, fontsize=6)
        ax.set_ylabel(label)
        if column == "error_vs_tolerance":
            ax.set_yscale("log")
            ax.axhline(1.0, color="red", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{df.device.iloc[-1]}: {title}")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out = out or Path(csv_path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


ERROR_FLOOR = 1e-6


def _metric(df: pd.DataFrame) -> tuple[str, str, str]:
    """(column, axis label, title): bandwidth where rows were timed; else the
    error over the tolerance, added to df as error_vs_tolerance."""
    if df.frac_copy.notna().any():
        return "frac_copy", "fraction of copy bandwidth", "bandwidth per shape (minimal-bytes model / copy)"
    from tritonbn.autotune.shapes import DTYPES

    from .runner import TOLERANCE
    ratio = df.max_error / df.dtype.map(lambda name: TOLERANCE[DTYPES[name]])
    df["error_vs_tolerance"] = ratio.clip(lower=ERROR_FLOOR)  # an exact result, on a log axis
    return ("error_vs_tolerance", f"max error / tolerance (exact: {ERROR_FLOOR:g})",
            "correctness per shape, not timed (error over the dtype's tolerance; red line: the tolerance)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        print(plot(args.csv, args.out))
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("matplotlib"):
            raise
        print('python -m bench.plot needs matplotlib: pip install -e ".[bench]"', file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
