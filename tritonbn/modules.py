"""Drop-in BatchNorm1d / 2d / 3d and SyncBatchNorm modules, and helpers to swap
them into a model.

Each class subclasses its torch.nn counterpart and overrides only ``forward``:
constructor, parameters, buffers, state_dict (including the rule that loads
checkpoints saved before num_batches_tracked existed), ``reset_parameters``
and the input-rank checks are torch's own; ``extra_repr`` is torch's plus the
backend the module runs on (``print(model)`` shows a conversion), and
``isinstance(m, torch.nn.BatchNorm2d)`` stays true for code that looks for
BatchNorm layers (weight-decay filters, BN freezing, init loops).
"""
from __future__ import annotations

import inspect
import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .backend import backend
from .distributed import SyncBatchNormFunction
from .functional import batch_norm_tracked

# torch >= 2.13 has a keyword-only ``bias`` flag on BatchNorm; older releases do not.
_TORCH_HAS_BIAS_FLAG = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters


class _TritonBatchNorm:
    """forward() of torch's _BatchNorm, computed by tritonbn's kernels.

    momentum=None (cumulative average) passes num_batches_tracked to the kernel,
    which reads 1 / num_batches_tracked on the device: no float() of a tensor,
    so a compiled model keeps one graph.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True) -> None:
        if _TORCH_HAS_BIAS_FLAG:
            super().__init__(num_features, eps, momentum, affine, track_running_stats,
                             device, dtype, bias=bias)
        else:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
            if affine and not bias:
                self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        return module_batch_norm(self, input)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={module_backend(self)}"


def module_backend(module: nn.Module) -> str:
    """The backend (tritonbn.backend) for the device of the module's parameters
    and buffers; a module with neither runs where its input is."""
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        return backend(tensor)
    return f"{backend('cuda')} on cuda, {backend('cpu')} on cpu"


_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_reads_dicts: dict[type, bool] = {}  # module class -> whether _state may read nn.Module's dicts


def _state(module: nn.Module) -> tuple:
    """(weight, bias, running_mean, running_var, num_batches_tracked), as
    ``module.weight`` ... give them. nn.Module finds parameters and buffers in
    its __getattr__, which Python calls only after the ordinary lookup failed
    (an AttributeError raised and caught: about half a microsecond a read).
    Where nothing else could answer -- nn.Module's own attribute lookup, no
    class attribute of these names (a parametrization makes one), none in the
    instance's __dict__ -- the dicts are read directly, in __getattr__'s
    order; anything else, and under torch.compile, reads the attributes."""
    cls = type(module)
    direct = _reads_dicts.get(cls)
    if direct is None:
        direct = _reads_dicts[cls] = (cls.__getattr__ is nn.Module.__getattr__
                                      and cls.__getattribute__ is nn.Module.__getattribute__
                                      and not any(hasattr(cls, name) for name in _STATE))
    if direct and not torch.compiler.is_compiling():
        attributes = module.__dict__
        params, buffers = attributes["_parameters"], attributes["_buffers"]
        found = []
        for name in _STATE:
            if name in attributes:
                break
            if name in params:
                found.append(params[name])
            elif name in buffers:
                found.append(buffers[name])
            else:
                break
        else:
            return found
    return [getattr(module, name) for name in _STATE]


def module_batch_norm(module: nn.modules.batchnorm._BatchNorm, input: Tensor,
                      residual: Tensor | None = None, relu: bool = False) -> Tensor:
    """What a BatchNorm module's forward computes, on tritonbn's kernels, for a
    tritonbn or a torch.nn BatchNorm1d/2d/3d; with residual / relu, the fused
    epilogue relu(bn(input) + residual) (tritonbn.fuse_epilogues calls this)."""
    module._check_input_dim(input)
    weight, bias, running_mean, running_var, tracked = _state(module)
    momentum = 0.0 if module.momentum is None else module.momentum
    num_batches_tracked = None
    if module.training and module.track_running_stats and tracked is not None:
        tracked.add_(1)
        momentum = module.momentum  # None: cumulative average over num_batches_tracked
        num_batches_tracked = tracked
    # batch statistics in training, and in eval when there are no running stats
    bn_training = module.training or (running_mean is None and running_var is None)
    # running stats are read in eval, and updated in training only when tracked
    use_running = not module.training or module.track_running_stats
    return batch_norm_tracked(
        input,
        running_mean if use_running else None,
        running_var if use_running else None,
        weight, bias, bn_training, momentum, module.eps,
        num_batches_tracked=num_batches_tracked, residual=residual, relu=relu,
    )


class BatchNorm1d(_TritonBatchNorm, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on tritonbn's kernels: input (N, C) or (N, C, L)."""


