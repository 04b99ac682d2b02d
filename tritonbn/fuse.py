"""fuse_epilogues: rewrite a model's ``bn -> relu`` and ``bn -> add -> relu``
into tritonbn's fused epilogue, with torch.fx.

The model is traced with ``torch.fx.symbolic_trace``; the graph then calls
``modules.module_batch_norm(bn, x, residual, relu=True)`` where it called the
BatchNorm module, the add and the ReLU. The BatchNorm modules themselves stay
(same objects, parameters and buffers; state_dict keys unchanged), so the
running stats, train() / eval() and checkpoints work as before.

A pattern is fused only when nothing else reads the intermediate tensors: the
BatchNorm output feeds only the add (or the ReLU), the sum only the ReLU.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .modules import _TO_TORCH, _TO_TRITON, convert_batchnorm, module_batch_norm

_BATCH_NORMS = tuple(cls for cls in (*_TO_TRITON, *_TO_TORCH) if not issubclass(cls, nn.SyncBatchNorm))
_ADDS = (operator.add, operator.iadd, torch.add)
_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu)


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _batch_norm_node(node, modules: dict, user: fx.Node) -> bool:
    """A call of a BatchNorm module whose output only `user` reads."""
    return (isinstance(node, fx.Node) and node.op == "call_module"
            and type(modules[node.target]) in _BATCH_NORMS and list(node.users) == [user])


def _match(relu: fx.Node, modules: dict):
    """(bn node, residual node or None, the nodes the fused call replaces) or None."""
    source = relu.args[0] if relu.args else relu.kwargs.get("input")
    if _batch_norm_node(source, modules, relu):
        return source, None, (relu, source)
    if (isinstance(source, fx.Node) and source.op == "call_function" and source.target in _ADDS
            and len(source.args) == 2 and not source.kwargs and list(source.users) == [relu]):
        for bn, residual in (source.args, source.args[::-1]):
            if _batch_norm_node(bn, modules, source) and isinstance(residual, fx.Node):
                return bn, residual, (relu, source, bn)
    return None


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with tritonbn's modules kept as calls (leaves) like torch.nn's."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, nn.modules.batchnorm._NormBase) or super().is_leaf_module(module,
                                                                                             qualified_name)


def fuse_epilogues(model: nn.Module) -> fx.GraphModule:
    """A GraphModule computing ``model`` with each ``relu(bn(x))`` and
    ``relu(bn(x) + residual)`` as one fused tritonbn call (batch_norm_relu).

    ReLU as ``nn.ReLU`` (inplace or not), ``torch.relu`` / ``F.relu`` or
    ``.relu()``; the add as ``+``, ``+=`` or ``torch.add``. The model's
    BatchNorm1d/2d/3d modules are converted to tritonbn's first, in place
    (convert_batchnorm), and are shared with the result. The model must be
    traceable by torch.fx (no data-dependent control flow in forward).
    """
    convert_batchnorm(model)
    traced = fx.GraphModule(model, _Tracer().trace(model), model.__class__.__name__)
    modules = dict(traced.named_modules())
    graph = traced.graph
    for relu in list(graph.nodes):
        if not _is_relu(relu, modules):
            continue
        matched = _match(relu, modules)
        if matched is None:
            continue
        bn, residual, replaced = matched
        with graph.inserting_before(relu):
            module = graph.get_attr(bn.target)
            fused = graph.call_function(module_batch_norm, (module, bn.args[0]),
                                        {"residual": residual, "relu": True})
        relu.replace_all_uses_with(fused)
        for node in replaced:  # users first: relu, then the add, then the batch norm
            graph.erase_node(node)
    graph.lint()
    traced.recompile()
    return traced
