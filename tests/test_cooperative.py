"""The cooperative regime: a channel block's slab over a group of programs that
exchange partials (kernels/cooperative.py: arrive, raise_flag, wait_or_hand_over).

Its results in every layout, dtype and fused epilogue are checked with the
other regimes (test_batch_norm, test_batch_norm_relu, test_gradcheck, test_traffic
force it). Here: when the heuristic picks it, what a config must satisfy,
the grid it runs on, the interpreter's two-launch form of it, and the GPU's
one-launch form run on the interpreter: there every wait gives up (programs
run one after another) and hands its share to the merger, which finishes
it. test_concurrent_programs runs the programs at once, waits that end with
the flag up included; test_cuda runs them on a GPU.
"""
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritonbn import counters, kernels, launch, plan_cache, plans, views
from tritonbn.kernels.cooperative import claim_shares, depart, wait_or_hand_over
from tritonbn.autotune import LaunchConfig, Problem, heuristic
from tritonbn.autotune import config as config_module
from tritonbn.autotune.shapes import in_layout, suite
from reference import cooperative

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counts the interpreter's launches")

GPU = torch.device("cuda", 0)


@pytest.fixture
def h100(monkeypatch):
    """What the heuristic sees on an H100: 132 SMs, warps of 32."""
    monkeypatch.setattr(config_module, "_sm_count", lambda *args: 132)
    monkeypatch.setattr(config_module, "_warp_size", lambda *args: 32)


def _problem(op, shape, dtype=torch.bfloat16, channel_inner=False):
    N, C, *spatial = shape
    S = 1
    for size in spatial:
        S *= size
    return Problem(op, N, C, S, channel_inner, dtype, GPU)


@pytest.mark.parametrize("op,shape,dtype,expected", [
    ("forward", (256, 512, 14, 14), torch.bfloat16, "cooperative"),  # 100 KB per channel
    ("forward", (256, 512, 14, 14), torch.float32, "split"),         # 200 KB: does not fit
    ("backward", (256, 512, 14, 14), torch.bfloat16, "split"),       # x and dy: 200 KB
    ("backward", (256, 512, 7, 7), torch.bfloat16, "cooperative"),
    ("forward", (32, 128, 28, 28), torch.float32, "cooperative"),
    ("forward", (256, 512, 7, 7), torch.bfloat16, "resident"),       # one program holds it
    ("inference", (256, 512, 7, 7), torch.bfloat16, "flat"),
])
def test_heuristic_reads_a_fitting_slab_once(h100, op, shape, dtype, expected):
    assert heuristic(_problem(op, shape, dtype)).regime == expected


