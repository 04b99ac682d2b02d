"""The launch-plan cache (tritonbn/plan_cache.py, tritonbn/plans.py) and the fast path of repeated
eager calls: a plan is reused only for exactly the key it was built for, a
reused plan gives bitwise what a fresh call gives, bad input is still
rejected however often it comes, and the eager path binds no signatures."""
import inspect

import pytest
import torch
import torch.nn.functional as F

import tritonbn
from tritonbn import plan_cache, plans, views
from tritonbn.autotune import LaunchConfig, override


@pytest.fixture
def built(monkeypatch):
    """Counts the plans built (cache misses that reached the launchers)."""
    count = {"forward": 0, "backward": 0}

    def counting(name, builder):
        def build(*args, **kwargs):
            count[name] += 1
            return builder(*args, **kwargs)
        return build
    monkeypatch.setattr(plans, "forward_plan", counting("forward", plans.forward_plan))
    monkeypatch.setattr(plans, "backward_plan", counting("backward", plans.backward_plan))
    plan_cache.clear()
    yield count
    plan_cache.clear()


def _call(x, C, *, training=True, affine=True, track=True, relu=False, residual=False, param_dtype=None):
    """One forward and backward of tritonbn; returns every output and updated buffer."""
    params = dict(device=x.device, dtype=param_dtype or x.dtype)
    weight = torch.linspace(0.5, 1.5, C, **params).requires_grad_() if affine else None
    bias = torch.linspace(-1, 1, C, **params).requires_grad_() if affine else None
    running = [torch.linspace(-1, 1, C, **params), torch.linspace(0.5, 2, C, **params)] if track else [None, None]
    leaf = x.detach().clone().requires_grad_()
    r = torch.ones_like(x) * 0.25 if residual else None
    if relu:
        y = tritonbn.batch_norm_relu(leaf, *running, weight, bias, training, 0.1, 1e-5, residual=r)
    else:
        y = tritonbn.batch_norm(leaf, *running, weight, bias, training, 0.1, 1e-5)
    # in y's layout, as a real gradient comes (another layout is copied, and not cached)
    grad_out = torch.empty_like(y).copy_(
        torch.cos(torch.arange(y.numel(), dtype=torch.float32, device=x.device)).view(y.shape))
    grads = torch.autograd.grad(y, [t for t in (leaf, weight, bias) if t is not None], grad_out)
    return [y, *grads, *[t for t in running if t is not None]]


def _variants(device):
    x = torch.randn(4, 3, 5, 6, device=device) + 2
    return {
        "base": (x, {}),
        "shape": (torch.randn(6, 3, 5, 6, device=device), {}),
        "channels": (torch.randn(4, 5, 5, 6, device=device), {}),
        "strides (channels_last)": (x.to(memory_format=torch.channels_last), {}),
        "strides (batch slice)": (x[1:], {}),
        "dtype float64": (x.double(), {}),
        "dtype float16, float32 params": (x.half(), {"param_dtype": torch.float32}),
        "eval": (x, {"training": False}),
        "no affine": (x, {"affine": False}),
        "untracked": (x, {"track": False}),
        "fused relu": (x, {"relu": True}),
        "fused residual": (x, {"relu": True, "residual": True}),
    }


def test_plans_are_keyed_by_everything_that_changes_a_launch(device, built):
    """Each variant builds its own plans once, then reuses them; a reused plan
    gives bitwise the results of a fresh call (cache cleared first)."""
    variants = _variants(device)
    channels = {name: x.shape[1] for name, (x, _) in variants.items()}
    warm = {}
    for name, (x, kwargs) in variants.items():
        before = dict(built)
        first = _call(x, channels[name], **kwargs)
        after_first = dict(built)
        assert after_first["forward"] == before["forward"] + 1, f"{name}: no new forward plan"
        # running stats play no part in the backward: "untracked" shares the base's plan
        new_backward = 0 if name == "untracked" else 1
        assert after_first["backward"] == before["backward"] + new_backward, f"{name}: backward plans"
        warm[name] = _call(x, channels[name], **kwargs)
        assert built == after_first, f"{name}: the repeated call built a plan again"
        for a, b in zip(first, warm[name]):
            assert torch.equal(a, b), name
    for name, (x, kwargs) in variants.items():
        plan_cache.clear()
        fresh = _call(x, channels[name], **kwargs)
        for a, b in zip(fresh, warm[name]):
            assert torch.equal(a, b), name


