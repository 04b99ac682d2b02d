"""torch.func transforms and forward-mode AD through tritonbn.batch_norm:
grad, jacrev, jvp, hessian (jacfwd over jacrev), vmap (per-slice batch norms,
model ensembles), against PyTorch in float64.

Second derivatives are compared with the composite float64 reference
(tests/reference.py) rather than with F.batch_norm: torch 2.13's
hessian of F.batch_norm is not symmetric (its d(dL/dweight)/dx block under
jacfwd / vmap disagrees with plain autograd), while the composite is exact.
"""
import pytest
import torch
import torch.nn.functional as F

import tritonbn
from reference import reference_batch_norm

F64 = dict(dtype=torch.float64)


def _composite(x, running_mean, running_var, weight, bias, training, momentum, eps):
    y, _, _ = reference_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return y


def _close(ours, expected, tol=1e-9):
    torch.testing.assert_close(ours, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("training", [True, False])
def test_grad_and_jacrev_of_grad(device, training):
    """torch.func.grad, and jacrev(grad) (a Hessian by reverse over reverse),
    equal torch's; a training call updates the running stats exactly once."""
    x = torch.randn(4, 3, 5, device=device, **F64)
    weight = torch.rand(3, device=device, **F64) + 0.5
    running = {}

    def loss(batch_norm):
        running[batch_norm] = (torch.zeros(3, device=device, **F64), torch.ones(3, device=device, **F64))
        return lambda x, weight: batch_norm(x, *running[batch_norm], weight, None, training,
                                            0.1, 1e-5).pow(3).sum()

    _close(torch.func.grad(loss(tritonbn.batch_norm), argnums=(0, 1))(x, weight),
           torch.func.grad(loss(F.batch_norm), argnums=(0, 1))(x, weight))
    for ours, theirs in zip(running[tritonbn.batch_norm], running[F.batch_norm]):
        _close(ours, theirs, 1e-12)

    def hessian(batch_norm):
        return torch.func.jacrev(torch.func.grad(loss(batch_norm), argnums=(0, 1)), argnums=(0, 1))
    _close(hessian(tritonbn.batch_norm)(x, weight), hessian(_composite)(x, weight))


@pytest.mark.parametrize("training", [True, False])
def test_jvp_matches_torch(device, training):
    """Forward-mode derivative, by torch.func.jvp and by forward_ad dual tensors."""
    import torch.autograd.forward_ad as fwAD
    x = torch.randn(4, 3, 5, device=device, **F64) + 1
    params = (torch.rand(3, device=device, **F64) + 0.5, torch.randn(3, device=device, **F64))
    tangents = (torch.randn_like(x), *(torch.randn(3, device=device, **F64) for _ in range(2)))
    running = (torch.randn(3, device=device, **F64), torch.rand(3, device=device, **F64) + 0.5)

    def tangent(batch_norm):
        def fn(x, weight, bias):
            return batch_norm(x, *(r.clone() for r in running), weight, bias, training, 0.1, 1e-5)
        _, by_jvp = torch.func.jvp(fn, (x, *params), tangents)
        with fwAD.dual_level():
            y = fn(fwAD.make_dual(x, tangents[0]), params[0], fwAD.make_dual(params[1], tangents[2]))
            by_dual = fwAD.unpack_dual(y).tangent
        return by_jvp, by_dual

    _close(tangent(tritonbn.batch_norm), tangent(F.batch_norm))


def test_hessian(device):
    """torch.func.hessian (forward over reverse, under vmap) equals the composite's."""
    x = torch.randn(4, 3, 5, device=device, **F64)
    weight = torch.rand(3, device=device, **F64) + 0.5

    def hessian(batch_norm):
        def loss(x, weight):
            return batch_norm(x, None, None, weight, None, True, 0.1, 1e-5).pow(3).sum()
        return torch.func.hessian(loss, argnums=(0, 1))(x, weight)

    _close(hessian(tritonbn.batch_norm), hessian(_composite))


def test_vmap_training_with_batched_running_stats(device):
    """Each vmapped slice is its own batch norm and updates its own row of the
    batched running stats, whichever dim is vmapped. (torch 2.13's own vmap
    rule leaves running stats batched along dim 1 unchanged, so the expected
    values come from the float64 reference, slice by slice.)"""
    x = torch.randn(4, 2, 3, 5, device=device, **F64) + 1  # vmapped over dim 1
    running_mean = torch.randn(3, 2, device=device, **F64)  # batched along dim 1
    running_var = torch.rand(2, 3, device=device, **F64) + 0.5
    expected = [reference_batch_norm(x[:, i], running_mean[:, i], running_var[i], None, None, True, 0.1, 1e-5)
                for i in range(2)]
    y = torch.func.vmap(lambda x, rm, rv: tritonbn.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5),
                        in_dims=(1, 1, 0))(x, running_mean, running_var)
    for i, (y_ref, mean_ref, var_ref) in enumerate(expected):
        _close(y[i], y_ref)
        _close(running_mean[:, i], mean_ref)
        _close(running_var[i], var_ref)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training", [True, False])
