"""Bad input gets a clear error naming the problem, of the type torch raises,
and leaves every buffer untouched."""
import pytest
import torch
import torch.nn.functional as F

import tritonbn


def _buffers(device, C=3, dtype=torch.float32):
    return torch.zeros(C, device=device, dtype=dtype), torch.ones(C, device=device, dtype=dtype)


def _assert_untouched(running_mean, running_var):
    assert torch.equal(running_mean, torch.zeros_like(running_mean))
    assert torch.equal(running_var, torch.ones_like(running_var))


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_in_training(device, shape):
    running_mean, running_var = _buffers(device)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        tritonbn.batch_norm(torch.randn(shape, device=device), running_mean, running_var, training=True)
    _assert_untouched(running_mean, running_var)
    # eval mode is fine with one value, as in torch
    assert tritonbn.batch_norm(torch.randn(shape, device=device), running_mean, running_var).shape == shape


def test_wrong_channel_count(device):
    running_mean, running_var = _buffers(device)
    x = torch.randn(4, 5, 2, device=device)
    with pytest.raises(RuntimeError, match=r"running_mean should contain 5 elements not 3"):
        tritonbn.batch_norm(x, running_mean, running_var, training=True)
    with pytest.raises(RuntimeError, match=r"weight should contain 5 elements not 3"):
        tritonbn.batch_norm(x, None, None, torch.ones(3, device=device), training=True)
    with pytest.raises(RuntimeError, match=r"bias should contain 5 elements not 3"):
        tritonbn.batch_norm(x, None, None, None, torch.ones(3, device=device), training=True)
    _assert_untouched(running_mean, running_var)


def test_parameter_that_is_not_one_dimensional(device):
    with pytest.raises(RuntimeError, match=r"weight should contain 3 elements not 3.*shape \(3, 1\)"):
        tritonbn.batch_norm(torch.randn(4, 3, device=device), None, None,
                            torch.ones(3, 1, device=device), training=True)


@pytest.mark.parametrize("shape", [(), (5,)])
def test_wrong_rank(device, shape):
    with pytest.raises(ValueError, match=r"input of shape \(N, C, \*\), got a \d-D tensor"):
        tritonbn.batch_norm(torch.randn(shape, device=device), None, None, training=True)


def test_integer_input(device):
    with pytest.raises(NotImplementedError, match="got torch.int64"):
        tritonbn.batch_norm(torch.ones(4, 3, dtype=torch.long, device=device), None, None, training=True)


@pytest.mark.parametrize("input_dtype,param_dtype", [
    (torch.float32, torch.float64),
    (torch.float32, torch.float16),
    (torch.float16, torch.bfloat16),
    (torch.float64, torch.float32),
])
def test_dtype_mismatch(device, input_dtype, param_dtype):
    running_mean, running_var = _buffers(device, dtype=param_dtype)
    x = torch.randn(4, 3, device=device).to(input_dtype)
    message = rf"dtype mismatch: input is {input_dtype}.*running_mean={param_dtype}"
    with pytest.raises(RuntimeError, match=message):
        tritonbn.batch_norm(x, running_mean, running_var, training=True)
    _assert_untouched(running_mean, running_var)


def test_half_input_with_mixed_parameter_dtypes(device):
    """16-bit input: parameters all float16 or all float32, not a mix."""
    running_mean, running_var = _buffers(device)  # float32
    x = torch.randn(4, 3, device=device).half()
    with pytest.raises(RuntimeError, match="must be all torch.float16 or all torch.float32"):
        tritonbn.batch_norm(x, running_mean, running_var, torch.ones(3, device=device).half(), training=True)
    _assert_untouched(running_mean, running_var)


def test_wrong_device(device):
    meta_mean = torch.zeros(3, device="meta")
    x = torch.randn(4, 3, device=device)
    with pytest.raises(RuntimeError, match=r"running_mean is on meta but input is on"):
        tritonbn.batch_norm(x, meta_mean, torch.ones(3, device="meta"), training=True)
    with pytest.raises(RuntimeError, match=r"weight is on meta but input is on"):
        tritonbn.batch_norm(x, None, None, torch.ones(3, device="meta"), training=True)


def test_eval_needs_running_stats(device):
    x = torch.randn(4, 3, device=device)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        tritonbn.batch_norm(x, None, None, training=False)


