"""Running statistics over several training steps, against the float64 reference."""
import pytest
import torch
import torch.nn.functional as F

import tritonbn
from tritonbn.autotune import override
from tritonbn.functional import batch_norm_tracked
from reference import reference_batch_norm, resident, split


def _batches(device, n, shape=(6, 3, 4, 5)):
    # a different mean and spread per step, so each update is visible
    return [torch.randn(shape, device=device) * (1 + i) + i for i in range(n)]


@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("regime", ["resident", "split"])
def test_running_stats_after_several_steps(device, momentum, regime):
    batches = _batches(device, 4)
    running_mean = torch.randn(3, device=device)
    running_var = torch.rand(3, device=device) + 0.5
    ref_mean, ref_var = running_mean.double(), running_var.double()
    torch_mean, torch_var = running_mean.clone(), running_var.clone()
    config = resident(batches[0]) if regime == "resident" else split(block_c=4)
    for x in batches:
        with override(forward=config):
            tritonbn.batch_norm(x, running_mean, running_var, training=True, momentum=momentum)
        F.batch_norm(x, torch_mean, torch_var, training=True, momentum=momentum)
        _, ref_mean, ref_var = reference_batch_norm(x, ref_mean, ref_var, None, None, True,
                                                    momentum, 1e-5)
    torch.testing.assert_close(running_mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(running_var.double(), ref_var, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(running_mean, torch_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(running_var, torch_var, rtol=1e-5, atol=1e-5)
    if momentum == 0.0:
        assert torch.equal(running_mean, torch_mean)


@pytest.mark.parametrize("regime", ["resident", "split"])
def test_cumulative_average_reads_num_batches_tracked(device, regime):
    """momentum=None: momentum = 1 / num_batches_tracked, taken from the tensor."""
    batches = _batches(device, 3)
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)
    ref_mean, ref_var = running_mean.double(), running_var.double()
    config = resident(batches[0]) if regime == "resident" else split(block_c=4)
    for x in batches:
        num_batches_tracked += 1
        with override(forward=config):
            batch_norm_tracked(x, running_mean, running_var, training=True, momentum=None,
                               num_batches_tracked=num_batches_tracked)
        _, ref_mean, ref_var = reference_batch_norm(x, ref_mean, ref_var, None, None, True,
                                                    1.0 / num_batches_tracked.item(), 1e-5)
    # a cumulative average of the batch means: exactly their plain mean
    expected_mean = torch.stack([x.double().mean((0, 2, 3)) for x in batches]).mean(0)
    torch.testing.assert_close(running_mean.double(), expected_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(running_var.double(), ref_var, rtol=1e-5, atol=1e-5)


def test_float64_running_stats_keep_float64_momentum(device):
    """momentum reaches the kernel as two float32 halves; 0.1 must not become
    0.10000000149 (float32) for float64 buffers."""
    x = torch.randn(8, 2, 3, dtype=torch.float64, device=device)
    running_mean = torch.ones(2, dtype=torch.float64, device=device)
    running_var = torch.ones(2, dtype=torch.float64, device=device)
    _, ref_mean, ref_var = reference_batch_norm(x, running_mean, running_var, None, None, True, 0.1, 1e-5)
    tritonbn.batch_norm(x, running_mean, running_var, training=True, momentum=0.1)
    torch.testing.assert_close(running_mean, ref_mean, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(running_var, ref_var, rtol=1e-13, atol=1e-13)


def test_no_update_without_running_stats_and_in_eval(device):
    x = torch.randn(4, 3, 5, device=device)
    running_mean, running_var = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    before = running_mean.clone(), running_var.clone()
    tritonbn.batch_norm(x, running_mean, running_var, training=False)
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])


def test_half_input_updates_float32_running_stats(device):
    x = torch.randn(8, 3, 4, 4, device=device).half()
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    torch_mean, torch_var = running_mean.clone(), running_var.clone()
    tritonbn.batch_norm(x, running_mean, running_var, training=True)
    F.batch_norm(x, torch_mean, torch_var, torch.ones(3, device=device), None, training=True)
    assert running_mean.dtype == torch.float32
    torch.testing.assert_close(running_mean, torch_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(running_var, torch_var, rtol=1e-4, atol=1e-5)
