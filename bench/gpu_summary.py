"""python -m bench.gpu_summary FOLDER NAME [--since ISO]: the answers of one
bench/gpu_check.sh run, from the CSVs it wrote (FOLDER/NAME*.csv, rows
timestamped at or after --since):

- regimes: per mode, how often each regime is the fastest, and the
  heuristic's pick over the fastest (geometric mean and worst);
- host: CPU microseconds per call against torch's;
- model: ms per training step against torch eager (and torch.compile), and
  BatchNorm's share of torch's step.

A file a step did not write (it failed or ran out of time) is said to be missing.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd


def _read(path: Path, since: str | None) -> pd.DataFrame | None:
    if not path.exists():
        return None
    df = pd.read_csv(path)
    if since is not None and "timestamp" in df:
        df = df[df.timestamp >= since]
    return df if len(df) else None


def _geomean(values: pd.Series) -> float:
    values = values.dropna()
    return math.exp(values.map(math.log).mean()) if len(values) else math.nan


def regimes(df: pd.DataFrame) -> str:
    ours = df[df.provider.str.startswith("tritonbn") & df.median_ms.notna()]
    forced = ours[ours.provider.str.startswith("tritonbn[")]
    if forced.empty:
        return "regimes: no timed tritonbn[REGIME] rows"
    index = ["mode", "shape", "dtype", "layout"]
    table = forced.pivot_table(index=index, columns="regime", values="median_ms", aggfunc="min")
    pick = ours[ours.provider == "tritonbn"].set_index(index)
    table["fastest"] = table.idxmin(axis=1)
    table["pick"] = pick["regime"].reindex(table.index)
    table["pick_over_fastest"] = pick["median_ms"].reindex(table.index) / table.drop(
        columns=["fastest", "pick"]).min(axis=1)
    caveat = "" if "gpu_run" not in df or df.gpu_run.all() else " (Triton interpreter wall-clock: NOT GPU speed)"
    lines = [f"regimes: shapes on which each regime is the fastest, and the pick's time over the fastest's{caveat}"]
    for mode, group in table.groupby(level="mode"):
        wins = dict(sorted(group.fastest.value_counts().to_dict().items()))
        lines.append(f"  {mode}: fastest {wins}; pick / fastest geomean "
                     f"{_geomean(group.pick_over_fastest):.3f}, worst {group.pick_over_fastest.max():.3f}")
        for regime in [c for c in group.columns if c not in ("fastest", "pick", "pick_over_fastest")]:
            ratio = group[regime] / group.drop(columns=["fastest", "pick", "pick_over_fastest"]).min(axis=1)
            if ratio.isna().all():
                continue  # a regime this mode does not have
            lines.append(f"    {regime}: time over the fastest, geomean {_geomean(ratio):.3f} "
                         f"({ratio.notna().sum()} shapes)")
    return "\n".join(lines)


def host(df: pd.DataFrame) -> str:
    latest = df[df.timestamp == df.timestamp.max()]
    columns = [c for c in ("call", "shape", "direct_us", "dispatch_us", "torch_us", "ratio", "launches")
               if c in latest]
    return "host: CPU us per call (direct: tritonbn's launch path; ratio over torch)\n" + \
        latest[columns].round(2).to_string(index=False)


def model(df: pd.DataFrame) -> str:
    timed = df[df.ms_per_step.notna()]
    if timed.empty:
        return "model: no timed rows" + ("" if df.correct.all() else " (a provider's step was wrong)")
    index = ["batch", "dtype", "layout", "graphed"]
    table = timed.pivot_table(index=index, columns="provider", values="ms_per_step")
    for provider in ("tritonbn", "fused"):
        if provider in table and "torch" in table:
            table[f"{provider}_speedup"] = table["torch"] / table[provider]
    if "identity" in table and "torch" in table:
        table["bn_share"] = 1 - table["identity"] / table["torch"]
    return "model: ms per training step, speed-up over torch in the same mode\n" + table.round(3).to_string()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("name", help="the device part of the file names (e.g. NVIDIA-H200)")
    parser.add_argument("--since", help="rows timestamped at or after this ISO time only")
    args = parser.parse_args(argv)
    for suffix, report in (("", regimes), ("-host", host), ("-model", model)):
        path = args.folder / f"{args.name}{suffix}.csv"
        df = _read(path, args.since)
        print(report(df) if df is not None else f"{path.name}: missing (its step failed, or did not run)")
        print()


if __name__ == "__main__":
    main()
