#!/usr/bin/env bash
# One command on a GPU machine (an H100 / H200), from the checkout, nothing
# installed, in the order of what matters, under 8 minutes in all:
#   1. the CUDA tests                                   (TESTS_S)
#   2. python -m bench --host: host us per call, real launches          (HOST_S)
#   3. python -m bench.model: ResNet-50 training step, batch 32 and 256, bf16
#      channels_last; torch, tritonbn, fused, identity; eager and graphed (MODEL_S)
#   4. python -m bench --regimes: every regime of each ResNet-50 shape, batch
#      32 and 256, bf16, both layouts, beside the heuristic's pick       (REGIMES_S)
#   5. the plots                                        (PLOT_S)
#   6. python -m bench.traffic: modeled bytes, registers, spills (sm_90)  (TRAFFIC_S)
#   7. pre-tuning, batch 32 bf16 channels_last, into autotune_cache/<gpu>.json (PRETUNE_S)
#   8. the ResNet-50 step under torch.compile, if the time left allows   (COMPILE_S)
# then the answers (bench/gpu_summary.py): speed-up per regime, host us per
# call, step time against torch eager. Results land in bench/results/ named
# after the GPU (<gpu>.csv, <gpu>-host.csv, <gpu>-model.csv, <gpu>-traffic.csv,
# their .png, <gpu>-check.log). Each step runs under `timeout`: a failing or
# hung step does not stop the next ones, benchmarks append rows as they go (a
# step cut off keeps what it measured), and the script exits non-zero if any
# step failed. A step whose limit would pass TOTAL_S is skipped.
# Limits in seconds, each can be changed, e.g. MODEL_S=200 bash bench/gpu_check.sh.
# Kernel compiles per step (python -m bench.compiles, 132 SMs): model 54 variants,
# regimes 81 more, pre-tuning 104 more, at 0.1-0.9 s each on a 2-core CPU (Triton's
# disk cache keeps them across steps); the regime step's timing is most of its limit
# (about 600 timed rows at ~0.15 s each).
#
#   bash bench/gpu_check.sh --smoke
# runs every step on the CPU on tiny shapes (the interpreter; the host step
# with the stand-in driver) into bench/out/smoke/, in about two minutes: CI
# runs it, so that no step of a GPU run is executed there for the first time.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PYTHON=${PYTHON:-python}
smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1

if [ "$smoke" -eq 1 ]; then
    gpu=triton-interpreter-cpu
    sms=132
    results=bench/out/smoke
    rm -rf "$results"
else
    if ! gpu=$("$PYTHON" -c 'import re, torch; assert torch.cuda.is_available(), "no CUDA device"
print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-"))'); then
        echo "gpu_check: no CUDA device visible to torch; this script is for a GPU machine" \
             "(bash bench/gpu_check.sh --smoke runs its steps on the CPU)" >&2
        exit 2
    fi
    sms=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_properties(0).multi_processor_count)')
    results=bench/results
fi
TOTAL_S=${TOTAL_S:-480}
TESTS_S=${TESTS_S:-90}
HOST_S=${HOST_S:-30}
MODEL_S=${MODEL_S:-120}
REGIMES_S=${REGIMES_S:-150}
PLOT_S=${PLOT_S:-20}
TRAFFIC_S=${TRAFFIC_S:-60}
PRETUNE_S=${PRETUNE_S:-30}
COMPILE_S=${COMPILE_S:-120}
mkdir -p "$results"
log="$results/$gpu-check.log"
: > "$log"
failed=()
began=$(date +%s)
since=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, remember failures
    local name=$1 limit=$2 start rc
    shift 2
    if [ $(( $(date +%s) - began + limit )) -gt "$TOTAL_S" ]; then
        echo "=== $name: skipped, its ${limit}s would pass the ${TOTAL_S}s budget" | tee -a "$log"
        return
    fi
    start=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "=== $name: TIMED OUT after ${limit}s" | tee -a "$log"
        failed+=("$name (timeout)")
    elif [ "$rc" -ne 0 ]; then
        echo "=== $name: FAILED (exit $rc)" | tee -a "$log"
        failed+=("$name (exit $rc)")
    else
        echo "=== $name: ok in $(( $(date +%s) - start ))s" | tee -a "$log"
    fi
}

