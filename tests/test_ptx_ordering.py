"""The cooperative protocol's memory ordering, checked in the PTX that every
cooperative kernel variant compiles to for sm_90 (docs/design.md: the
cooperative protocol). The interpreter runs programs one after another and
cannot show an ordering bug; the compiled code can be read:

- every atomic is at gpu scope, and each kernel that exchanges has its
  acq_rel arrivals, its release flag and acquire polls (a kernel that waits
  for nothing, the eval-mode backward, has no flag);
- every global load of what another program of the launch writes -- the
  partials, the merged statistics or totals, the flags and share states --
  is a ``.cg`` load (L2, never a stale L1 line) or an acquire at gpu scope;
- no ``bar.sync`` is predicated, and no branch whose condition depends on
  the thread skips one (a barrier some threads of a program never reach);
- every variant is launched as a cooperative grid, and a wait's budget is
  read from the global timer.

Compiled in a subprocess with the interpreter off (Triton's own compiler;
no GPU). The checker is also run on PTX mutated to break each rule."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.kernel_report import _definitions, _params_reached  # noqa: E402

# what other programs of the launch write, per cooperative kernel
SHARED = {"bn_fwd_coop_kernel": {"SaveMean", "SaveInvstd", "Partials", "Flags"},
          "bn_bwd_coop_kernel": {"Partials", "Totals", "Flags"}}

SCRIPT = """
import json, torch
from tritonbn.autotune import LaunchConfig
from bench.kernel_report import Variant, pointer_params, record_launches
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
problems = []
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    for shape, channels_last in (((4, 8, 6, 6), False), ((4, 8, 6, 6), True), ((64, 24), False)):
        c = (LaunchConfig("cooperative", 32, 2, 1, split_n=2, num_warps=4) if len(shape) == 2 else
             LaunchConfig("cooperative", 2, 2, 32, split_n=2, split_s=2, num_warps=4))
        problems += [(op, shape, dtype, channels_last, c) for op in ("forward", "backward")]
        if len(shape) == 4:
            problems.append(("fused", shape, dtype, channels_last, c))
found = {}
for launch in record_launches(problems):
    v = Variant.of(launch)
    if "coop" in v.fn.__name__ and v.key not in found:
        src = ASTSource(v.fn, v.sig, v.constexprs, v.attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(v.options)).asm["ptx"]
        flags = {k: v for k, v in v.constexprs.items() if isinstance(v, bool)}
        found[v.key] = dict(kernel=v.fn.__name__, pointers=pointer_params(v.sig), flags=flags, ptx=ptx,
                            phase=v.constexprs.get("PHASE"), options=dict(v.options),
                            timed=v.constexprs.get("TIMED_WAIT"))
