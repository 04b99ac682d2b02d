"""The programs of one launch running at the same time (tests/threaded.py: one
thread per interpreted program, the atomics atomic), so that what only a GPU
otherwise shows happens here: cooperative members waiting for each other,
waits that end with the flag up, shares handed over to the merger, hand-overs
that find their share already claimed, arrivals in every order, the GPU's
timed wait (on the host's clock); and the split regime's last arrival
merging while others still run.

Each run is compared bit for bit with the interpreter's sequential form (the
cooperative regime's two launches, PHASE 1 then 2; the split regime run
program after program), the counters must be left at zero, and every outcome
a schedule forces must have occurred. Dropping an arrival, the claim or the
flag from the protocol makes these checks fail. (Threads on a CPU do not
reorder memory as a GPU does: test_ptx_ordering checks the ordering.)
"""
import itertools
import sys
import time

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpreterError

from tritonbn import counters, kernels, launch, plan_cache, plans
from tritonbn.autotune import LaunchConfig
from tritonbn.autotune import config as config_module
from tritonbn.autotune.shapes import in_layout
from tritonbn.kernels import cooperative as protocol
from reference import cooperative
from threaded import Schedule, concurrent_programs

pytestmark = pytest.mark.skipif(not kernels.INTERPRETED, reason="runs the interpreter's programs in threads")

GROUP = 3  # programs per channel block in the cooperative runs
OUTCOME = {"flag": "flag up", "hand": "handed over", "claim": "claimed first"}


@triton.jit
def _count_kernel(Counter, Out, n):
    for _ in range(n):
        tl.atomic_add(Counter, 1, sem="acq_rel", scope="gpu")
    tl.store(Out + tl.program_id(0), tl.program_id(0) + 1)


@triton.jit
def _meet_kernel(Flag, State, Out):
    """Program 0 waits, with no polls to spare, for the flag program 1 raises:
    run one after another, it gives up; at once, its wait ends with the flag up."""
    if tl.program_id(0) == 1:
        protocol.raise_flag(Flag)
    else:
        tl.store(Out, protocol.wait_or_hand_over(Flag, State, 0, False).to(tl.int32))


