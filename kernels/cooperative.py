"""How the programs of one launch meet: arrival counters, the merged flag and
its wait, and the hand-over of a share (tl.atomic_* at gpu scope; what other
programs wrote is read with ``.cg``, from L2, never a stale L1 line).

The split regime uses the arrivals only: each program of a channel block
arrives after storing its partials, and the last to arrive merges them
(nobody waits).

The cooperative regime (forward.bn_fwd_coop_kernel, backward.bn_bwd_coop_kernel)
uses all of it. It spreads one channel block's slab over GROUP programs that
each hold their share in registers. Each stores its partial statistics, then
arrives at the channel block's counter; the last to arrive merges the
partials in a fixed order, writes the block's statistics and raises its
flag; the others wait for the flag and read those statistics. The grid is at
most one program per SM and is launched as a cooperative grid
(tritonbn/plans.py), which the driver starts only when all its programs can
be resident at once, so a wait ends within microseconds. Should one still
take longer than its budget (tens of microseconds of the GPU's global timer,
or a poll count: tritonbn/plans.py, cooperative_launch), the program hands
its share to the merger (wait_or_hand_over, claim_shares): the merger reads
that share again and finishes it with the same statistics, so results do
not change and no program waits for one that cannot run.

The flags are tritonbn/counters.py's zeroed counters, left at zero for the
next launch: the last to arrive resets the arrival counter; every program
counts itself out (depart) after its last use of the block's flag and share
states, and the last to leave resets them.
"""
import triton
import triton.language as tl

# Share states, one int32 per (channel block, member), zero at launch:
HANDED_OVER = tl.constexpr(1)  # the member gave up waiting: the merger finishes its share
CLAIMED = tl.constexpr(2)      # the merger came first: the member's wait ends with the flag up


@triton.jit
def arrive(Arrived):
    """Count this program in at a channel block's counter, after all its threads'
    stores (bar.sync, then one release-acquire atomic). Returns how many had
    arrived before: GROUP - 1 for the last, which then sees every other
    program's stores."""
    tl.debug_barrier()
    return tl.atomic_add(Arrived, 1, sem="acq_rel", scope="gpu")


@triton.jit
def reset_arrivals(Arrived):
    """The last program to arrive: no other arrives at this counter again in
    this launch, so it goes back to zero for the next."""
    tl.atomic_xchg(Arrived, 0, sem="relaxed", scope="gpu")


@triton.jit
def raise_flag(Done):
    """Publish the merged statistics: every thread's stores, then the flag."""
    tl.debug_barrier()
    tl.atomic_xchg(Done, 1, sem="release", scope="gpu")


@triton.jit
def clock_ns():
    """The low 32 bits of the GPU's global nanosecond timer (%globaltimer_lo):
    the difference of two readings is right across its wrap up to 2 s, and
    32 bits keep the wait's registers as few as a poll counter's."""
    return tl.inline_asm_elementwise("mov.u32 $0, %globaltimer_lo;", "=r", [], dtype=tl.int32, is_pure=False,
                                     pack=1)


@triton.jit
def wait_or_hand_over(Done, State, wait_limit, TIMED_WAIT: tl.constexpr):
    """Poll Done (acquire) until it is up or the wait's budget is spent:
    wait_limit nanoseconds of the GPU's global timer (TIMED_WAIT), else
    wait_limit polls after the first.
    True: the flag is up and the statistics are readable. False: this
    program handed its share over (State 0 -> HANDED_OVER) and must skip
    it; the merger, which claims every share after raising the flag,
    finishes it. If the merger claimed this share first (State was
    CLAIMED), the flag is up: True."""
    seen = tl.atomic_add(Done, 0, sem="acquire", scope="gpu")
    # two loops, not one over a shared budget variable: with triton 3.6 that
    # form spills 8 bytes in bn_fwd_coop_kernel's poll-count build (sm_90)
    if TIMED_WAIT:
        deadline = clock_ns() + wait_limit
        while seen == 0:
            if clock_ns() - deadline < 0:  # before the deadline, across the timer's wrap
                seen = tl.atomic_add(Done, 0, sem="acquire", scope="gpu")
            else:
                seen = -1  # given up
    else:
        spins = wait_limit
        while seen == 0:
            if spins > 0:
                seen = tl.atomic_add(Done, 0, sem="acquire", scope="gpu")
                spins -= 1
            else:
                seen = -1  # given up
    go = seen > 0
    if seen < 0:
        go = tl.atomic_cas(State, 0, HANDED_OVER, sem="acq_rel", scope="gpu") == CLAIMED
    tl.debug_barrier()
    return go


@triton.jit
def claim_shares(State, member, GROUP: tl.constexpr, MEMBERS: tl.constexpr):
    """The merger, after raising the flag: claim every share still pending
    (0 -> CLAIMED), one atomic per member at once (MEMBERS: GROUP rounded up
    to a power of two). Returns how many were handed over (those the merger
    must finish: State == HANDED_OVER)."""
    others = tl.arange(0, MEMBERS)
    others = tl.where(others < GROUP, others, member)  # lanes past GROUP: the merger's own slot, unused
    before = tl.atomic_cas(State + others, tl.zeros_like(others), tl.full(others.shape, CLAIMED, tl.int32),
                           sem="acq_rel", scope="gpu")
    return tl.sum((before == HANDED_OVER).to(tl.int32), 0)


@triton.jit
def depart(Departed, Done, State, GROUP: tl.constexpr):
    """Count this program out of a channel block's exchange, after its last
    read or write of the block's flag and share states (a member after its
    wait, the merger after claiming and finishing shares). The last of the
    GROUP to leave (it then sees every other program's accesses) sets the
    flag, the share states and the departure counter back to zero, so the
    next launch finds them as counters.py promises."""
    tl.debug_barrier()
    if tl.atomic_add(Departed, 1, sem="acq_rel", scope="gpu") == GROUP - 1:
        for member in range(GROUP):  # a loop, not one vector store: fewer registers on the common path
            tl.store(State + member, 0)
        tl.atomic_xchg(Done, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(Departed, 0, sem="relaxed", scope="gpu")
