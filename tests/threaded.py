"""Run an interpreted kernel's programs at the same time, one thread each, so
that the programs of a cooperative group really meet: a wait can end with
the flag up, a hand-over can race the merger's claim, arrivals come in any
order.

The Triton interpreter runs a launch's programs one after another through
one builder whose current program id is a plain attribute. Inside
``concurrent_programs()`` that id is per thread, each program of a launch
runs in a thread of its own, and the launch returns when all have finished
(the first program error is raised then). The interpreter's atomics execute
while holding the GIL, so they stay atomic; what the threads cannot show is
a GPU's memory reordering (tests/test_ptx_ordering.py checks the ordering).

A ``Schedule`` decides the interleaving at the protocol's atomics, which it
recognizes by operation and operand (kernels/cooperative.py):

    arrival          atomic_add(counter, 1)   first of a program's
    poll             atomic_add(Done, 0)
    raise the flag   atomic_xchg(Done, 1)
    hand over        atomic_cas(State, 0, HANDED_OVER)
    claim            atomic_cas(States, 0, CLAIMED) over the group

It orders the programs' first arrivals (``order``) and gives each program a
role for the waits it makes as a member (not the merger) of a channel block:

    "flag"   its polls wait until the merger has raised the flag: the wait
             ends with the flag up;
    "hand"   the merger raises the flag only after this member has handed
             its share over: the merger finishes it;
    "claim"  its hand-over waits until the merger has claimed the shares:
             the merger came first, the wait ends with the flag up;
    None     no gate: a seeded pause before some atomics, nothing forced.

``trace`` counts what happened (waits ending with the flag up, shares handed
over, hand-overs that found the share claimed), so a test can require that
each outcome occurred.
"""
from __future__ import annotations

import contextlib
import inspect
import random
import sys
import threading
import time
from collections import Counter, defaultdict

import triton.language as tl  # noqa: F401 -- the interpreter patches the triton.language it finds in globals
from triton._C.libtriton import ir
from triton.runtime import interpreter

HANDED_OVER, CLAIMED = 1, 2
GATE_TIMEOUT_S = 60.0


class Schedule:
    """Gates and pauses at the protocol's atomics (see above), and the trace
    of what happened; one per ``concurrent_programs`` block."""

    def __init__(self, roles=None, order=None, seed=0, pause=0.25):
        self.roles = roles or {}   # flat program index -> "flag" | "hand" | "claim" | None
        self.order = order         # flat program indices in the order of their first arrival
        self.seed, self.pause = seed, pause
        self.timeout = GATE_TIMEOUT_S  # a gate that waits longer fails its program
        self.trace = Counter()
        self._cv = threading.Condition()
        self._local = threading.local()
        self.begin_launch()

    def begin_launch(self):
        """Each launch starts its arrivals over (the counters' addresses repeat)."""
        self._turn = 0
        self._arrived = defaultdict(list)   # arrival counter -> programs that arrived there
        self._raised = set()                # flags raised
        self._claimed = set()               # flags whose block's shares the merger claimed
        self._handed = defaultdict(set)     # flag -> members that handed over
        self._at_cas = defaultdict(set)     # flag -> "claim" members waiting at their hand-over

    # ---- per program state
    def start(self, program):
        local = self._local
        local.program, local.arrivals, local.flag, local.block = program, 0, None, None
        local.counters = set()
        local.rng = random.Random(self.seed * 7919 + program)

    def _wait(self, condition, what):
        if not self._cv.wait_for(condition, self.timeout):
            raise TimeoutError(f"program {self._local.program}: {what}")

    def _jitter(self):
        if self._local.rng.random() < self.pause:
            time.sleep(self._local.rng.uniform(0, 2e-4))

    # ---- the protocol's atomics
    def classify(self, kind, address):
        """An add of 1 is an arrival, or a departure: the departure counters
        lie past the arrival counters in a cooperative kernel's flags."""
        if kind == "arrive":
            counters = self._local.counters
            if counters and address > max(counters):
                return None
            counters.add(address)
        return kind

    def before(self, kind, address):
        local, role = self._local, self.roles.get(self._local.program)
        self._jitter()
        with self._cv:
            if kind == "arrive":
                local.block = address
                if self.order is not None and local.arrivals == 0:
                    self._wait(lambda: self.order[self._turn] == local.program, "its turn to arrive")
            elif kind == "poll":
                local.flag = address
                if role == "flag":
                    self._wait(lambda: address in self._raised, "the flag")
            elif kind == "hand over" and role == "claim":
                self._at_cas[local.flag].add(local.program)
                self._cv.notify_all()
                self._wait(lambda: local.flag in self._claimed, "the claim")
            elif kind == "raise":
                local.flag = address
                others = [p for p in self._arrived[local.block] if p != local.program]
                hand = {p for p in others if self.roles.get(p) == "hand"}
                claim = {p for p in others if self.roles.get(p) == "claim"}
                self._wait(lambda: hand <= self._handed[address] and claim <= self._at_cas[address],
                           "the members that hand over")

    def after(self, kind, address, result):
        local = self._local
        with self._cv:
            if kind == "arrive":
                if self.order is not None and local.arrivals == 0:
                    self._turn += 1
                local.arrivals += 1
                self._arrived[address].append(local.program)
            elif kind == "poll" and result > 0:
                self.trace["flag up"] += 1
            elif kind == "raise":
                self._raised.add(address)
            elif kind == "hand over":
                if result == 0:
                    self._handed[local.flag].add(local.program)
                    self.trace["handed over"] += 1
                elif result == CLAIMED:
                    self.trace["claimed first"] += 1
            elif kind == "claim":
                self._claimed.add(local.flag)
            self._cv.notify_all()


