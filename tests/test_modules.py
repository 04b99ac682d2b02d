"""tritonbn.BatchNorm1d/2d/3d as drop-ins for torch.nn's: options, buffers,
checkpoints, errors, conversion of whole models, training step for step."""
import copy
import inspect
import itertools
import warnings

import pytest
import torch
from torch import nn

import tritonbn
from models import SmallCNN, assert_same_step

PAIRS = [(nn.BatchNorm1d, tritonbn.BatchNorm1d, (6, 3, 5)),
         (nn.BatchNorm1d, tritonbn.BatchNorm1d, (6, 3)),
         (nn.BatchNorm2d, tritonbn.BatchNorm2d, (4, 3, 3, 5)),
         (nn.BatchNorm3d, tritonbn.BatchNorm3d, (2, 3, 2, 3, 4))]
# (momentum, affine, track_running_stats, bias); bias=False only exists with affine=True
OPTIONS = [(m, a, t, b) for m, a, t, b in itertools.product([0.1, None], [True, False], [True, False],
                                                            [True, False]) if a or b]
# torch's keyword-only bias flag is new in 2.13; before it there is nothing to compare bias=False with
TORCH_HAS_BIAS_FLAG = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters


def _twins(torch_cls, our_cls, device, **kwargs):
    theirs = torch_cls(3, device=device, **kwargs)
    ours = our_cls(3, device=device, **kwargs)
    with torch.no_grad():  # same non-trivial state in both
        for t, o in zip(theirs.parameters(), ours.parameters()):
            t.copy_(torch.randn_like(t))
            o.copy_(t)
    return theirs, ours


def _assert_same_state(ours, theirs, atol=1e-5):
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        mine = ours.state_dict()[key]
        assert mine.dtype == value.dtype, key
        torch.testing.assert_close(mine, value, atol=atol, rtol=atol, msg=key)


@pytest.mark.parametrize("torch_cls,our_cls,shape", PAIRS, ids=["1d-3D", "1d-2D", "2d", "3d"])
@pytest.mark.parametrize("momentum,affine,track,bias", OPTIONS)
@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_every_option_matches_torch(device, torch_cls, our_cls, shape, momentum, affine, track, bias, eps):
    """Two training steps then an eval step: outputs, grads, buffers, state_dict."""
    kwargs = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    if not bias:
        if not TORCH_HAS_BIAS_FLAG:
            pytest.skip(f"torch {torch.__version__} BatchNorm has no bias flag")
        kwargs["bias"] = False
    theirs, ours = _twins(torch_cls, our_cls, device, **kwargs)
    # torch's repr, plus the backend the module runs on (the input's device's without parameters or buffers)
    backend = tritonbn.backend(device) if affine or track else f"triton on cuda, {tritonbn.backend('cpu')} on cpu"
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1][:-1] + f", backend={backend})"
    for step in range(3):
        training = step < 2
        theirs.train(training)
        ours.train(training)
        x = torch.randn(shape, device=device) * (step + 1) + step
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        y_theirs, y_ours = theirs(xs[0]), ours(xs[1])
        torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
        grad = torch.randn_like(y_theirs)
        y_theirs.backward(grad)
        y_ours.backward(grad)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, atol=1e-5, rtol=1e-5)
        for t, o in zip(theirs.parameters(), ours.parameters()):
            torch.testing.assert_close(o.grad, t.grad, atol=1e-5, rtol=1e-5)
        _assert_same_state(ours, theirs)


def test_reset_methods(device):
    theirs, ours = _twins(nn.BatchNorm2d, tritonbn.BatchNorm2d, device)
    ours(torch.randn(4, 3, 2, 2, device=device))
    ours.reset_running_stats()
    assert torch.equal(ours.running_mean, torch.zeros(3, device=device))
    assert torch.equal(ours.running_var, torch.ones(3, device=device))
    assert ours.num_batches_tracked.item() == 0
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(3, device=device))
    assert torch.equal(ours.bias, torch.zeros(3, device=device))


def test_bias_false_without_a_bias_parameter(device):
    bn = tritonbn.BatchNorm2d(3, bias=False, device=device)
    assert bn.bias is None and "bias" not in bn.state_dict()
    bn.reset_parameters()
    y = bn(torch.randn(4, 3, 2, 2, device=device))
    assert y.shape == (4, 3, 2, 2)


def test_factory_kwargs(device):
    bn = tritonbn.BatchNorm1d(3, device=device, dtype=torch.float64)
    assert bn.weight.dtype == bn.running_mean.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.long
    assert bn.weight.device.type == torch.device(device).type


def test_checkpoint_round_trip(device):
    theirs, _ = _twins(nn.BatchNorm2d, tritonbn.BatchNorm2d, device)
    theirs(torch.randn(4, 3, 2, 2, device=device))
    ours = tritonbn.BatchNorm2d(3, device=device)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    _assert_same_state(ours, theirs, atol=0)
    ours(torch.randn(4, 3, 2, 2, device=device))
    back = nn.BatchNorm2d(3, device=device)
    back.load_state_dict(ours.state_dict(), strict=True)
    _assert_same_state(back, ours, atol=0)


