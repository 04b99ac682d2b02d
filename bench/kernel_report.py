"""Compile every kernel variant tritonbn would launch, for a GPU architecture,
on any machine (no GPU needed), and report registers and spills.

    python -m bench.kernel_report                        # reference shapes, heuristic configs, sm_90
    python -m bench.kernel_report --candidates --arch 80 # the whole autotune space, sm_80
    python -m bench.kernel_report --shape 32,64,56,56 --dtypes fp16

How: the launchers run on ``meta`` tensors with the kernels replaced by a
recorder, so the exact arguments, constexprs and warps of each launch are
captured without allocating anything; each distinct variant is compiled by
Triton's own compiler (LLVM, then ptxas, both shipped with triton) for
``cuda:<arch>``, with the specialization Triton's JIT would derive from those
arguments (divisibility by 16, ints equal to 1 folded; see specialize). GPU
configs come from the heuristic with --sms streaming multiprocessors (132: an
H100 SXM). The Triton interpreter must be off. bench/traffic.py shares the
recorder and the compile path.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from tritonbn.autotune.shapes import DTYPES, LAYOUTS, in_layout, layouts_for, select_shapes

ARCH_DTYPES = {**DTYPES, "fp64": torch.float64}


class Launch(NamedTuple):
    """One recorded launch: ``fn[grid](*args, **kwargs)``."""

    fn: object
    grid: object
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: `kernel[grid](...)` records the launch."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(Launch(self.fn, grid, args, kwargs))


def kernel_names(module) -> list[str]:
    """The @triton.jit kernels a module exposes (tritonbn.kernels): found, not
    listed, so a kernel added there is recorded too."""
    from triton.runtime.jit import KernelInterface
    return [name for name, value in vars(module).items() if isinstance(value, KernelInterface)]


@contextlib.contextmanager
def recording(log: list | None = None, wrap=_Recorder):
    """Within: every ``kernels.<name>[grid](...)`` tritonbn.launch makes goes to
    ``wrap(kernel, log)`` instead (default: recorded in ``log``, not run)."""
    from tritonbn import kernels
    log = [] if log is None else log
    originals = {name: getattr(kernels, name) for name in kernel_names(kernels)}
    for name, kernel in originals.items():
        setattr(kernels, name, wrap(kernel, log))
    try:
        yield log
    finally:
        for name, kernel in originals.items():
            setattr(kernels, name, kernel)


def bind(fn, args, kwargs) -> dict:
    """Every argument of a launch by name (positional ones bound by fn.arg_names)."""
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    return bound


# keyword arguments of a launch that are compile options, not kernel arguments
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "launch_cooperative_grid")


class _Address:
    """A tensor as the JIT's specializer sees it: a dtype and an address. The
    base allocation is taken as 16-byte aligned (the caching allocator's
    blocks are 512-byte aligned), so alignment is the storage offset's."""

    BASE = 1 << 20

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = self.BASE + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._ptr


