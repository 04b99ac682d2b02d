"""Compare two result CSVs of the same example (e.g. the Triton interpreter run
against the fast run, or tritonbn against torch.nn.BatchNorm): for each curve
in both (a net of mnist_figure1, a variant of inception_variants), the
largest |difference| of test accuracy, and of the sigmoid-input percentiles
where present, at the steps both evaluated.

    python -m examples.compare examples/results/mnist_figure1.csv examples/results/mnist_figure1_interpret.csv

``--png FILE`` also draws both runs' test accuracy up to their last common step.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import matplotlib_pyplot, read_csv, save_figure

COLUMNS = ("test_accuracy", "p15", "p50", "p85")


def compare(a: Path, b: Path) -> dict[str, dict]:
    """{curve: {"steps": common steps, "last_step": ..., column: max |a - b|}}."""
    rows_a, rows_b = read_csv(a), read_csv(b)
    key = "net" if "net" in rows_a[0] else "variant"
    index_b = {(r[key], r["step"]): r for r in rows_b}
    out: dict[str, dict] = {}
    for ra in rows_a:
        rb = index_b.get((ra[key], ra["step"]))
        if rb is None:
            continue
        stats = out.setdefault(ra[key], {"steps": 0, "last_step": 0})
        stats["steps"] += 1
        stats["last_step"] = max(stats["last_step"], int(ra["step"]))
        for col in COLUMNS:
            if col in ra and col in rb:
                stats[col] = max(stats.get(col, 0.0), abs(float(ra[col]) - float(rb[col])))
    return out


def plot(a: Path, b: Path, png: Path) -> None:
    plt = matplotlib_pyplot()
    if plt is None:
        return
    runs = [read_csv(a), read_csv(b)]
    key = "net" if "net" in runs[0][0] else "variant"
    last = max(stats["last_step"] for stats in compare(a, b).values())
    fig, ax = plt.subplots(figsize=(7, 4))
    for rows, style in zip(runs, ("-", "o")):
        for curve in dict.fromkeys(r[key] for r in rows):
            points = [(int(r["step"]), float(r["test_accuracy"])) for r in rows
                      if r[key] == curve and int(r["step"]) <= last]
            ax.plot(*zip(*points), style, ms=4, fillstyle="none", label=f"{curve}: {rows[0]['backend']}")
    ax.set(xlabel="training step", ylabel="test accuracy", title=f"{a.name} vs {b.name} (same seed)")
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, png)


def main(argv=None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--png", type=Path, help="draw both runs' test accuracy here")
    args = parser.parse_args(argv)
    result = compare(args.a, args.b)
    backends = [read_csv(p)[0]["backend"] for p in (args.a, args.b)]
    print(f"{args.a.name} ({backends[0]}) vs {args.b.name} ({backends[1]}): max |difference| at common steps")
    for curve, stats in result.items():
        diffs = ", ".join(f"{col} {stats[col]:.2g}" for col in COLUMNS if col in stats)
        print(f"  {curve}: {stats['steps']} evaluations up to step {stats['last_step']}: {diffs}")
    if not result:
        print("  no curve and step in common")
    elif args.png:
        plot(args.a, args.b, args.png)
    return result


if __name__ == "__main__":
    main()