def test_checkpoint_from_before_num_batches_tracked(device):
    """A version-1 state_dict has no num_batches_tracked; torch's rule fills in 0."""
    theirs, _ = _twins(nn.BatchNorm2d, tritonbn.BatchNorm2d, device)
    state = theirs.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    ours = tritonbn.BatchNorm2d(3, device=device)
    ours.num_batches_tracked.fill_(7)
    ours.load_state_dict(state, strict=True)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=0, rtol=0)
    assert ours.num_batches_tracked.item() == 7  # kept, as torch keeps its own


def test_empty_batch(device):
    theirs, ours = _twins(nn.BatchNorm2d, tritonbn.BatchNorm2d, device)
    x = torch.randn(0, 3, 4, 4, device=device)
    y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.shape == y_theirs.shape == (0, 3, 4, 4)
    y_ours.sum().backward()
    assert torch.equal(ours.weight.grad, torch.zeros(3, device=device))
    _assert_same_state(ours, theirs, atol=0)  # num_batches_tracked counts it, as in torch


def test_module_errors(device):
    ours = tritonbn.BatchNorm2d(3, device=device)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        ours(torch.randn(2, 3, 4, device=device))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        tritonbn.BatchNorm1d(3, device=device)(torch.randn(2, 3, 4, 5, device=device))
    with pytest.raises(ValueError, match=r"expected 5D input \(got 4D input\)"):
        tritonbn.BatchNorm3d(3, device=device)(torch.randn(2, 3, 4, 5, device=device))
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
        ours(torch.randn(2, 4, 3, 3, device=device))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ours(torch.randn(1, 3, 1, 1, device=device))
    ours.eval()
    assert ours(torch.randn(1, 3, 1, 1, device=device)).shape == (1, 3, 1, 1)


def _train_twins(device, channels_last=False, autocast_dtype=None, steps=5):
    torch.manual_seed(0)
    theirs = SmallCNN().to(device)
    ours = tritonbn.convert_batchnorm(copy.deepcopy(theirs))
    models = [theirs, ours]
    if channels_last:
        models = [m.to(memory_format=torch.channels_last) for m in models]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    losses = [[], []]
    for _ in range(steps):
        x = torch.randn(6, 3, 8, 8, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 10, (6,), device=device)
        for model, opt, loss_log in zip(models, optimizers, losses):
            opt.zero_grad()
            with torch.autocast(torch.device(device).type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            loss_log.append(loss.item())
    return models, losses


@pytest.mark.parametrize("channels_last", [False, True])
def test_converted_cnn_trains_like_torch(device, channels_last):
    (theirs, ours), (loss_theirs, loss_ours) = _train_twins(device, channels_last)
    assert all(type(m) is not nn.BatchNorm2d for m in ours.modules())
    torch.testing.assert_close(loss_ours, loss_theirs, atol=1e-4, rtol=1e-4)
    _assert_same_state(ours, theirs, atol=1e-4)
    theirs.eval()
    ours.eval()
    x = torch.randn(4, 3, 8, 8, device=device)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)