def specialize(fn, args, kwargs) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch as Triton's JIT derives them
    from the actual arguments: pointers whose address and ints that are
    divisible by 16 get ``tt.divisibility=16``, ints equal to 1 become
    constexprs. Uses the JIT's own specializer, so the rules are the
    installed triton's (the same entry point in triton 3.6, 3.7 and 3.8)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError as error:  # pragma: no cover - a triton that moved it
        raise RuntimeError(f"triton {_triton_version()}: the JIT's specializer (native_specialize_impl) "
                           "is not where bench.kernel_report.specialize looks; update it") from error
    bound = bind(fn, args, kwargs)
    sig, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            sig[param.name], constexprs[param.name] = "constexpr", value
            continue
        stand_in = _Address(value) if isinstance(value, torch.Tensor) else value
        kind, attr = native_specialize_impl(BaseBackend, stand_in, param.is_const,
                                            not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        sig[param.name] = kind
        if kind == "constexpr":  # an int equal to 1 (or None)
            constexprs[param.name] = attr
        elif isinstance(attr, str) and attr:
            attrs[(index,)] = BaseBackend.parse_attr(attr)
    return sig, constexprs, attrs


def _triton_version() -> str:
    import triton
    return triton.__version__


def record_launches(problems) -> list[Launch]:
    """Every launch for each (op, shape, dtype, channels_last, config)."""
    from tritonbn import launch
    with recording() as log:
        for op, shape, dtype, channels_last, config in problems:
            _record_one(launch, op, shape, dtype, channels_last, config)
    return log


def _record_one(launch, op, shape, dtype, channels_last, config) -> None:
    x = in_layout(torch.empty(shape, dtype=dtype, device="meta"),
                  "channels_last" if channels_last else "contiguous")
    params = dict(device="meta", dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    C = shape[1]
    weight, bias, rm, rv = (torch.empty(C, **params) for _ in range(4))
    stats = dict(device="meta", dtype=launch.acc_dtype(dtype))
    if op == "forward":
        launch.forward_training(x, weight, bias, rm, rv, torch.empty((), dtype=torch.long, device="meta"),
                                None, 1e-5, config=config)
        launch.forward_training(x, None, None, None, None, None, 0.1, 1e-5, config=config)
    elif op == "inference":
        for keep in (True, False):  # with and without the saved statistics (no gradient needed)
            launch.forward_inference(x, weight, bias, rm, rv, 1e-5, config=config, keep_stats=keep)
    elif op in ("fused", "fused_forward", "fused_backward", "fused_inference"):
        # batch_norm_relu with and without a residual; "fused" runs every direction its config serves
        residual = torch.empty_like(x)
        nbt = torch.empty((), dtype=torch.long, device="meta")
        mean, invstd = torch.empty(C, **stats), torch.empty(C, **stats)
        y = torch.empty_like(x)
        training = config.regime != "flat"
        if op in ("fused", "fused_forward") and training:
            launch.forward_training(x, weight, bias, rm, rv, nbt, 0.1, 1e-5, config=config,
                                    residual=residual, relu=True)
            launch.forward_training(x, weight, bias, rm, rv, nbt, 0.1, 1e-5, config=config, relu=True)
        if op in ("fused", "fused_inference") and config.regime in ("split", "flat"):
            for r in (residual, None):
                launch.forward_inference(x, weight, bias, rm, rv, 1e-5, config=config, residual=r, relu=True)
        if op in ("fused", "fused_backward") and training:
            for training in (True, False):  # the mask read from y
                launch.backward(torch.empty_like(x), x, weight, mean, invstd, training, (True, True, True),
                                bias.dtype, config=config, output=y, residual_grad=True)
            for mask in ((True, True, True), (False, True, True)):  # ReLU alone: recomputed from x
                launch.backward(torch.empty_like(x), x, weight, mean, invstd, True, mask, bias.dtype,
                                config=config, relu_from_input=True, bias=bias)
    elif op == "sync":  # SyncBatchNorm's launches (tritonbn/distributed.py), two processes' stats
        from tritonbn import distributed
        from tritonbn.autotune import override
        with override(forward=config, backward=config):
            distributed.local_stats(x)
            gathered = torch.empty((3, 2, C), **stats)
            nbt = torch.empty((), dtype=torch.long, device="meta")
            for rows in (x, x[:0]):  # an empty process writes the statistics without normalizing
                distributed.forward_training_from_stats(rows, gathered, weight, bias, rm, rv, nbt, None, 1e-5)
            mean, invstd = torch.empty(C, **stats), torch.empty(C, **stats)
            distributed.backward_local_sums(torch.empty_like(x), x, mean, invstd)
            distributed.backward_input_from_means(torch.empty_like(x), x, weight, mean, invstd,
                                             torch.empty((2, C), **stats))
    else:
        mean, invstd = torch.empty(C, **stats), torch.empty(C, **stats)
        for training, mask in ((True, (True, True, True)), (False, (True, False, False)),
                               (False, (False, True, True))):
            launch.backward(torch.empty_like(x), x, weight, mean, invstd, training, mask, bias.dtype,
                            config=config)


class Variant(NamedTuple):
    """One kernel as Triton compiles it: a launch's specialized signature."""

    fn: object
    sig: dict
    constexprs: dict
    attrs: dict
    options: dict  # num_warps, num_stages, ... as the launch gave them

    @property
    def num_warps(self) -> int:
        return self.options.get("num_warps", 4)

    @property
    def key(self) -> tuple:
        return (self.fn.__name__, tuple(sorted(self.sig.items())),
                tuple(sorted((k, str(v)) for k, v in self.constexprs.items())),
                tuple(sorted(self.attrs)), tuple(sorted(self.options.items())))

    @classmethod
    def of(cls, launch: Launch) -> "Variant":
        sig, constexprs, attrs = specialize(launch.fn, launch.args, launch.kwargs)
        options = {k: v for k, v in launch.kwargs.items() if k in LAUNCH_OPTIONS}
        return cls(launch.fn, sig, constexprs, attrs, options)


def compile_variant(variant: Variant, arch: int) -> dict:
    """Compile one variant for sm_<arch>: ok, error, registers, spill_bytes,
    shared (bytes), and the global loads / stores of the PTX (global_accesses)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = dict(ok=False, error="", registers=None, spill_bytes=None, shared=None, accesses=[])
    try:
        if "attrs" not in inspect.signature(ASTSource).parameters:
            raise RuntimeError(f"triton {triton.__version__}'s ASTSource takes no attrs: "
                               "bench.kernel_report.compile_variant cannot pass the launch's specialization")
        source = ASTSource(variant.fn, variant.sig, variant.constexprs, variant.attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options=dict(variant.options))
        ptx = compiled.asm["ptx"]
        out.update(ok=True, shared=compiled.metadata.shared, accesses=global_accesses(ptx, pointer_params(variant.sig)),
                   **_ptxas_usage(ptx, arch))
    except Exception as error:  # report, do not stop: the table is the point
        out["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
    return out


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)\s[^\[]*\[\s*(%\w+)")
_PARAM = re.compile(r"\[\s*(\w+_param_(\d+))\s*\]")
_REGISTER = re.compile(r"%\w+")


def global_accesses(ptx: str, pointers: dict[int, str]) -> list[tuple[str, str, int]]:
    """(ld | st, pointer, bytes) of each global load / store instruction of
    the PTX. ``pointers``: PTX parameter index -> name, for the kernel's
    pointer arguments (pointer_params). The pointer of an access is found by
    data flow: the pointer parameters its address register derives from
    ("?" unless exactly one). Bytes = vector length x element width
    (``ld.global.v4.b32`` = 16). Not .loc line info: LLVM moves loads away
    from their source line (triton 3.8 does)."""
    sources = _definitions(ptx)
    found = []
    for line in ptx.splitlines():
        access = _ACCESS.search(line)
        if access:
            names = {pointers[i] for i in _params_reached(access.group(3), sources) if i in pointers}
            found.append((access.group(1), names.pop() if len(names) == 1 else "?",
                          _access_bytes(access.group(2))))
    return found


def pointer_params(sig: dict) -> dict[int, str]:
    """PTX parameter index -> name of each pointer argument: Triton passes the
    non-constexpr arguments in order (then scratch pointers of its own)."""
    runtime = [name for name, kind in sig.items() if kind != "constexpr"]
    return {i: name for i, name in enumerate(runtime) if sig[name].startswith("*")}


def _definitions(ptx: str) -> dict[str, set]:
    """register -> the registers and parameter indices its definitions read."""
    sources: dict[str, set] = {}
    for line in ptx.splitlines():
        body = line.split("//")[0].strip().rstrip(";")
        if not body or body.startswith((".", "$", "}", "{")) or body.endswith(":"):
            continue
        body = re.sub(r"^@!?%\w+\s+", "", body)
        opcode, _, operands = body.partition(" ")
        if opcode.startswith(("st.", "bar", "bra", "ret", "@")) or not operands:
            continue
        if operands.lstrip().startswith("{"):  # vector destination
            dest_text, _, rest = operands.partition("}")
        else:
            dest_text, _, rest = operands.partition(",")
        read = set(_REGISTER.findall(rest)) | {int(m[1]) for m in _PARAM.findall(rest)}
        for dest in _REGISTER.findall(dest_text):
            sources.setdefault(dest, set()).update(read)
    return sources


def _params_reached(register: str, sources: dict[str, set]) -> set[int]:
    seen, todo, params = {register}, [register], set()
    while todo:
        for source in sources.get(todo.pop(), ()):
            if isinstance(source, int):
                params.add(source)
            elif source not in seen:
                seen.add(source)
                todo.append(source)
    return params


def _access_bytes(suffixes: str) -> int:
    vector, bits = 1, 0
    for part in suffixes.split(".")[1:]:
        if re.fullmatch(r"v\d+", part):
            vector = int(part[1:])
        elif re.fullmatch(r"[bufs]\d+", part):
            bits = int(part[1:])
    return vector * bits // 8


def compile_variants(log, arch: int) -> list[dict]:
    """Compile each distinct recorded variant, with the specialization its
    launch gets; one row per variant (variant_row, then the compile results)."""
    variants = {}
    for launch in log:
        variant = Variant.of(launch)
        variants.setdefault(variant.key, variant)
    rows = []
    for variant in progress_bar(variants.values(), f"compiling for sm_{arch}"):
        result = compile_variant(variant, arch)
        del result["accesses"]  # bench.traffic reads them, per tensor
        rows.append(dict(variant_row(variant), **result))
    return rows


# the columns of variant_row: together they tell any two distinct variants apart
ROW_KEY = ["kernel", "dtype", "acc", "layout", "int64", "blocks", "warps", "flags", "consts", "pointers",
           "scalars", "eq1", "not_div16"]
_SHOWN = {"BLOCK_N", "BLOCK_C", "BLOCK_S", "BLOCK_R", "BLOCK_F", "CHANNEL_INNER", "INT64", "ACC_DTYPE"}


def tile_text(values: dict) -> str:
    """A launch's tile: BLOCK_N x BLOCK_C x BLOCK_S, or the flat inference
    kernel's BLOCK_R x BLOCK_F (rows by contiguous values); "-" where absent."""
    names = ("BLOCK_R", "BLOCK_F") if "BLOCK_F" in values else ("BLOCK_N", "BLOCK_C", "BLOCK_S")
    return "x".join(str(values.get(k, "-")) for k in names)


def variant_row(variant: Variant) -> dict:
    """A variant as table columns (ROW_KEY): everything its key holds. flags: the
    constexpr flags that are on; consts: the other constexprs and launch
    options; pointers: the dtype of every pointer; scalars: runtime scalars
    that are neither i32 nor fp32; eq1: ints equal to 1 (folded by the JIT);
    not_div16: pointers (by address) and ints the JIT did not find divisible
    by 16."""
    constexprs, sig = variant.constexprs, variant.sig
    declared = {p.name for p in variant.fn.params if p.is_constexpr}
    # the merge and reduce kernels read partials only: no x, no N / S blocks, no layout
    # (and the reduce kernel's accumulation dtype is its partials' own)
    blocks = tile_text(constexprs)
    layout = {True: "channel_inner", False: "channel_strided"}.get(constexprs.get("CHANNEL_INNER"), "-")
    consts = [f"{k}={v}" for k, v in constexprs.items()
              if k in declared and k not in _SHOWN and not isinstance(v, bool)]
    consts += [f"{k}={v}" for k, v in variant.options.items() if k != "num_warps"]
    runtime = [(index, name, kind) for index, (name, kind) in enumerate(sig.items()) if name not in declared]
    return dict(
        kernel=variant.fn.__name__, dtype=sig.get("X", sig.get("Partials", "?")).lstrip("*"),
        acc=str(constexprs.get("ACC_DTYPE", sig.get("Partials", "-").lstrip("*"))), layout=layout,
        int64=constexprs.get("INT64", False), blocks=blocks, warps=variant.num_warps,
        flags=",".join(k for k, v in constexprs.items() if v is True and k not in _SHOWN),
        consts=" ".join(consts),
        pointers=_grouped((kind.lstrip("*"), name) for _, name, kind in runtime if kind.startswith("*")),
        scalars=_grouped((kind, name) for _, name, kind in runtime
                         if kind not in ("i32", "fp32", "constexpr") and not kind.startswith("*")),
        eq1=" ".join(name if constexprs[name] == 1 else f"{name}={constexprs[name]}"
                     for _, name, kind in runtime if kind == "constexpr"),
        not_div16=" ".join(name for index, name, kind in runtime  # floats are never specialized
                           if kind != "constexpr" and not kind.startswith("fp")
                           and (index,) not in variant.attrs))


def _grouped(pairs) -> str:
    """"fp16: X Y; fp32: Weight Bias" from (dtype, name) pairs, in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for kind, name in pairs:
        groups.setdefault(kind, []).append(name)
    return "; ".join(f"{kind}: {' '.join(names)}" for kind, names in groups.items())


def progress_bar(items, description: str, total: int | None = None):
    """A tqdm bar on stderr over compiled variants (tqdm: the bench extra;
    imported here so that importing this module for its recorder needs none)."""
    try:
        from tqdm import tqdm
    except ImportError as error:
        raise SystemExit('the bench commands need tqdm: pip install -e ".[bench]"') from error
    return tqdm(items, desc=description, total=total, unit="variant")


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes per thread, from ptxas -v (shipped with triton)."""
    import triton
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as folder:
        src = Path(folder) / "k.ptx"
        src.write_text(ptx)
        result = subprocess.run([str(ptxas), "-v", "--gpu-name", gpu_name, str(src), "-o",
                                 str(Path(folder) / "k.cubin")], capture_output=True, text=True)
    out = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return dict(registers=int(registers.group(1)) if registers else None,
                spill_bytes=int(spills.group(1)) if spills else None)


def problems_for(shapes, dtypes, layouts, ops, sms: int, with_candidates: bool):
    """(op, shape, dtype, channels_last, config) for the heuristic's GPU config
    (and, with_candidates, the whole tuning space) of each problem."""
    from tritonbn import views
    from tritonbn.autotune import Problem, candidates, config, heuristic
    config._sm_count = lambda *args: sms  # what the heuristic would see on that GPU
    config._warp_size = lambda *args: 32
    out = []
    for shape in shapes:
        for dtype in dtypes:
            for layout in layouts_for(shape, layouts):
                x = in_layout(torch.empty(shape, dtype=dtype, device="meta"), layout)
                _, view, _ = views.canonical(x)
                for op in ops:
                    # the fused epilogue launches with each direction's own config
                    fused = ("fused_forward", "fused_backward", "fused_inference")
                    for launched in (fused if op == "fused" else (op,)):
                        tuned_op = launched.removeprefix("fused_")
                        problem = Problem(tuned_op, view.N, view.C, view.S, view.channel_inner, dtype,
                                          torch.device("cuda", 0))
                        configs = candidates(problem) if with_candidates else [heuristic(problem)]
                        out += [(launched, shape, dtype, layout == "channels_last", c) for c in configs]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90 (default 90)")
    parser.add_argument("--sms", type=int, default=132, help="SM count the heuristic assumes (default 132)")
    parser.add_argument("--suite", nargs="+", default=["resnet50", "mlp", "video"])
    parser.add_argument("--shape", action="append", help="an explicit shape, e.g. 32,64,56,56 (repeatable)")
    parser.add_argument("--dtypes", nargs="+", choices=list(ARCH_DTYPES), default=["fp32", "fp16", "bf16"])
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--ops", nargs="+", choices=["forward", "backward", "inference", "fused"],
                        default=["forward", "backward", "inference"],
                        help="fused: batch_norm_relu with and without a residual, forward and backward")
    parser.add_argument("--candidates", action="store_true",
                        help="every autotune candidate, not only the heuristic's choice")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the report compiles the kernels", file=sys.stderr)
        return 2
    import pandas as pd
    shapes = select_shapes(args.shape, args.suite)
    problems = problems_for(shapes, [ARCH_DTYPES[d] for d in args.dtypes], args.layouts, args.ops, args.sms,
                            args.candidates)
    rows = compile_variants(record_launches(problems), args.arch)
    table = pd.DataFrame(rows).sort_values(ROW_KEY)
    print(table.to_string(index=False))
    failed, spilled = (~table.ok).sum(), (table.spill_bytes.fillna(0) > 0).sum()
    print(f"{len(table)} variants for sm_{args.arch}: {failed} failed to compile, {spilled} spill registers")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
