"""python -m bench.model without a GPU: a tiny ResNet's training steps with
tritonbn's BatchNorm (converted, and with fused epilogues) against torch's,
and against the same model in float64; a wrong BatchNorm is caught and not
timed; the in-repo ResNet-50 is the architecture torchvision builds."""
import math

import pandas as pd
import pytest
import torch
from torch import nn

from bench import model as bench_model
from bench import resnet

GPU = torch.cuda.is_available()


def test_interpreter_run_checks_every_provider_and_times_nothing(tmp_path, capsys):
    df = bench_model.run(["--out", str(tmp_path)])
    assert list(df.columns) == bench_model.SCHEMA
    assert set(df.provider) == {"torch", "tritonbn", "fused"} and set(df.layout) == set(bench_model.LAYOUTS)
    assert df.correct.all(), df
    errors = df[list(bench_model.ERRORS)]  # against the float64 model: never 0, all small
    assert ((errors > 0) & (errors < 1e-3)).all().all(), df
    if not GPU:
        assert df.ms_per_step.isna().all() and (df.note == "checked; not timed (interpreter)").all()
        assert "ms per step" not in capsys.readouterr().out
    assert len(pd.read_csv(next(tmp_path.glob("*-model.csv")))) == len(df)


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "contiguous"])
def test_first_step_matches_the_float64_model_as_closely_as_torch(fmt):
    """Gradients and loss of one step against the torch model in float64:
    tritonbn's fp32 error is of the size of torch's own fp32 error."""
    torch.manual_seed(0)
    base = resnet.tiny_resnet().to(memory_format=fmt)
    x = torch.randn(4, 3, 32, 32).to(memory_format=fmt)
    target = torch.randint(0, 10, (4,))
    results = {}
    for provider in ("torch", "tritonbn", "fused", "float64"):
        model = bench_model.build("torch" if provider == "float64" else provider, base)
        if provider == "float64":
            model = model.double()
        step = bench_model.Step(model, x.double() if provider == "float64" else x, target, torch.float32)
        loss = step().item()
        results[provider] = loss, bench_model._named((n, p.grad) for n, p in model.named_parameters())
    ref_loss, ref_grads = results.pop("float64")
    torch_error = bench_model._largest(results["torch"][1], ref_grads)
    assert 0 < torch_error < 1e-3
    for provider in ("tritonbn", "fused"):
        loss, grads = results[provider]
        assert abs(loss - ref_loss) < 1e-5
        assert bench_model._largest(grads, ref_grads) <= 3 * torch_error


def test_a_wrong_batch_norm_is_caught_and_not_timed(tmp_path, monkeypatch):
    build = bench_model.build

    def wrong_eps(provider, base):
        model = build(provider, base)
        if provider == "tritonbn":
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eps = 0.1
        return model
    monkeypatch.setattr(bench_model, "build", wrong_eps)
    with pytest.raises(SystemExit):
        bench_model.run(["--batches", "2", "--layouts", "contiguous", "--providers", "tritonbn",
                         "--check-steps", "1", "--out", str(tmp_path)])
    df = pd.read_csv(next(tmp_path.glob("*-model.csv")))
    ours = df[df.provider == "tritonbn"].iloc[0]
    assert not ours.correct and math.isnan(ours.ms_per_step) and "not timed" in ours.note
    assert df[df.provider == "torch"].correct.all()


def test_in_repo_resnet50_has_torchvisions_shape():
    """53 BatchNorm2d layers and torchvision resnet50's 25,557,032 parameters."""
    model = resnet.ResNet()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 53
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