AUTOCAST_DTYPES = [torch.bfloat16] + ([torch.float16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_converted_cnn_under_autocast(device, dtype):
    """Under autocast BN sees 16-bit activations with float32 parameters."""
    seen = set()
    hook = nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: seen.add((type(module), args[0].dtype, module.weight.dtype))
        if isinstance(module, tritonbn.BatchNorm2d) else None)
    try:
        (theirs, ours), (loss_theirs, loss_ours) = _train_twins(device, autocast_dtype=dtype, steps=3)
    finally:
        hook.remove()
    assert seen == {(tritonbn.BatchNorm2d, dtype, torch.float32)}
    torch.testing.assert_close(loss_ours, loss_theirs, atol=3e-2, rtol=3e-2)
    _assert_same_state(ours, theirs, atol=5e-2)


class _Doubled(nn.Module):
    def forward(self, weight):
        return weight * 2


def _state_variants(device):
    """Modules whose parameters and buffers are found other ways than in
    nn.Module's dicts, and the tensors their attributes give."""
    plain = tritonbn.BatchNorm2d(3, device=device)
    shadowed = tritonbn.BatchNorm2d(3, device=device)  # an instance attribute before the parameter
    shadowed.__dict__["weight"] = torch.full((3,), 2.0, device=device)
    parametrized = tritonbn.BatchNorm2d(3, device=device)  # its class gets a weight property
    nn.utils.parametrize.register_parametrization(parametrized, "weight", _Doubled())
    frozen = tritonbn.BatchNorm2d(3, device=device)  # weight and bias as buffers (a frozen BatchNorm)
    weight, bias = frozen.weight.detach() * 3, frozen.bias.detach() + 1
    del frozen.weight, frozen.bias
    frozen.register_buffer("weight", weight)
    frozen.register_buffer("bias", bias)
    untracked = tritonbn.BatchNorm2d(3, affine=False, track_running_stats=False, device=device)
    return dict(plain=plain, shadowed=shadowed, parametrized=parametrized, frozen=frozen, untracked=untracked)


@pytest.mark.parametrize("variant", ["plain", "shadowed", "parametrized", "frozen", "untracked"])
def test_forward_reads_the_tensors_attribute_access_gives(device, variant):
    """The module's forward reads weight, bias and the buffers as attribute
    access finds them (nn.Module's dicts read directly only where nothing
    else could answer), and its output and buffers are torch's for them."""
    from tritonbn.modules import _STATE, _state
    module = _state_variants(device)[variant]
    expected = [getattr(module, name) for name in _STATE]
    for got, want in zip(_state(module), expected):
        assert got is want or (got is None and want is None) or torch.equal(got, want), variant
    x = torch.randn(4, 3, 5, 5, device=device)
    reference = nn.BatchNorm2d(3, affine=False, track_running_stats=module.track_running_stats, device=device)
    y = module(x)
    ours_running = (module.running_mean, module.running_var)
    y_ref = nn.functional.batch_norm(x, reference.running_mean, reference.running_var, expected[0], expected[1],
                                     True, 0.1, 1e-5)
    torch.testing.assert_close(y, y_ref)
    if module.track_running_stats:
        torch.testing.assert_close(ours_running, (reference.running_mean, reference.running_var))
        assert module.num_batches_tracked.item() == 1


def test_convert_keeps_parameters_flags_and_identity(device):
    model = SmallCNN().to(device)
    model.features[1].weight.requires_grad_(False)
    model.features[4].eval()
    bn_before = model.features[1]
    params_before = list(model.parameters())
    converted = tritonbn.convert_batchnorm(model)
    assert converted is model and model.features[1] is bn_before
    assert type(model.features[1]) is tritonbn.BatchNorm2d
    assert isinstance(model.features[1], nn.BatchNorm2d)
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    assert not model.features[1].weight.requires_grad
    assert not model.features[4].training and model.features[1].training
    tritonbn.revert_batchnorm(model)
    assert type(model.features[1]) is nn.BatchNorm2d
    assert all(a is b for a, b in zip(model.parameters(), params_before))


def test_convert_root_module_and_all_ranks():
    for torch_cls, our_cls in ((nn.BatchNorm1d, tritonbn.BatchNorm1d),
                               (nn.BatchNorm2d, tritonbn.BatchNorm2d),
                               (nn.BatchNorm3d, tritonbn.BatchNorm3d)):
        assert type(tritonbn.convert_batchnorm(torch_cls(4))) is our_cls
        assert type(tritonbn.revert_batchnorm(our_cls(4))) is torch_cls


def test_convert_leaves_subclasses_alone_and_warns_for_lazy_modules():
    class FrozenBN(nn.BatchNorm2d):
        pass
    model = nn.Sequential(nn.SyncBatchNorm(4), FrozenBN(4), nn.LazyBatchNorm2d())
    with pytest.warns(UserWarning) as record:
        tritonbn.convert_batchnorm(model)
    messages = " ".join(str(w.message) for w in record)
    assert "lazy" in messages and "SyncBatchNorm" not in messages
    assert type(model[0]) is tritonbn.SyncBatchNorm and type(model[1]) is FrozenBN
    assert type(tritonbn.revert_batchnorm(model)[0]) is nn.SyncBatchNorm
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="convert_batchnorm")
        tritonbn.convert_batchnorm(nn.Sequential(nn.BatchNorm2d(4)))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_batchnorm_in_one_process_is_batchnorm(device, momentum):
    """Without an initialized process group (or in eval) tritonbn.SyncBatchNorm
    is tritonbn's BatchNorm: outputs, gradients and buffers equal
    torch.nn.SyncBatchNorm's, over train and eval steps, and checkpoints load
    both ways. convert_sync_batchnorm gives tritonbn's class with the model's
    parameters."""
    torch.manual_seed(0)
    theirs = nn.SyncBatchNorm(3, momentum=momentum, device=device)
    nn.init.uniform_(theirs.weight, 0.5, 1.5)
    nn.init.normal_(theirs.bias)
    ours = tritonbn.SyncBatchNorm(3, momentum=momentum, device=device)
    ours.load_state_dict(theirs.state_dict())
    for training in (True, True, False):
        ours.train(training)
        theirs.train(training)
        x = torch.randn(4, 3, 2, 5, device=device)
        assert_same_step(ours, theirs, x, torch.randn_like(x), rtol=1e-5, atol=1e-5)
    for name, buffer in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], buffer, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-5)

    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    bn_weight = model[1].weight
    converted = tritonbn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is tritonbn.SyncBatchNorm
    torch.testing.assert_close(converted[1].weight, bn_weight)
