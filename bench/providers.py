"""What is timed: one callable per (provider, mode) over prepared inputs.

Providers: tritonbn; eager (torch.nn.functional.batch_norm, cuDNN or native as
torch chooses); compile (torch.compile of the same function, Inductor,
specialized to the shape); and, for a regime comparison, tritonbn[REGIME]:
tritonbn with every timed op in one regime (RegimeTuner). Modes: forward (training), backward (training,
the backward alone), fwd_bwd, inference, and the fused epilogues forward and
backward, where eager and compile run the unfused chain and tritonbn runs
batch_norm_relu: relu_fwd_bwd, relu(batch_norm(x)), and fused_fwd_bwd, the
ResNet block's tail relu(batch_norm(x) + residual).
"""
from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import tritonbn
from tritonbn import autotune, plans, views
from tritonbn.autotune.shapes import in_layout

PROVIDERS = ("tritonbn", "eager", "compile")
MODES = ("forward", "backward", "fwd_bwd", "inference", "relu_fwd_bwd", "fused_fwd_bwd")
EPILOGUES = {"relu_fwd_bwd": False, "fused_fwd_bwd": True}  # mode: with a residual
# tensor-sized passes of the minimal-bytes model (docs/performance.md), the same for every provider;
# relu_fwd_bwd: those of fwd_bwd (the ReLU mask is recomputed from x);
# fused_fwd_bwd: forward 4 (x twice, residual, y), backward 7 (x and dy twice, y once
# for the ReLU mask, dx, dresidual)
PASSES = {"forward": 3, "backward": 5, "fwd_bwd": 8, "inference": 2, "relu_fwd_bwd": 8, "fused_fwd_bwd": 11}
EPS = 1e-5
MOMENTUM = 0.1


@dataclass
class Inputs:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    grad_out: torch.Tensor
    residual: torch.Tensor

    @classmethod
    def make(cls, shape, dtype, channels_last: bool, device) -> "Inputs":
        x = in_layout(torch.randn(shape, device=device).to(dtype),
                      "channels_last" if channels_last else "contiguous")
        C = shape[1]
        # 16-bit activations come with float32 parameters, as under autocast
        half = dtype in (torch.float16, torch.bfloat16)
        params = dict(device=device, dtype=torch.float32 if half else dtype)
        return cls(x, torch.rand(C, **params) + 0.5, torch.randn(C, **params),
                   torch.randn(C, **params), torch.rand(C, **params) + 0.5, torch.randn_like(x),
                   torch.randn_like(x))


# the ops a mode times (the backward mode's forward runs once, untimed, before)
TIMED_OPS = {"forward": ("forward",), "backward": ("backward",), "fwd_bwd": ("forward", "backward"),
             "inference": ("inference",), "relu_fwd_bwd": ("forward", "backward"),
             "fused_fwd_bwd": ("forward", "backward")}
# the regimes a mode can be compared in
MODE_REGIMES = {mode: ("flat", "split") if mode == "inference" else ("resident", "cooperative", "split")
                for mode in MODES}
# a notional SM count for the cooperative rows on the interpreter, whose programs run one after
# another (a group there is never limited by what is resident); an H100 SXM's
INTERPRETER_SMS = 132


class RegimeTuner(autotune.Tuner):
    """Chooses regime_config(problem, regime) for every problem that regime
    can run, and what the default policy chooses for any other (only the
    backward mode's untimed forward can be one: regime_providers checks the
    timed ops). One instance per regime (regime_tuner): the plan cache keys
    on the tuner."""

    def __init__(self, regime: str, sms: int | None = None):
        super().__init__()
        self.regime, self.sms = regime, sms

    def choose(self, problem, trial):
        config = autotune.regime_config(problem, self.regime, self.sms)
        return config if config is not None else super().choose(problem, trial)


@functools.lru_cache(maxsize=None)
def regime_tuner(regime: str, sms: int | None) -> RegimeTuner:
    return RegimeTuner(regime, sms)


def _sms(x: torch.Tensor) -> int | None:
    return None if x.is_cuda else INTERPRETER_SMS


def timed_problems(mode: str, x: torch.Tensor) -> list:
    view = views.canonical(x)[1]
    return [plans.problem(op, view, x) for op in TIMED_OPS[mode]]


def regime_providers(mode: str, x: torch.Tensor) -> list[str]:
    """tritonbn[REGIME] for each regime of the mode that can run every timed op of x."""
    problems = timed_problems(mode, x)
    return [f"tritonbn[{regime}]" for regime in MODE_REGIMES[mode]
            if all(autotune.regime_config(p, regime, _sms(x)) is not None for p in problems)]