class BatchNorm2d(_TritonBatchNorm, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on tritonbn's kernels: input (N, C, H, W)."""


class BatchNorm3d(_TritonBatchNorm, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on tritonbn's kernels: input (N, C, D, H, W)."""


class SyncBatchNorm(nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm on tritonbn's kernels: in training under an
    initialized torch.distributed group of more than one process, statistics
    over all processes' batches (tritonbn/distributed.py); otherwise exactly
    tritonbn's BatchNorm. Constructor, buffers, state_dict and errors are torch's."""

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={module_backend(self)}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group, world_size = None, 1
        if self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(group)
        if world_size == 1:
            return module_batch_norm(self, input)
        return self._synchronized_forward(input, group, world_size)

    # collectives and launches run eagerly: torch.compile breaks the graph here
    @torch.compiler.disable
    def _synchronized_forward(self, input: Tensor, group, world_size: int) -> Tensor:
        if backend(input) == "torch":
            raise ValueError(f"tritonbn.SyncBatchNorm runs on CUDA tensors (or on CPU tensors with "
                             f"TRITON_INTERPRET=1), got input on {input.device}")
        momentum = 0.0 if self.momentum is None else self.momentum
        running_mean = running_var = num_batches_tracked = None
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum  # None: cumulative average over num_batches_tracked
            running_mean, running_var = self.running_mean, self.running_var
            num_batches_tracked = self.num_batches_tracked
        return SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var,
                                           num_batches_tracked, momentum, self.eps, group, world_size)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """torch.nn.SyncBatchNorm.convert_sync_batchnorm (every BatchNorm*D becomes a
        SyncBatchNorm with the same parameters and buffers), then tritonbn's."""
        return convert_batchnorm(nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group))


_TO_TRITON = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
              nn.SyncBatchNorm: SyncBatchNorm}
_TO_TORCH = {ours: theirs for theirs, ours in _TO_TRITON.items()}


def _swap_classes(model: nn.Module, mapping: dict) -> nn.Module:
    for module in model.modules():
        target = mapping.get(type(module))
        if target is not None:
            module.__class__ = target
    return model


def convert_batchnorm(model: nn.Module) -> nn.Module:
    """Make every torch.nn.BatchNorm1d / 2d / 3d / SyncBatchNorm in ``model`` a
    tritonbn one, in place.

    Only modules of exactly those classes are converted: a user subclass may
    have its own forward and is left alone.

    The modules keep their identity, parameters (same Parameter objects, so an
    optimizer built before still updates them), buffers, requires_grad,
    training flag, device, dtype and hooks; only their forward changes. Returns
    ``model`` (deepcopy first to keep the original). torch.nn.SyncBatchNorm
    becomes tritonbn.SyncBatchNorm. Uninitialized lazy BatchNorm modules are
    left as they are, with a warning.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._LazyNormBase):
            warnings.warn(f"convert_batchnorm: {name or 'model'} is a lazy BatchNorm that has not "
                          f"seen an input yet; run one forward pass first to convert it", stacklevel=2)
    return _swap_classes(model, _TO_TRITON)


def revert_batchnorm(model: nn.Module) -> nn.Module:
    """Make every tritonbn BatchNorm in ``model`` a torch.nn one again, in place
    (e.g. before export). The inverse of convert_batchnorm."""
    return _swap_classes(model, _TO_TORCH)