def _classify_rmw(op, val):
    values = val.data.ravel()
    if values.size != 1:
        return None
    if op == ir.ATOMIC_OP.ADD:
        return {1: "arrive", 0: "poll"}.get(int(values[0]))
    if op == ir.ATOMIC_OP.XCHG and int(values[0]) == 1:
        return "raise"
    return None


def _classify_cas(val):
    values = val.data.ravel()
    if values.size == 1 and int(values[0]) == HANDED_OVER:
        return "hand over"
    if values.size and (values == CLAIMED).all():
        return "claim"
    return None


@contextlib.contextmanager
def concurrent_programs(schedule: Schedule | None = None):
    """Every interpreted launch inside runs its programs in threads at once."""
    schedule = schedule or Schedule()
    builder = interpreter.interpreter_builder
    local = threading.local()
    executor_call = interpreter.GridExecutor.__call__
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def gated(kind, ptr, atomic):
        """The atomic, with the schedule's gate before and its record after
        where it is one of the protocol's (kind not None)."""
        if kind is None:
            return atomic()
        address = int(ptr.data.ravel()[0])
        schedule.before(kind, address)
        result = atomic()
        schedule.after(kind, address, int(result.data.ravel()[0]))
        if kind == "poll" and int(result.data.ravel()[0]) == 0:
            time.sleep(0)  # a spinning program lets the others run
        return result

    def create_atomic_rmw(op, ptr, val, mask, sem, scope):
        kind = schedule.classify(_classify_rmw(op, val), int(ptr.data.ravel()[0]))
        return gated(kind, ptr, lambda: rmw(op, ptr, val, mask, sem, scope))

    def create_atomic_cas(ptr, cmp, val, sem, scope):
        return gated(_classify_cas(val), ptr, lambda: cas(ptr, cmp, val, sem, scope))

    def threaded_call(self, *args, **kwargs):
        fn = self.fn
        threads, errors = [], []

        def run(index, flat, program_args):
            local.grid_idx = index
            schedule.start(flat)
            try:
                fn(**program_args)
            except BaseException as error:  # reported by the launch
                errors.append(error)

        def program(**program_args):
            index = local.grid_idx
            nx, ny, nz = builder.grid_dim
            flat = (index[0] * ny + index[1]) * nz + index[2]
            thread = threading.Thread(target=run, args=(index, flat, program_args), daemon=True)
            threads.append(thread)
            thread.start()
            if index == (nx - 1, ny - 1, nz - 1):
                for thread in threads:
                    thread.join()
                if errors:
                    raise errors[0]

        program.__signature__ = inspect.signature(fn)
        schedule.begin_launch()
        self.fn = program
        try:
            return executor_call(self, *args, **kwargs)
        finally:
            self.fn = fn

    def get_grid_idx(self):
        return getattr(local, "grid_idx", None)

    def set_grid_idx(self, value):
        local.grid_idx = value

    switch = sys.getswitchinterval()
    original_attr = interpreter.InterpreterBuilder.__dict__.get("grid_idx")
    interpreter.InterpreterBuilder.grid_idx = property(get_grid_idx, set_grid_idx)
    interpreter.GridExecutor.__call__ = threaded_call
    builder.create_atomic_rmw, builder.create_atomic_cas = create_atomic_rmw, create_atomic_cas
    sys.setswitchinterval(1e-4)
    try:
        yield schedule
    finally:
        sys.setswitchinterval(switch)
        del builder.create_atomic_rmw, builder.create_atomic_cas
        interpreter.GridExecutor.__call__ = executor_call
        if original_attr is None:
            del interpreter.InterpreterBuilder.grid_idx
        else:
            interpreter.InterpreterBuilder.grid_idx = original_attr