def test_programs_run_at_once_with_atomic_atomics():
    counter, out = torch.zeros(1, dtype=torch.int32), torch.zeros(8, dtype=torch.int32)
    with concurrent_programs(Schedule(pause=0.5)):
        _count_kernel[(8,)](counter, out, 50)
    assert counter.item() == 400 and out.tolist() == list(range(1, 9))
    flags, went_on = torch.zeros(2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    _meet_kernel[(2,)](flags, flags[1:], went_on)
    assert went_on.item() == 0 and flags.tolist() == [1, protocol.HANDED_OVER.value]
    flags.zero_()
    with concurrent_programs(Schedule(roles={0: "flag"})) as schedule:
        _meet_kernel[(2,)](flags, flags[1:], went_on)
    assert went_on.item() == 1 and flags.tolist() == [1, 0] and schedule.trace["flag up"] == 1


@pytest.fixture(autouse=True)
def _fresh_plans():
    """Plans built here (the GPU's one-launch form) stay out of other tests."""
    yield
    plan_cache.clear()


@pytest.fixture
def three_sms(monkeypatch):
    """One group of GROUP programs taking the channel blocks in turn."""
    monkeypatch.setattr(config_module, "_sm_count", lambda *args: GROUP)


def _phase_zero(monkeypatch, spin_limit):
    """The GPU's one-launch form of the cooperative kernels."""
    monkeypatch.setattr(plans, "cooperative_phases", lambda: (0,))
    monkeypatch.setattr(plans, "COOPERATIVE_SPIN_LIMIT", spin_limit)
    plan_cache.clear()


def _inputs(layout, dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    x = in_layout(torch.randn(6, 5, 3, 3, generator=gen, dtype=dtype) * 2 + 1, layout)
    other = [in_layout(torch.randn(6, 5, 3, 3, generator=gen, dtype=dtype), layout) for _ in range(2)]
    weight, bias = torch.rand(5, generator=gen, dtype=dtype) + 0.5, torch.randn(5, generator=gen, dtype=dtype)
    return x, other[0], other[1], weight, bias


def _cooperative_calls(layout):
    """The forward (running stats, residual + ReLU), then the training backward
    (ReLU mask from x, parameter gradients) and the eval backward with
    parameter gradients, all on the cooperative regime: groups of GROUP,
    three channel blocks."""
    x, residual, grad, weight, bias = _inputs(layout)
    cfg = cooperative(x, block_n=2, block_c=2, block_s=16)
    running = [torch.zeros(5), torch.ones(5)]
    outputs = list(launch.forward_training(x, weight, bias, *running, None, 0.1, 1e-5, config=cfg,
                                           residual=residual, relu=True))
    mean, invstd = outputs[1], outputs[2]
    outputs += launch.backward(grad, x, weight, mean, invstd, True, (True, True, True), bias.dtype,
                               config=cfg, relu_from_input=True, bias=bias)
    outputs += launch.backward(grad, x, weight, mean, invstd, False, (True, True, True), bias.dtype,
                               config=cfg)
    return outputs + running


def _assert_same(got, expected):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert (a is None and b is None) or torch.equal(a, b), f"output {i} differs from the sequential run"
    assert counters.all_zero(), "a launch left its counters or flags set"


def _check_cooperative(monkeypatch, layout, schedule, spin_limit, expected=None):
    if expected is None:
        expected = _cooperative_calls(layout)  # the interpreter's two-launch form
    _phase_zero(monkeypatch, spin_limit)
    with concurrent_programs(schedule):
        got = _cooperative_calls(layout)
    _assert_same(got, expected)


ORDERS = list(itertools.permutations(range(GROUP)))
ROLES = {0: "flag", 1: "hand", 2: "claim"}
HAND_ALL = {p: "hand" for p in range(GROUP)}  # every member that does not merge hands its share over
FLAG_ALL = {p: "flag" for p in range(GROUP)}  # every member that does not merge waits for the flag


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("order", ORDERS, ids=["".join(map(str, o)) for o in ORDERS])
def test_cooperative_groups_meet_in_every_arrival_order(three_sms, monkeypatch, layout, order):
    """The first channel block's arrivals in each of the 3! orders; the two
    members that do not merge each take their role (a wait that ends with the
    flag up, a share handed over, a hand-over that finds the share claimed),
    in the forward and the training backward."""
    schedule = Schedule(roles=ROLES, order=list(order), seed=sum(order))
    _check_cooperative(monkeypatch, layout, schedule, spin_limit=2)
    for member in order[:-1]:  # the last to arrive merges
        assert schedule.trace[OUTCOME[ROLES[member]]] >= 2, (schedule.trace, member)


@pytest.mark.parametrize("seed", range(4))
def test_cooperative_groups_meet_under_random_schedules(three_sms, monkeypatch, seed):
    """Random roles, poll budgets and pauses, without forcing: the protocol
    holds whatever the interleaving."""
    rng = torch.Generator().manual_seed(seed)
    roles = {p: [None, "flag", "hand", "claim"][int(torch.randint(4, (1,), generator=rng))] for p in range(GROUP)}
    spin_limit = [0, 1, 4, 16][seed]
    layout = ["contiguous", "channels_last"][seed % 2]
    schedule = Schedule(roles=roles, seed=seed, pause=0.5)
    _check_cooperative(monkeypatch, layout, schedule, spin_limit)
    assert schedule.trace["flag up"] + schedule.trace["handed over"] + schedule.trace["claimed first"] > 0


def test_cooperative_waits_end_with_the_flag_up(three_sms, monkeypatch):
    """No gate, the GPU's poll budget: every member sees the flag raised
    (nothing handed over), as on a GPU whose group is resident."""
    schedule = Schedule(seed=3)
    _check_cooperative(monkeypatch, "contiguous", schedule, spin_limit=plans.COOPERATIVE_SPIN_LIMIT)
    waits = 2 * 3 * (GROUP - 1)  # forward and training backward, three blocks, the members that do not merge
    assert schedule.trace["flag up"] == waits and not schedule.trace["handed over"], schedule.trace


@triton.jit
def _host_clock():
    """The interpreter's stand-in for the GPU's global timer
    (cooperative.clock_ns): the host's monotonic clock, in nanoseconds."""
    return tl.full((), time.monotonic_ns(), tl.int64)


@pytest.mark.parametrize("roles,budget_ns,outcome", [(None, 10**10, "flag up"), ("hand", 2_000_000, "handed over")],
                         ids=["flag-within-budget", "budget-spent"])
def test_timed_waits(three_sms, monkeypatch, roles, budget_ns, outcome):
    """The GPU's wait (TIMED_WAIT: a budget in nanoseconds of a clock, here
    the host's in place of the global timer): members poll until the flag
    is up within a long budget, or, with the merger held until they hand
    over, until a 2 ms budget is spent."""
    expected = _cooperative_calls("contiguous")
    monkeypatch.setattr(protocol, "clock_ns", _host_clock)
    _phase_zero(monkeypatch, spin_limit=0)
    monkeypatch.setattr(plans, "cooperative_launch", lambda: dict(wait_limit=budget_ns, TIMED_WAIT=True))
    schedule = Schedule(roles=HAND_ALL if roles == "hand" else None, seed=4)
    with concurrent_programs(schedule):
        got = _cooperative_calls("contiguous")
    _assert_same(got, expected)
    waits = 2 * 3 * (GROUP - 1)  # forward and training backward, three blocks, the members that do not merge
    assert schedule.trace[outcome] == waits, schedule.trace


def _split_calls(layout):
    """The split regime's forward (statistics kernel merging at its last
    arrival) and backward (sums kernel reducing at its last arrival)."""
    x, residual, grad, weight, bias = _inputs(layout, torch.float64)
    cfg = LaunchConfig("split", 2, 4, 4, split_n=2, split_s=2)  # 2 channel blocks of 4 programs
    running = [torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)]
    outputs = list(launch.forward_training(x, weight, bias, *running, None, 0.1, 1e-5, config=cfg))
    outputs += launch.backward(grad, x, weight, outputs[1], outputs[2], True, (True, True, True), bias.dtype,
                               config=cfg)
    return outputs + running


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("seed", range(3))
def test_split_merges_at_the_last_arrival_in_any_order(layout, seed):
    expected = _split_calls(layout)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(seed)).tolist()
    with concurrent_programs(Schedule(order=order, seed=seed, pause=0.5)):
        got = _split_calls(layout)
    _assert_same(got, expected)