@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("channel_inner", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_heuristic_cooperative_configs_are_valid_and_co_resident(h100, op, channel_inner, dtype):
    """On every ResNet-50 shape: wherever one channel's slab fits 192 KB a
    single-read regime is chosen; a cooperative group is one tile per program,
    at most one program per SM, within the tile limit that compiled without
    spills."""
    chosen = 0
    for shape in suite("resnet50"):
        problem = _problem(op, shape, dtype, channel_inner)
        cfg = heuristic(problem)
        if config_module.slab_fits(problem):
            assert cfg.regime in ("resident", "cooperative"), (shape, cfg)
        if cfg.regime != "cooperative":
            continue
        chosen += 1
        cfg.validate(problem)
        assert 2 <= cfg.split_n * cfg.split_s <= 132
        assert cfg.block_n * cfg.block_c * cfg.block_s <= config_module._cooperative_limit(problem)
        view = views.View(problem.N, problem.C, problem.S, channel_inner)
        group, groups = plans.cooperative_grid(view, cfg, GPU)
        assert group * groups <= 132
    assert chosen


def test_environment_variable_turns_the_regime_off(h100, monkeypatch):
    problem = _problem("forward", (256, 512, 14, 14))
    monkeypatch.setenv("TRITONBN_COOPERATIVE", "0")
    assert heuristic(problem).regime == "split"
    assert all(c.regime != "cooperative" for c in config_module.candidates(problem))
    monkeypatch.setenv("TRITONBN_COOPERATIVE", "1")
    assert heuristic(problem).regime == "cooperative"
    assert any(c.regime == "cooperative" for c in config_module.candidates(problem))


def test_config_validation_names_the_problem():
    problem = Problem("forward", 5, 3, 10, False, torch.float32, torch.device("cpu"))
    LaunchConfig("cooperative", 2, 1, 8, split_n=3, split_s=2).validate(problem)
    with pytest.raises(ValueError, match="one tile per program"):
        LaunchConfig("cooperative", 2, 1, 8, split_n=2, split_s=2).validate(problem)
    with pytest.raises(ValueError, match="inference has no cooperative regime"):
        LaunchConfig("cooperative", 2, 1, 8, split_n=3, split_s=2).validate(
            Problem("inference", 5, 3, 10, False, torch.float32, torch.device("cpu")))


def test_a_group_larger_than_the_gpu_is_refused(monkeypatch):
    """Its programs could not all be resident: a wait would never end."""
    monkeypatch.setattr(config_module, "_sm_count", lambda *args: 4)
    view = views.View(10, 3, 1, True)
    with pytest.raises(ValueError, match="must all be resident"):
        plans.cooperative_grid(view, LaunchConfig("cooperative", 2, 1, 1, split_n=5), GPU)
    assert plans.cooperative_grid(view, LaunchConfig("cooperative", 5, 1, 1, split_n=2), GPU) == (2, 2)


def _launches(monkeypatch):
    """(kernel, grid, PHASE, GROUP) of each cooperative launch from now on."""
    log = []

    class Spy:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(kernels, name)

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                log.append((self.name, grid, kwargs["PHASE"], kwargs["GROUP"]))
                return self.kernel[grid](*args, **kwargs)
            return run

    for name in ("bn_fwd_coop_kernel", "bn_bwd_coop_kernel"):
        monkeypatch.setattr(kernels, name, Spy(name))
    return log


def test_interpreter_runs_two_phases_and_groups_take_blocks_in_turn(monkeypatch):
    """Under the interpreter: PHASE 1 (partials, merge) then PHASE 2 (normalize);
    with room for two groups (4 SMs, groups of 2), each takes every other
    channel block. Results as torch's, running stats and momentum=None included."""
    assert plans.cooperative_phases() == (1, 2)
    monkeypatch.setattr(config_module, "_sm_count", lambda *args: 4)
    log = _launches(monkeypatch)
    x = torch.randn(6, 5, 3, 3, dtype=torch.float64) * 2 + 1
    cfg = cooperative(x, block_n=4, block_c=2, block_s=16)  # 3 channel blocks, groups of 2
    assert (cfg.split_n, cfg.split_s) == (2, 1)
    for momentum in (0.1, None):
        running = [torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5]
        expected_running = [t.clone() for t in running]
        tracked = torch.tensor(3)
        y, mean, invstd = launch.forward_training(x, None, None, *running, tracked, momentum, 1e-5, config=cfg)
        expected = F.batch_norm(x, *expected_running, None, None, True, 1 / 3 if momentum is None else momentum,
                                1e-5)
        torch.testing.assert_close(y, expected)
        torch.testing.assert_close(running, expected_running)
        var, mu = torch.var_mean(x, (0, 2, 3), correction=0)
        torch.testing.assert_close(mean, mu)
        torch.testing.assert_close(invstd, torch.rsqrt(var + 1e-5))
        assert counters.all_zero()
    assert [(grid, phase, group) for _, grid, phase, group in log] == [((2, 2), 1, 2), ((2, 2), 2, 2)] * 2


@pytest.mark.parametrize("sums", [False, True])
def test_eval_backward_is_one_launch_that_waits_for_nothing(monkeypatch, sums):
    """Eval mode's dx (grad_out * weight * invstd) reads no totals: one PHASE 0
    launch even under the interpreter, with or without parameter gradients
    (the last program of a channel block to arrive sums those), no program
    waiting (a wait would hand every share over there: spin_limit 0 shows
    none does), and the counters left at zero."""
    monkeypatch.setattr(plans, "COOPERATIVE_SPIN_LIMIT", 0)
    plan_cache.clear()
    log = _launches(monkeypatch)
    x, g = torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 5, 5, dtype=torch.float64)
    w, mean, invstd = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64), \
        torch.rand(3, dtype=torch.float64) + 0.5
    dx, dw, db, _ = launch.backward(g, x, w, mean, invstd, False, (True, sums, sums), w.dtype,
                                    config=cooperative(x, block_s=16))
    torch.testing.assert_close(dx, g * (w * invstd)[None, :, None, None])
    if sums:
        xhat = (x - mean[None, :, None, None]) * invstd[None, :, None, None]
        torch.testing.assert_close(dw, (g * xhat).sum((0, 2, 3)))
        torch.testing.assert_close(db, g.sum((0, 2, 3)))
    else:
        assert dw is None and db is None
    assert [(name, phase) for name, _, phase, _ in log] == [("bn_bwd_coop_kernel", 0)]
    assert counters.all_zero()


def test_results_are_bitwise_reproducible_and_the_regimes_agree(monkeypatch):
    """The merge order is fixed: two runs agree bit for bit; and the statistics
    equal the split regime's to rounding."""
    x = in_layout(torch.randn(8, 6, 7, 7), "channels_last") * 3 + 2
    cfg = cooperative(x, block_n=2, block_c=4, block_s=32)
    first = launch.forward_training(x, None, None, None, None, None, 0.1, 1e-5, config=cfg)
    second = launch.forward_training(x, None, None, None, None, None, 0.1, 1e-5, config=cfg)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    split = LaunchConfig("split", 2, 4, 16, split_n=2, split_s=2)
    other = launch.forward_training(x, None, None, None, None, None, 0.1, 1e-5, config=split)
    for a, b in zip(first, other):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _single_launch(monkeypatch, spin_limit, pieces):
    """Run the cooperative kernels as on a GPU (PHASE 0, one launch) under the
    interpreter: its programs run one after another, so every program but a
    block's last gives up waiting after spin_limit polls and hands its share
    over; the last merges, then finishes those shares (pieces: their size,
    or None for the launcher's)."""
    monkeypatch.setattr(plans, "cooperative_phases", lambda: (0,))
    monkeypatch.setattr(plans, "COOPERATIVE_SPIN_LIMIT", spin_limit)
    if pieces is not None:
        monkeypatch.setattr(plans, "hand_over_piece", lambda cfg, itemsize: pieces)
    plan_cache.clear()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("spin_limit,pieces", [(0, None), (3, dict(PIECE_N=1, PIECE_S=4))])
