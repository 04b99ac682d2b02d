"""python -m tritonbn.autotune: pre-tune shapes on this GPU, or list the cache.

    python -m tritonbn.autotune --suite resnet50 mlp video --dtypes fp32 fp16 bf16
    python -m tritonbn.autotune --shape 32,64,56,56 --layouts channels_last
    python -m tritonbn.autotune --suite resnet50 --batches 32 --dtypes bf16   # one batch size
    python -m tritonbn.autotune --output autotune_cache/$(gpu).json   # entries to ship
    python -m tritonbn.autotune --list

Pre-tuning runs each op once per (shape, dtype, layout) on the GPU, which
tunes it and stores the winner (default: the user cache,
$TRITONBN_CACHE_DIR/autotune.json). Problems already in the output file are
skipped unless --retune, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

from .. import launch
from . import Cache, Tuner, use_tuner
from .shapes import DTYPES, LAYOUTS, RESNET50_BATCHES, SUITES, in_layout, layouts_for, select_shapes
from .tuner import device_context

OPS = ("forward", "backward", "inference")


def cache_table(cache: Cache, current_context: str | None = None) -> pd.DataFrame:
    rows = []
    for context, problems in cache.entries().items():
        for key, entry in problems.items():
            op, dtype, layout, shape = key.split("|")
            config = entry.get("config", {})
            rows.append(dict(
                context=context, current=context == current_context, op=op, dtype=dtype, layout=layout,
                shape=shape, regime=config.get("regime"),
                blocks="x".join(str(config.get(k)) for k in ("block_n", "block_c", "block_s")),
                splits="x".join(str(config.get(k)) for k in ("split_n", "split_s")),
                warps=config.get("num_warps"), ms=entry.get("ms"), heuristic_ms=entry.get("heuristic_ms"),
                speedup=(entry["heuristic_ms"] / entry["ms"]) if entry.get("ms") and entry.get("heuristic_ms")
                else None))
    return pd.DataFrame(rows)


def _inputs(shape, dtype, layout):
    x = in_layout(torch.randn(shape, device="cuda").to(dtype), layout)
    params = dict(device="cuda", dtype=torch.float32 if dtype != torch.float64 else dtype)
    C = shape[1]
    return (x, torch.ones(C, **params), torch.zeros(C, **params), torch.zeros(C, **params),
            torch.ones(C, **params))


def pretune_one(op, shape, dtype, layout) -> None:
    """Run `op` once; the tuner in use tunes it if its cache has no entry."""
    x, weight, bias, running_mean, running_var = _inputs(shape, dtype, layout)
    if op == "forward":
        launch.forward_training(x, weight, bias, running_mean, running_var, None, 0.1, 1e-5)
    elif op == "inference":
        launch.forward_inference(x, weight, bias, running_mean, running_var, 1e-5)
    else:  # statistics from torch, so that only the backward is tuned here
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x.float(), dims, unbiased=False)
        launch.backward(torch.randn_like(x), x, weight, mean, torch.rsqrt(var + 1e-5), True,
                        (True, True, True), bias.dtype)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tritonbn.autotune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the cache (shipped and user entries)")
    parser.add_argument("--suite", nargs="+", choices=SUITES, default=["resnet50", "mlp", "video"])
    parser.add_argument("--shape", action="append", help="an explicit shape, e.g. 32,64,56,56 (repeatable)")
    parser.add_argument("--batches", type=lambda s: tuple(int(v) for v in s.split(",")), default=RESNET50_BATCHES,
                        help="batch sizes of the resnet50 suite, e.g. 32,256")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--output", type=Path, help="JSON file to store entries in (default: the user cache)")
    parser.add_argument("--retune", action="store_true", help="tune again problems already in the output")
    parser.add_argument("--dry-run", action="store_true", help="print what would be tuned and stop")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        table = cache_table(Cache(args.output),
                            device_context("cuda", None) if torch.cuda.is_available() else None)
        print("the cache is empty" if table.empty else table.to_string(index=False))
        return 0
    work = [(op, shape, dtype, layout) for shape in select_shapes(args.shape, args.suite, args.batches)
            for dtype in args.dtypes for layout in layouts_for(shape, args.layouts) for op in args.ops]
    if args.dry_run:
        for op, shape, dtype, layout in work:
            print(op, "x".join(map(str, shape)), dtype, layout)
        return 0
    if not torch.cuda.is_available():
        print("python -m tritonbn.autotune: pre-tuning needs a CUDA GPU (timings on the Triton "
              "interpreter mean nothing); --list and --dry-run work anywhere", file=sys.stderr)
        return 2
    try:  # not a dependency of tritonbn: the CLI's progress bar only
        from tqdm import tqdm
    except ImportError:
        print('python -m tritonbn.autotune needs tqdm: pip install tqdm (or tritonbn[autotune])', file=sys.stderr)
        return 2
    tuner = Tuner(Cache(args.output, shipped=False), retune=args.retune)
    with use_tuner(tuner), tqdm(work, desc="pre-tuning", unit="problem") as bar:
        for op, shape, dtype, layout in bar:
            bar.set_postfix_str(f"{op} {'x'.join(map(str, shape))} {dtype} {layout}")
            pretune_one(op, shape, DTYPES[dtype], layout)
    print(cache_table(tuner.cache, device_context("cuda", None)).to_string(index=False))
    print(f"entries stored in {tuner.cache.user_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