def regime_of(provider: str, mode: str, x: torch.Tensor) -> str:
    """The regime(s) a tritonbn row ran, forward/backward where they differ
    (after the call: the tuner's choice is the one it cached); '' for torch."""
    if not provider.startswith("tritonbn"):
        return ""
    forced = re.fullmatch(r"tritonbn\[(\w+)\]", provider)
    if forced:
        return forced.group(1)
    regimes = [autotune.choose_config(p).regime for p in timed_problems(mode, x)]
    return "/".join(dict.fromkeys(regimes))


def provider_context(provider: str, x: torch.Tensor) -> contextlib.AbstractContextManager:
    """What a provider's calls run inside: the regime's tuner for tritonbn[REGIME]."""
    forced = re.fullmatch(r"tritonbn\[(\w+)\]", provider)
    if forced is None:
        return contextlib.nullcontext()
    return autotune.use_tuner(regime_tuner(forced.group(1), _sms(x)))


def _batch_norm_fn(provider: str) -> Callable:
    if provider == "tritonbn":
        return tritonbn.batch_norm
    if provider == "eager":
        return F.batch_norm
    if provider == "compile":
        torch._dynamo.reset()  # a fresh, shape-specialized compilation per row
        return torch.compile(F.batch_norm, dynamic=False, fullgraph=True)
    raise ValueError(f"unknown provider {provider!r}")


def unfused_epilogue(x, running_mean, running_var, weight, bias, training, momentum, eps, residual=None):
    """What eager PyTorch runs for bn -> relu, or a ResNet block's tail bn -> + residual -> relu."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return torch.relu(y if residual is None else y + residual)


def _epilogue_fn(provider: str) -> Callable:
    if provider == "tritonbn":
        return lambda *args, residual=None: tritonbn.batch_norm_relu(*args, residual=residual)
    if provider == "eager":
        return unfused_epilogue
    if provider == "compile":
        torch._dynamo.reset()
        return torch.compile(unfused_epilogue, dynamic=False, fullgraph=True)
    raise ValueError(f"unknown provider {provider!r}")


def make_call(provider: str, mode: str, inputs: Inputs) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A no-argument callable running `mode` once; it returns the outputs that
    the correctness check compares: (y,) or (y, dx, dweight, dbias) / (dx, dweight, dbias)
    (relu_fwd_bwd too), and (y, dx, dweight, dbias, dresidual) for fused_fwd_bwd.
    tritonbn[REGIME] builds and runs inside its RegimeTuner."""
    context = provider_context(provider, inputs.x)
    with context:
        call = _make_call(provider.split("[")[0], mode, inputs)
    if isinstance(context, contextlib.nullcontext):
        return call

    def in_regime():
        with provider_context(provider, inputs.x):
            return call()
    return in_regime


def _make_call(provider: str, mode: str, inputs: Inputs) -> Callable[[], tuple[torch.Tensor, ...]]:
    i = inputs
    # running stats are copies: timing repeats must not drift the inputs of the check
    running = i.running_mean.clone(), i.running_var.clone()
    if mode in EPILOGUES:
        fused = _epilogue_fn(provider)
        leaves = [t.detach().clone().requires_grad_()
                  for t in (i.x, i.weight, i.bias, *([i.residual] if EPILOGUES[mode] else []))]

        def epilogue_fwd_bwd():
            y = fused(leaves[0], *running, leaves[1], leaves[2], True, MOMENTUM, EPS,
                      residual=leaves[3] if EPILOGUES[mode] else None)
            return (y.detach(), *torch.autograd.grad(y, leaves, i.grad_out))
        return epilogue_fwd_bwd
    bn = _batch_norm_fn(provider)
    if mode in ("forward", "inference"):
        training = mode == "forward"
        return lambda: (bn(i.x, *running, i.weight, i.bias, training, MOMENTUM, EPS),)
    leaves = [t.detach().clone().requires_grad_() for t in (i.x, i.weight, i.bias)]
    if mode == "fwd_bwd":
        def fwd_bwd():
            y = bn(leaves[0], *running, leaves[1], leaves[2], True, MOMENTUM, EPS)
            return (y.detach(), *torch.autograd.grad(y, leaves, i.grad_out))
        return fwd_bwd
    if mode == "backward":
        y = bn(leaves[0], *running, leaves[1], leaves[2], True, MOMENTUM, EPS)
        return lambda: torch.autograd.grad(y, leaves, i.grad_out, retain_graph=True)
    raise ValueError(f"unknown mode {mode!r}")