def test_a_cached_cpu_plan_is_not_used_for_another_device(device, built):
    x = torch.randn(4, 3, 5, device=device)
    tritonbn.batch_norm(x, None, None, training=True)
    tritonbn.batch_norm(x, None, None, training=True)
    y = tritonbn.batch_norm(x.to("meta"), None, None, training=True)
    assert y.device.type == "meta" and y.shape == x.shape


def test_no_grad_fast_path_updates_running_stats_once_and_bumps_versions(device, built):
    x = torch.randn(8, 3, 5, device=device)
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    expected_mean, expected_var = running_mean.clone(), running_var.clone()
    for step in range(3):
        version = running_mean._version
        with torch.no_grad():
            y = tritonbn.batch_norm(x, running_mean, running_var, training=True, momentum=0.5)
        F.batch_norm(x, expected_mean, expected_var, training=True, momentum=0.5)
        torch.testing.assert_close(running_mean, expected_mean)
        torch.testing.assert_close(running_var, expected_var)
        assert running_mean._version > version, "autograd must see the in-place update"
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)
    assert built["forward"] == 1


@pytest.mark.parametrize("regime", ["flat", "split"])
def test_no_grad_eval_skips_the_saved_statistics(device, built, monkeypatch, regime):
    """A repeated eval call that needs no gradient launches the inference
    kernel without save_mean / save_invstd (nothing would read them); one that
    needs a gradient writes them, and the eval-mode backward reads them. The
    outputs are the same bit for bit."""
    from tritonbn import kernels
    name = "bn_inference_flat_kernel" if regime == "flat" else "bn_inference_kernel"
    stored = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                stored.append(kwargs["STORE_STATS"])
                return self.kernel[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(kernels, name, Spy(getattr(kernels, name)))
    x = torch.randn(4, 3, 7, device=device)
    weight = torch.rand(3, device=device, requires_grad=True)
    running_mean, running_var = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    # a non-contiguous channel slice takes the split kernel
    x = x if regime == "flat" else torch.randn(4, 6, 7, device=device)[:, ::2]
    with torch.no_grad():
        quiet = [tritonbn.batch_norm(x, running_mean, running_var, weight, None, False) for _ in range(2)]
    assert stored == [True, False], "the first call builds the plan through the op, the second is planned"
    leaf = x.clone().requires_grad_() if regime == "flat" else x.detach().requires_grad_()
    loud = tritonbn.batch_norm(leaf, running_mean, running_var, weight, None, False)
    assert stored[-1] is True
    assert torch.equal(quiet[0], quiet[1]) and torch.equal(quiet[1], loud)
    (dx,) = torch.autograd.grad(loud, leaf, torch.ones_like(loud))
    scale = weight.detach() / torch.sqrt(running_var + 1e-5)
    torch.testing.assert_close(dx, scale.view(1, 3, 1).expand_as(dx), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", ["channels", "device", "dtype", "one value per channel", "eps", "rank"])
def test_bad_input_is_rejected_every_time(device, built, bad):
    """A good call caches its plan; a bad one, asked twice, raises torch's error
    both times, and the good call still works after it."""
    x = torch.randn(4, 3, 5, device=device)
    good = dict(running_mean=torch.zeros(3, device=device), running_var=torch.ones(3, device=device),
                weight=torch.ones(3, device=device), bias=torch.zeros(3, device=device), training=True,
                momentum=0.1, eps=1e-5)
    expected_error = {"channels": RuntimeError, "device": RuntimeError, "dtype": RuntimeError,
                      "one value per channel": ValueError, "eps": ValueError, "rank": ValueError}[bad]
    args = dict(good, input=x)
    if bad == "channels":
        args["weight"] = torch.ones(4, device=device)
    elif bad == "device":
        args["weight"] = torch.ones(3, device="meta")
    elif bad == "dtype":
        args["weight"] = torch.ones(3, device=device, dtype=torch.float64)
    elif bad == "one value per channel":
        args["input"] = torch.randn(1, 3, 1, device=device)
    elif bad == "eps":
        args["eps"] = 0.0
    else:
        args["input"] = torch.randn(3, device=device)
    for _ in range(2):
        tritonbn.batch_norm(x, **good)
        with pytest.raises(expected_error):
            tritonbn.batch_norm(**args)
        # torch's CPU batch_norm accepts a meta weight, and names a 1-D input's problem only
        # by accident ("running_mean should contain 0 elements"); tritonbn's errors say what is wrong
        if bad not in ("device", "rank"):
            with pytest.raises(expected_error):
                F.batch_norm(**args)
    running = good["running_mean"].clone()
    tritonbn.batch_norm(x, **good)
    assert not torch.equal(running, good["running_mean"]), "the good call still updates"


def test_a_planned_backward_finds_its_plan_on_the_forward_plan(device, built, monkeypatch):
    """The backward of a planned forward finds its plan on the forward's, by
    the gradients wanted and grad_out's layout, with bitwise the results of
    the full key's plan; a misaligned grad_out, or one in another layout
    than y's (copied first, so never cached), takes the full key each time."""
    x = torch.randn(4, 3, 5, 6, device=device).requires_grad_()
    weight = torch.linspace(0.5, 1.5, 3, device=device).requires_grad_()
    bias = torch.linspace(-1, 1, 3, device=device).requires_grad_()
    g = torch.randn(4, 3, 5, 6, device=device)
    misaligned = torch.empty(g.numel() + 1, device=device)[1:].view_as(g).copy_(g)
    cases = {"all": (g, (x, weight, bias)), "dx only": (g, (x,)), "misaligned": (misaligned, (x, weight, bias)),
             "channels_last": (g.contiguous(memory_format=torch.channels_last), (x, weight, bias))}

    def run(grad, wrt):
        params = (weight, bias) if len(wrt) == 3 else (weight.detach(), bias.detach())
        y = tritonbn.batch_norm(x, None, None, *params, training=True)
        return torch.autograd.grad(y, wrt, grad)
    expected = {}
    for name, (grad, wrt) in cases.items():
        plan_cache.clear()
        expected[name] = run(grad, wrt)  # unplanned: the op and the full keys
    for _ in range(2):
        for name, (grad, wrt) in cases.items():
            for got, want in zip(run(grad, wrt), expected[name]):
                assert torch.equal(got, want), name
    full_keys = []
    backward_key = plan_cache.backward_key
    monkeypatch.setattr(plan_cache, "backward_key", lambda *args: full_keys.append(1) or backward_key(*args))
    for name, (grad, wrt) in cases.items():
        for got, want in zip(run(grad, wrt), expected[name]):
            assert torch.equal(got, want), name
    assert len(full_keys) == 2, "only the misaligned and the other-layout grad_out look up their plan by key"
    forward_plan, = [p for p in plan_cache._plans.values() if isinstance(p, plans.ForwardPlan)]
    links = forward_plan.backward_plans
    assert len(links) == 3 and [bool(plan) for plan in links.values()].count(False) == 1, \
        "a plan for each set of gradients wanted; the other layout: known to take the full path"


def test_the_common_key_is_the_general_one(device):
    """forward_key spells out the tuple of a call with weight, bias and both
    running stats and no residual; it is the general form's, entry for entry."""
    x = torch.randn(4, 3, 5, device=device)
    weight, bias, mean, var = (torch.rand(3, device=device) for _ in range(4))
    key = plan_cache.forward_key("inference", x, weight, bias, mean, var, None, False, 0.1, 1e-5, None, False)
    residual_key = plan_cache.forward_key("inference", x, weight, bias, mean, var, None, False, 0.1, 1e-5, x, False)
    assert key[-17:] == plan_cache.tensor_entries(weight, bias, mean, var, None)
    assert residual_key[:-20] == key[:-17] and residual_key[-20:] == plan_cache.tensor_entries(weight, bias, mean,
                                                                                            var, x)


def test_a_repeated_call_finds_its_plan_through_one_guard(device, built, monkeypatch):
    """plan_cache.find_forward: a repeated call finds its plan through a
    guard, without its full key; calls that differ only in what the guard
    compares (the input's strides or dtype, requires_grad, Parameter for
    Tensor) each get a guard of their own and the plan of their own key;
    every result is bitwise a fresh call's."""
    full_keys = []
    full_key = plan_cache._forward_key
    monkeypatch.setattr(plan_cache, "_forward_key", lambda *args: full_keys.append(1) or full_key(*args))
    x = torch.randn(4, 3, 5, 2, device=device)
    weight, bias = torch.linspace(0.5, 1.5, 3, device=device), torch.linspace(-1, 1, 3, device=device)
    mean, var = torch.linspace(-1, 1, 3, device=device), torch.linspace(0.5, 2, 3, device=device)
    variants = {
        "base": (x, weight),
        "requires_grad": (x, weight.clone().requires_grad_()),
        "Parameter": (x, torch.nn.Parameter(weight.clone())),
        "strides": (x.contiguous(memory_format=torch.channels_last), weight),
        "dtype": (x.double(), weight.double()),
    }

    def call(name):
        x, w = variants[name]
        b, m, v = (t.to(w.dtype) for t in (bias, mean, var))
        with torch.no_grad():
            return tritonbn.batch_norm(x, m, v, w, b, training=False)
    expected = {}
    for name in variants:
        plan_cache.clear()
        expected[name] = call(name)
    plan_cache.clear()
    for _ in range(2):  # the first call builds, the second finds its plan by its full key and keeps a guard
        for name in variants:
            assert torch.equal(call(name), expected[name]), name
    assert built["forward"] == len(expected) + 3, "one plan per key: base, requires_grad and Parameter share one"
    full_keys.clear()
    for name in variants:
        assert torch.equal(call(name), expected[name]), name
    assert not full_keys, "each repeated call is found through its guard"
    (guards,) = plan_cache._guarded.values()
    assert len(guards) == len(variants) and len({id(plan) for _, (plan, _) in guards}) == 3
    # what each guard admits requires a gradient exactly where its call did (a Parameter does)
    assert sorted(requires_grad for _, (_, requires_grad) in guards) == [False, False, False, True, True]
    # a tensor subclass is never found, through a guard or by key: the full path runs for it
    plain = frozenset((torch.Tensor, torch.nn.Parameter, type(None)))
    Sub = type("Sub", (torch.Tensor,), {})
    assert plan_cache.find_forward("inference", x, weight, bias, mean, var, None, False, 0.1, 1e-5, None, False,
                                   plain) is not None
    sub = x.as_subclass(Sub)
    assert plan_cache.find_forward("inference", sub, weight, bias, mean, var, None, False, 0.1, 1e-5, None, False,
                                   plain) is None
    tracked = torch.tensor(0, device=device).as_subclass(Sub)  # eval ignores it, yet its subclass sees the op
    assert plan_cache.find_forward("inference", x, weight, bias, mean, var, tracked, False, 0.1, 1e-5, None,
                                   False, plain) is None
    # tensors that alias each other (here weight is bias: the base's key) keep no guard, as
    # TensorGuards rejects them: each call finds its plan by its full key
    reference = F.batch_norm(x.double(), mean.double(), var.double(), weight.double(), weight.double())
    for _ in range(3):
        with torch.no_grad():
            y = tritonbn.batch_norm(x, mean, var, weight, weight, training=False)
        torch.testing.assert_close(y, reference.float())
    assert len(full_keys) == 3 and len(guards) == len(variants)
    # at most MAX_GUARDS guards per entry; a call past them is found by its full key
    plan_cache.clear()
    monkeypatch.setattr(plan_cache, "MAX_GUARDS", 2)
    for _ in range(2):
        for name in variants:
            call(name)
    (guards,) = plan_cache._guarded.values()
    full_keys.clear()
    assert torch.equal(call("dtype"), expected["dtype"])
    assert len(guards) == 2 and full_keys == [1]


def test_without_tensor_guards_every_call_uses_its_full_key(device, built, monkeypatch):
    """Where torch's TensorGuards is not usable, a repeated call finds its
    plan by its full key, keeps no guard, and gives the same results."""
    monkeypatch.setattr(plan_cache, "_TensorGuards", None)
    x = torch.randn(4, 3, 5, device=device)
    running = [torch.zeros(3, device=device), torch.ones(3, device=device)]
    with torch.no_grad():
        results = [tritonbn.batch_norm(x, *running, training=False) for _ in range(3)]
    assert built["forward"] == 1 and not plan_cache._guarded
    reference = F.batch_norm(x.double(), running[0].double(), running[1].double())
    for y in results:
        torch.testing.assert_close(y, reference.float())


def test_override_is_not_cached(device, built):
    """A forced config runs as forced, and leaves no plan behind for later calls."""
    x = torch.randn(4, 3, 5, device=device)
    split = LaunchConfig("split", 2, 1, 4, split_n=2)
    with override(forward=split):
        tritonbn.batch_norm(x, None, None, training=True)
        tritonbn.batch_norm(x, None, None, training=True)
    assert built["forward"] == 2
    assert not plan_cache._plans


def test_repeated_eager_calls_bind_no_signatures(device, built, monkeypatch):
    """autograd.Function.apply binds arguments with inspect.signature for a
    Function with setup_context; a repeated plain eager call must not pay it,
    forward or backward, nor a module's forward."""
    x = torch.randn(4, 3, 5, 6, device=device, requires_grad=True)
    module = tritonbn.BatchNorm2d(3, device=device)

    def step():
        y = tritonbn.batch_norm(x, None, None, module.weight, module.bias, training=True)
        (y.sum() + module(x).sum()).backward()
    step()

    def forbidden(*args, **kwargs):
        raise AssertionError("inspect.signature on the eager path")
    monkeypatch.setattr(inspect, "signature", forbidden)
    step()


def test_the_op_checks_what_the_functional_checks(device, built):
    """The op caches plans too: called directly with one value per channel it
    must refuse, or a later batch_norm call of that key would skip the check."""
    x = torch.randn(1, 3, 1, device=device)
    for _ in range(2):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            torch.ops.tritonbn.batch_norm_forward(x, None, None, None, None, None, True, 0.1, 1e-5, None, False)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            tritonbn.batch_norm(x, None, None, training=True)
    assert built["forward"] == 0


def test_vector_width_promises_only_what_the_data_allows():
    """VEC values along S load at once only where S, the N and C strides and
    every tensor's start allow it; otherwise narrower, down to 1."""
    def vec(t, *others):
        _, view, _ = views.canonical(t)
        return views.vector_width(view, t, *others)
    fp32 = torch.empty(2, 3, 14, 14, device="meta")
    assert vec(fp32) == 4                                    # 16 bytes
    assert vec(fp32.to(torch.bfloat16)) == 4                 # 196 % 8 != 0: 8 bytes
    assert vec(torch.empty(2, 3, 7, 7, device="meta")) == 1  # rows of 49
    assert vec(fp32[:, :, 1:]) == 1                          # starts 56 bytes in
    assert vec(fp32[:, 1:]) == 4                             # starts 784 bytes in: aligned
    assert vec(fp32, fp32[:, :, 1:]) == 1                    # every tensor must allow it
    assert vec(fp32.to(memory_format=torch.channels_last)) == 1
    assert vec(torch.empty(2, 3, 8, device="meta", dtype=torch.float64)) == 2