{
    echo "gpu_check$([ "$smoke" -eq 1 ] && echo " --smoke (CPU, tiny shapes)") on $gpu ($sms SMs), commit $(
        git rev-parse --short HEAD 2>/dev/null || echo unknown)$(
        git status --porcelain -- kernels tritonbn bench 2>/dev/null | grep -q . && echo -dirty)"
    "$PYTHON" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
"triton", triton.__version__)'
} 2>&1 | tee -a "$log"

if [ "$smoke" -eq 1 ]; then  # every step's own command, on shapes the interpreter runs in seconds
    model_args=(--layouts channels_last)
    regime_args=(--shape 4,2,64,72 --dtypes bf16 --interpreter-timings)  # the summary's timed path
    traffic_args=(--shape 32,64,14,14 --dtypes bf16 --layouts channels_last --ops forward --jobs 2)
    pretune_args=(--shape 4,2,64,72 --dtypes bf16 --layouts channels_last --dry-run)
    compile_args=(--tiny --layouts channels_last --providers compile --compile-backend aot_eager)
else
    model_args=(--batches 32 256 --dtypes bf16 --layouts channels_last --providers torch tritonbn fused
                identity --check-steps 2 --steps 10)
    regime_args=(--suite resnet50 --batches 32,256 --dtypes bf16)
    traffic_args=(--jobs 16)
    pretune_args=(--suite resnet50 --batches 32 --dtypes bf16 --layouts channels_last
                  --output "autotune_cache/$gpu.json")
    compile_args=(--batches 32 --dtypes bf16 --layouts channels_last --providers compile --no-graphs
                  --check-steps 1 --steps 10)
fi

step "cuda tests" "$TESTS_S" "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider
step "bench --host" "$HOST_S" "$PYTHON" -m bench --host --out "$results"
step "bench.model" "$MODEL_S" "$PYTHON" -m bench.model "${model_args[@]}" --no-plot --out "$results"
step "bench --regimes" "$REGIMES_S" "$PYTHON" -m bench --regimes "${regime_args[@]}" \
    --modes forward backward inference --providers tritonbn eager --no-plot --out "$results"
if ! "$PYTHON" -c 'import matplotlib' 2>/dev/null; then
    echo "=== plots: skipped, matplotlib is not installed (the CSVs are there)" | tee -a "$log"
else
    step "plots" "$PLOT_S" "$PYTHON" -c "import sys; from pathlib import Path; from bench import plot, model
for path in sys.argv[1:]:
    path = Path(path)
    if path.exists():
        print(plot.plot(path) if not path.name.endswith('-model.csv') else
              model.plot(path) or f'{path.name}: no timed rows to draw')" \
        "$results/$gpu.csv" "$results/$gpu-model.csv"
fi
step "traffic report" "$TRAFFIC_S" bash -c "'$PYTHON' -m bench.traffic --sms $sms ${traffic_args[*]} \
    --csv '$results/$gpu-traffic.csv' > '$results/$gpu-traffic.txt' && tail -n 40 '$results/$gpu-traffic.txt'"
step "pre-tuning" "$PRETUNE_S" "$PYTHON" -m tritonbn.autotune "${pretune_args[@]}"
step "bench.model compile" "$COMPILE_S" "$PYTHON" -m bench.model "${compile_args[@]}" --no-plot --out "$results"

echo "=== answers" | tee -a "$log"
"$PYTHON" -m bench.gpu_summary "$results" "$gpu" --since "$since" 2>&1 | tee -a "$log"
echo "results in $results/: $(cd "$results" && ls "$gpu"* 2>/dev/null | tr '\n' ' ')" | tee -a "$log"
echo "gpu_check: $(( $(date +%s) - began ))s in all" | tee -a "$log"
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: ${#failed[@]} step(s) failed: ${failed[*]}" | tee -a "$log"
    exit 1
fi
echo "gpu_check: all steps passed" | tee -a "$log"
