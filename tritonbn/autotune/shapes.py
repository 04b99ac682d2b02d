"""Reference shape sets, (N, C, *spatial): what the benchmark measures and
`python -m tritonbn.autotune` pre-tunes (ResNet-50's BatchNorm layers, MLP and video shapes),
and the dtype / layout vocabulary the command-line tools share."""
from __future__ import annotations

import torch

# ResNet-50 training BN layers as (C, H=W)
RESNET50_LAYERS = [(64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28),
                   (256, 14), (1024, 14), (512, 14), (512, 7), (2048, 7)]
RESNET50_BATCHES = (32, 64, 256)
MLP = [(256, 100), (1024, 512), (4096, 1024), (16384, 4096), (8192, 100)]
VIDEO = [(8, 64, 16, 56, 56)]
# for the Triton interpreter: a few seconds each, all code paths
TINY = [(4, 8, 6, 6), (64, 24), (2, 4, 3, 4, 4)]


def suite(name: str, batches=RESNET50_BATCHES) -> list[tuple[int, ...]]:
    if name == "resnet50":
        return [(n, c, hw, hw) for n in batches for c, hw in RESNET50_LAYERS]
    if name == "mlp":
        return list(MLP)
    if name == "video":
        return list(VIDEO)
    if name == "tiny":
        return list(TINY)
    if name == "quick":  # a GPU subset that runs in a few minutes
        return ([(32, c, hw, hw) for c, hw in RESNET50_LAYERS[::3]] + [MLP[1], MLP[3]] + list(VIDEO))
    raise ValueError(f"unknown shape suite {name!r}")


SUITES = ("resnet50", "mlp", "video", "tiny", "quick")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("contiguous", "channels_last")


def select_shapes(explicit: list[str] | None, suites, batches=RESNET50_BATCHES) -> list[tuple[int, ...]]:
    """Shapes given as "N,C,..." strings if any, else those of the named suites;
    duplicates dropped, order kept."""
    if explicit:
        shapes = [tuple(int(v) for v in s.split(",")) for s in explicit]
    else:
        shapes = [s for name in suites for s in suite(name, batches)]
    return list(dict.fromkeys(shapes))


def layouts_for(shape: tuple[int, ...], layouts) -> list[str]:
    """The requested layouts that exist for this rank: channels_last needs 4-D or 5-D."""
    return [layout for layout in layouts if layout == "contiguous" or len(shape) in (4, 5)]


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