# ---------------------------------------------------------------- mutations: the checks can fail
@triton.jit
def _arrive_without_member_0(Arrived):
    before = 0
    if tl.program_id(0) != 0:
        tl.debug_barrier()
        before = tl.atomic_add(Arrived, 1, sem="acq_rel", scope="gpu")
    return before


@triton.jit
def _no_claim(State, member, GROUP: tl.constexpr, MEMBERS: tl.constexpr):
    return 0


@triton.jit
def _no_flag(Done):
    tl.debug_barrier()


@pytest.mark.parametrize("name,mutant,roles,failure", [
    (None, None, HAND_ALL, None),
    (None, None, FLAG_ALL, None),
    pytest.param("arrive", _arrive_without_member_0, HAND_ALL, "differs",  # no merger: no share is finished
                 marks=pytest.mark.filterwarnings("ignore::RuntimeWarning")),  # y never written
    ("claim_shares", _no_claim, HAND_ALL, "differs"),            # the shares handed over are never finished
    ("raise_flag", _no_flag, FLAG_ALL, "the flag"),              # a wait that can only give up
], ids=["intact-hand-over", "intact-flag", "no-arrival", "no-claim", "no-flag"])
def test_dropping_a_step_of_the_protocol_fails(three_sms, monkeypatch, name, mutant, roles, failure):
    """The checks above pass on the protocol as it is and fail on each mutant."""
    expected = _cooperative_calls("contiguous")
    if name is not None:
        for kernel in (kernels.bn_fwd_coop_kernel, kernels.bn_bwd_coop_kernel):
            monkeypatch.setattr(sys.modules[kernel.fn.__module__], name, mutant)
    schedule = Schedule(roles=roles, seed=1)
    schedule.timeout = 2.0
    try:
        if failure is None:
            _check_cooperative(monkeypatch, "contiguous", schedule, spin_limit=2, expected=expected)
            assert schedule.trace[OUTCOME[roles[0]]] > 0
        else:
            with pytest.raises((AssertionError, InterpreterError), match=failure):
                _check_cooperative(monkeypatch, "contiguous", schedule, spin_limit=2, expected=expected)
    finally:
        counters._buffers.clear()  # a mutant leaves its counters set: fresh zeroed ones for the next test
