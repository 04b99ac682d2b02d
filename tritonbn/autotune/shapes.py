"""Reference shape sets, (N, C, *spatial): what the benchmark measures and
`python -m tritonbn.autotune` pre-tunes (the reference shapes of DESIGN.md)."""
from __future__ import annotations

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