def test_only_one_running_statistic(device):
    running_mean, _ = _buffers(device)
    with pytest.raises(RuntimeError, match="running_var is None but the other running statistic is not"):
        tritonbn.batch_norm(torch.randn(4, 3, device=device), running_mean, None, training=True)
    _assert_untouched(running_mean, torch.ones(3))


@pytest.mark.parametrize("training,eps,message", [
    (True, 0.0, "eps must be positive during training"),
    (False, -1e-5, "eps must be non-negative"),
])
def test_bad_eps(device, training, eps, message):
    running_mean, running_var = _buffers(device)
    x = torch.randn(4, 3, device=device)
    with pytest.raises(ValueError, match=message):
        tritonbn.batch_norm(x, running_mean, running_var, training=training, eps=eps)
    # torch rejects it too (torch < 2.13 words it "eps must be positive" in both modes)
    with pytest.raises(ValueError, match="batch_norm eps must be"):
        F.batch_norm(x, running_mean, running_var, training=training, eps=eps)
    _assert_untouched(running_mean, running_var)


def test_cumulative_average_needs_num_batches_tracked(device):
    from tritonbn.functional import batch_norm_tracked
    running_mean, running_var = _buffers(device)
    with pytest.raises(RuntimeError, match="momentum=None .* needs num_batches_tracked"):
        batch_norm_tracked(torch.randn(4, 3, device=device), running_mean, running_var,
                           training=True, momentum=None)
    _assert_untouched(running_mean, running_var)


@pytest.mark.parametrize("argument,value", [
    ("input", [[1.0, 2.0, 3.0]]),
    ("running_mean", [0.0, 0.0, 0.0]),
    ("weight", 1.0),
    ("bias", "zeros"),
    ("momentum", "0.1"),
    ("eps", None),
    ("training", 1),
])
def test_wrong_argument_type(device, argument, value):
    """A TypeError naming the argument, before anything is launched or written
    (torch raises TypeError for these too)."""
    running_mean, running_var = _buffers(device)
    args = dict(input=torch.randn(4, 3, device=device), running_mean=running_mean, running_var=running_var,
                weight=None, bias=None, training=True, momentum=0.1, eps=1e-5)
    args[argument] = value
    with pytest.raises(TypeError, match=rf"argument '{argument}' must be"):
        tritonbn.batch_norm(**args)
    _assert_untouched(running_mean, running_var)
    if argument != "input":  # torch's is an AttributeError from input.size()
        with pytest.raises(TypeError):
            F.batch_norm(**args)


def test_wrong_type_after_a_planned_call(device):
    """A call whose plan is cached, repeated with a wrong-typed argument: the
    plan's key keeps only training's truth value, so the type is checked before."""
    running_mean, running_var = _buffers(device)
    x = torch.randn(4, 3, device=device)
    for _ in range(2):
        tritonbn.batch_norm(x, running_mean, running_var, training=True)
    before = running_mean.clone(), running_var.clone()
    with pytest.raises(TypeError, match="argument 'training' must be bool"):
        tritonbn.batch_norm(x, running_mean, running_var, training="yes")
    with pytest.raises(TypeError, match="argument 'momentum' must be float"):
        tritonbn.batch_norm(x, running_mean, running_var, training=True, momentum=None)
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])


def test_numbers_torch_accepts(device):
    """momentum / eps as an int, a numpy scalar or a one-element tensor, as torch takes them."""
    import numpy as np
    x = torch.randn(4, 3, device=device)
    expected = F.batch_norm(x, None, None, training=True, eps=1)
    for eps in (1, np.float64(1.0), torch.tensor(1.0)):
        torch.testing.assert_close(tritonbn.batch_norm(x, None, None, training=True, eps=eps), expected)


@pytest.mark.parametrize("shape", [(), (5,)])
def test_rank_error_is_clearer_than_torchs(device, shape):
    """A 0-D or non-empty 1-D input: tritonbn's ValueError (torch's errors there
    are accidental: IndexError, or a running_mean size mismatch)."""
    with pytest.raises(ValueError, match=r"input of shape \(N, C, \*\)"):
        tritonbn.batch_norm(torch.randn(shape, device=device), torch.zeros(5, device=device),
                            torch.ones(5, device=device))