def test_single_launch_with_shares_handed_over_equals_two_phases(monkeypatch, layout, spin_limit, pieces):
    """PHASE 0, the GPU's form, on the interpreter, with every wait given up:
    the forward (running stats, residual + ReLU) and the training and eval
    backward (ReLU mask recomputed from x, from y; parameter gradients) give
    what the two-launch form gives, bit for bit, with two groups taking
    channel blocks in turn, the handed-over shares finished whole or in
    pieces of 1 x 4 (masked tails); and a second run gives the same again:
    every call leaves the flags and share states at zero for the next."""
    monkeypatch.setattr(config_module, "_sm_count", lambda *args: 6)
    x = in_layout(torch.randn(6, 5, 3, 3, dtype=torch.float32) * 2 + 1, layout)
    residual, grad, y_relu = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x).relu()
    weight, bias = torch.rand(5) + 0.5, torch.randn(5)
    cfg = cooperative(x, block_n=2, block_c=2, block_s=16)  # groups of 3, 3 channel blocks

    def run():
        log = _launches(monkeypatch)
        running = [torch.zeros(5), torch.ones(5)]
        outputs = list(launch.forward_training(x, weight, bias, *running, None, 0.1, 1e-5, config=cfg,
                                               residual=residual, relu=True))
        mean, invstd = outputs[1], outputs[2]
        for training, kwargs in ((True, dict(relu_from_input=True, bias=bias)), (True, dict(output=y_relu)),
                                 (False, dict(output=y_relu, residual_grad=True))):
            outputs += launch.backward(grad, x, weight, mean, invstd, training, (True, True, True), bias.dtype,
                                       config=cfg, **kwargs)
        monkeypatch.undo()
        return outputs + running, log

    expected, two = run()
    assert {phase for _, _, phase, _ in two} == {0, 1, 2}  # the eval backward: one launch anywhere
    monkeypatch.setattr(config_module, "_sm_count", lambda *args: 6)
    _single_launch(monkeypatch, spin_limit, pieces)
    for _ in range(2):
        got, one = run()
        _single_launch(monkeypatch, spin_limit, pieces)
        monkeypatch.setattr(config_module, "_sm_count", lambda *args: 6)
        assert {phase for _, _, phase, _ in one} == {0} and {grid for _, grid, _, _ in one} == {(3, 2)}
        assert counters.all_zero()
        for a, b in zip(got, expected):
            assert (a is None and b is None) or torch.equal(a, b)


@triton.jit
def _wait_kernel(Done, State, Out, polls):
    tl.store(Out, wait_or_hand_over(Done, State, polls, False).to(tl.int32))


@triton.jit
def _claim_kernel(State, Out, member, GROUP: tl.constexpr, MEMBERS: tl.constexpr):
    tl.store(Out, claim_shares(State, member, GROUP, MEMBERS))


@triton.jit
def _depart_kernel(Departed, Done, State, GROUP: tl.constexpr):
    depart(Departed, Done, State, GROUP)


@pytest.mark.parametrize("leaving", [2, 3])
def test_the_last_program_to_depart_resets_the_block(leaving):
    """Of a group of 3, until all have left
    the flag and states stay as the exchange left them; the third to leave
    sets the flag, the states and the counter back to zero, and the word past
    the group's states is not touched."""
    flags = torch.tensor([0, 1, 2, 1, 2, 7], dtype=torch.int32)  # departures, flag, 3 states, a neighbour
    _depart_kernel[(leaving,)](flags, flags[1:], flags[2:], GROUP=3)
    expected = [2, 1, 2, 1, 2, 7] if leaving == 2 else [0, 0, 0, 0, 0, 7]
    assert flags.tolist() == expected


@pytest.mark.parametrize("done,state,go,after", [
    (1, 0, 1, 0),  # the flag is up: go on, the share stays this program's
    (0, 0, 0, 1),  # no flag within the polls: hand the share over
    (0, 2, 1, 2),  # the merger claimed it first (its flag is then up): go on
])
def test_wait_or_hand_over(done, state, go, after):
    flags = torch.tensor([done, state], dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    _wait_kernel[(1,)](flags, flags[1:], out, 5)
    assert (out.item(), flags[1].item()) == (go, after)


def test_claim_shares_counts_the_shares_handed_over():
    """Members 1 and 3 of 5 handed over, member 4 was claimed already; the
    merger (member 2) claims the pending ones, its own slot included."""
    state = torch.tensor([0, 1, 0, 1, 2], dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    _claim_kernel[(1,)](state, out, 2, GROUP=5, MEMBERS=8)
    assert out.item() == 2
    assert state.tolist() == [2, 1, 2, 1, 2]
