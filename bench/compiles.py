"""python -m bench.compiles: how many kernel variants each step of
bench/gpu_check.sh compiles on a GPU, and what that costs, measured without one.

A variant is one kernel with one specialization (constexprs, signature,
options): what Triton compiles once and keeps in its on-disk cache, so a
step compiles only what no earlier step of the same run did. Launches are
recorded on ``meta`` tensors with the configs a GPU of --sms SMs would use
(bench.traffic's recorder), for each step's work:

- model: the ResNet-50 step's BatchNorm calls at batch 32 and 256, bf16,
  channels_last: tritonbn (forward, backward) and fused (each layer's
  epilogue: ReLU after bn1 / bn2 and the stem, residual + ReLU after bn3, none
  after a downsample's BatchNorm);
- regimes: the op bench's rows, ResNet-50 shapes at batch 32 and 256, bf16,
  both layouts, forward / backward / inference, each regime and the pick;
- pre-tuning: every candidate config of batch 32 bf16 channels_last.

The seconds per variant are measured by compiling a sample for sm_90 here
(python -m bench.traffic's compile: ptxas included), one process.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from bench import traffic
from bench.kernel_report import Variant, compile_variant
from tritonbn.autotune import Problem, candidates, regime_config
from tritonbn.autotune.shapes import RESNET50_LAYERS, in_layout

# the epilogue fuse_epilogues gives each BatchNorm of a ResNet bottleneck, by its name's end
EPILOGUES = (("downsample.1", ""), ("bn3", "_add_relu"))


def resnet50_bn_calls(batch: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, input shape) of every BatchNorm call of a ResNet-50 forward at 224x224."""
    from bench import resnet
    model = resnet.ResNet().to("meta")
    calls = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(lambda m, args, out, name=name: calls.append((name, tuple(args[0].shape))))
    with torch.no_grad():
        model(torch.empty(batch, 3, 224, 224, device="meta"))
    return calls


def _epilogue(name: str) -> str:
    return next((suffix for end, suffix in EPILOGUES if name.endswith(end)), "_relu")


def _problem(op: str, x: torch.Tensor) -> Problem:
    from tritonbn import views
    view = views.canonical(x)[1]
    return Problem(traffic.OPS[op].tuned, view.N, view.C, view.S, view.channel_inner, x.dtype,
                   torch.device("cuda", 0))


def _x(shape, layout="channels_last", dtype=torch.bfloat16) -> torch.Tensor:
    return in_layout(torch.empty(shape, dtype=dtype, device="meta"), layout)


def model_items(batches=(32, 256)) -> list[tuple[str, torch.Tensor, object]]:
    items = []
    for batch in batches:
        for name, shape in resnet50_bn_calls(batch):
            x = _x(shape)
            for op in ("forward", "backward", "forward" + _epilogue(name), "backward" + _epilogue(name)):
                items.append((op, x, traffic.gpu_config(op, x)))
    return items


def regime_items(sms: int, batches=(32, 256)) -> list[tuple[str, torch.Tensor, object]]:
    items = []
    for batch in batches:
        for c, hw in RESNET50_LAYERS:
            for layout in ("channels_last", "contiguous"):
                x = _x((batch, c, hw, hw), layout)
                for op, regimes in (("forward", ("resident", "cooperative", "split")),
                                    ("backward", ("resident", "cooperative", "split")),
                                    ("inference", ("flat", "split"))):
                    items.append((op, x, traffic.gpu_config(op, x, sms)))
                    for regime in regimes:
                        config = regime_config(_problem(op, x), regime, sms)
                        if config is not None:
                            items.append((op, x, config))
    return items


def pretune_items(sms: int) -> list[tuple[str, torch.Tensor, object]]:
    items = []
    for c, hw in RESNET50_LAYERS:
        x = _x((32, c, hw, hw))
        for op in ("forward", "backward", "inference"):
            traffic.gpu_config(op, x, sms)  # the GPU's SM count for candidates()
            items += [(op, x, config) for config in candidates(_problem(op, x))]
    return items


def variants(items) -> dict[tuple, Variant]:
    found = {}
    for op, x, config in items:
        for launch in traffic.record(op, x, config):
            variant = Variant.of(launch)
            found.setdefault(variant.key, variant)
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compiles", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sms", type=int, default=traffic.H100_SMS)
    parser.add_argument("--sample", type=int, default=7, help="variants compiled to time one, the first "
                        "untimed (default 7)")
    args = parser.parse_args(argv)
    steps = {"model": variants(model_items()), "regimes": variants(regime_items(args.sms)),
             "pre-tuning": variants(pretune_items(args.sms))}
    sample = list(steps["model"].values())[:: max(1, len(steps["model"]) // args.sample)][:args.sample]
    with tempfile.TemporaryDirectory() as cache:  # an empty Triton cache: compiles, not cache hits
        os.environ["TRITON_CACHE_DIR"] = cache
        compile_variant(sample[-1], traffic.ARCH)  # imports and the compiler's own warm-up, untimed
        start = time.perf_counter()
        for variant in sample[:-1]:
            compile_variant(variant, traffic.ARCH)
        per_variant = (time.perf_counter() - start) / (len(sample) - 1)
    print(f"kernel variants per gpu_check step ({args.sms} SMs); {per_variant:.2f} s per variant compiled "
          f"for sm_90 on this machine, one process ({len(sample) - 1} timed)")
    seen: set = set()
    for name, found in steps.items():
        new = found.keys() - seen
        seen |= found.keys()
        print(f"  {name:<11} {len(found):4d} variants, {len(new):4d} not compiled by an earlier step: "
              f"about {len(new) * per_variant:.0f} s of compiling")


if __name__ == "__main__":
    main()