print(json.dumps(list(found.values()), default=str))
"""


@pytest.fixture(scope="module")
def variants():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    for v in found:
        v["pointers"] = {int(i): name for i, name in v["pointers"].items()}
    return found


_INSTRUCTION = re.compile(r"^\s*(@!?%\w+\s+)?([a-z][\w.:]*)\s*(.*?);?\s*(//.*)?$")


def _instructions(ptx: str):
    """(line index, predicate or '', opcode, operands) of each instruction."""
    for index, line in enumerate(ptx.splitlines()):
        m = _INSTRUCTION.match(line)
        if m and not line.strip().startswith((".", "//")):
            yield index, (m.group(1) or "").strip(), m.group(2), m.group(3)


def _thread_dependent(register: str, sources: dict) -> bool:
    seen, todo = {register}, [register]
    while todo:
        for source in sources.get(todo.pop(), ()):
            if source == "%tid":
                return True
            if isinstance(source, str) and source not in seen:
                seen.add(source)
                todo.append(source)
    return False


def ordering_violations(ptx: str, pointers: dict[int, str], shared: set[str], exchange: str) -> list[str]:
    """What breaks the protocol's ordering in one kernel's PTX (empty: nothing).
    exchange: "flag" (programs wait for the merger's flag), "arrive" (the last
    to arrive sums, nobody waits) or "none"."""
    sources = _definitions(ptx)
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$\w+):", line.strip()))}
    barriers = [i for i, line in enumerate(lines) if "bar.sync" in line and not line.strip().startswith("//")]
    found, semantics = [], set()
    for index, predicate, opcode, operands in _instructions(ptx):
        if opcode.startswith(("atom.", "red.")):
            if "gpu" not in opcode.split("."):
                found.append(f"line {index}: {opcode} is not at gpu scope")
            if ".add" in opcode and ".acq_rel" not in opcode:  # arrivals and departures
                found.append(f"line {index}: {opcode}: an arrival that is not acq_rel")
            semantics |= {s for s in ("acq_rel", "acquire", "release", "relaxed") if f".{s}" in opcode}
        if opcode.startswith("ld.global"):
            address = re.search(r"\[\s*(%\w+)", operands)
            reached = {pointers.get(i) for i in _params_reached(address.group(1), sources)} if address else set()
            if reached & shared and ".cg" not in opcode and not (".acquire" in opcode and ".gpu" in opcode):
                found.append(f"line {index}: {opcode} reads {sorted(reached & shared)} without .cg or acquire")
            if ".acquire" in opcode:
                semantics.add("acquire")
        if opcode.startswith("bar.sync") and predicate:
            found.append(f"line {index}: predicated {opcode}")
        if opcode.startswith("bra") and predicate:
            register = predicate.lstrip("@!")
            target = labels.get(operands.strip().split()[0].rstrip(";"))
            if target is not None and _thread_dependent(register, sources):
                low, high = sorted((index, target))
                skipped = [b for b in barriers if low < b < high]
                if skipped:
                    found.append(f"line {index}: a thread-dependent branch passes bar.sync at {skipped}")
    needed = {"flag": {"acq_rel", "acquire", "release"}, "arrive": {"acq_rel"}, "none": set()}[exchange]
    if not needed <= semantics:
        found.append(f"atomics {sorted(semantics)}: missing {sorted(needed - semantics)}")
    return found


def _exchange(variant) -> str:
    """How the kernel's programs meet: the forward and the training backward
    wait for the merger's flag; the eval-mode backward waits for nothing, and
    without parameter gradients does not even arrive."""
    flags = variant["flags"]
    if variant["kernel"] == "bn_fwd_coop_kernel" or flags.get("TRAINING", True):
        return "flag"
    return "arrive" if flags.get("STORE_DWEIGHT") or flags.get("STORE_DBIAS") else "none"


def test_every_cooperative_variant_keeps_the_protocols_ordering(variants):
    names = {v["kernel"] for v in variants}
    assert names == set(SHARED), names
    assert len(variants) >= 20, len(variants)
    assert {v["phase"] for v in variants} == {0}  # the GPU's single-launch form
    assert {_exchange(v) for v in variants} == {"flag", "arrive", "none"}  # the eval backward's two forms
    for v in variants:
        problems = ordering_violations(v["ptx"], v["pointers"], SHARED[v["kernel"]], _exchange(v))
        assert problems == [], (v["kernel"], v["flags"], problems[:5])
        assert ("ld.global.cg" in v["ptx"]) == (_exchange(v) != "none")  # it reads what others wrote
        assert v["options"].get("launch_cooperative_grid") is True, v["options"]
        # a timed wait where one waits (polls on triton 3.6: tritonbn/plans.py, cooperative_launch)
        assert v["timed"] is (tuple(map(int, triton.__version__.split(".")[:2])) >= (3, 7)), v["timed"]
        assert ("%globaltimer_lo" in v["ptx"]) == (_exchange(v) == "flag" and v["timed"])


@pytest.mark.parametrize("mutation", ["plain partial load", "relaxed arrival", "cta-scope flag",
                                      "predicated barrier", "no release"])
def test_the_checker_finds_each_broken_rule(variants, mutation):
    v = next(v for v in variants if v["kernel"] == "bn_fwd_coop_kernel")
    ptx = v["ptx"]
    assert ordering_violations(ptx, v["pointers"], SHARED[v["kernel"]], "flag") == []
    if mutation == "plain partial load":
        ptx = ptx.replace("ld.global.cg.", "ld.global.", 1)
    elif mutation == "relaxed arrival":
        ptx = ptx.replace("atom.global.gpu.acq_rel.add", "atom.global.gpu.relaxed.add")
    elif mutation == "cta-scope flag":
        ptx = ptx.replace("atom.global.gpu.release.exch", "atom.global.cta.release.exch", 1)
    elif mutation == "predicated barrier":
        ptx = re.sub(r"\n(\s*)bar\.sync", r"\n\1@%p1 bar.sync", ptx, count=1)
    else:
        ptx = ptx.replace("atom.global.gpu.release.exch", "atom.global.gpu.relaxed.exch")
    assert ordering_violations(ptx, v["pointers"], SHARED[v["kernel"]], "flag") != []