def test_vmap_ensemble_of_models(device, momentum, training):
    """torch.func.stack_module_state + vmap over functional_call: three
    BatchNorm2d models with different parameters and buffers, two steps, equal
    to running torch's modules one by one. momentum=None works too (torch's own
    module cannot run it under vmap: it calls float() on num_batches_tracked)."""
    x = torch.randn(4, 3, 2, 2, device=device, **F64)

    def models(cls):
        torch.manual_seed(0)
        result = [cls(3, momentum=momentum, device=device, **F64).train(training) for _ in range(3)]
        for model in result:
            torch.nn.init.uniform_(model.weight, 0.5, 1.5)
            torch.nn.init.normal_(model.bias)
            torch.nn.init.uniform_(model.running_var, 0.5, 1.5)
        return result

    ours = models(tritonbn.BatchNorm2d)
    params, buffers = torch.func.stack_module_state(ours)
    theirs = models(torch.nn.BatchNorm2d)
    for _ in range(2):
        y = torch.func.vmap(lambda p, b: torch.func.functional_call(ours[0], (p, b), (x,)))(params, buffers)
        _close(y, torch.stack([model(x) for model in theirs]))
    for name, stacked in buffers.items():
        _close(stacked, torch.stack([model.get_buffer(name) for model in theirs]))


def test_vmap_eval_and_unbatched_input(device):
    """Eval reads unbatched running stats in every slice; an unbatched input with
    batched weights (training) updates unbatched running stats once."""
    x = torch.randn(2, 4, 3, 5, device=device, **F64)
    weights = torch.rand(2, 3, device=device, **F64) + 0.5

    def run(batch_norm):
        running = (torch.randn(3, device=device, **F64), torch.rand(3, device=device, **F64) + 0.5)
        y_eval = torch.func.vmap(lambda x: batch_norm(x, *running, None, None, False, 0.1, 1e-5))(x)
        y_train = torch.func.vmap(lambda w: batch_norm(x[0], *running, w, None, True, 0.1, 1e-5))(weights)
        return y_eval, y_train, *running

    torch.manual_seed(1)
    ours = run(tritonbn.batch_norm)
    torch.manual_seed(1)
    _close(ours, run(F.batch_norm))


def test_vmap_refuses_unbatched_running_stats_for_a_batched_input(device):
    """Training would update one set of running stats once per slice: an error
    naming the problem, as torch raises, and the buffers untouched."""
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match="batched input while running_mean or running_var"):
        torch.func.vmap(lambda x: tritonbn.batch_norm(x, running_mean, running_var, training=True))(
            torch.randn(2, 4, 3, device=device))
    assert running_mean.eq(0).all() and running_var.eq(1).all()
