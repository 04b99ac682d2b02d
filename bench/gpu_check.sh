#!/usr/bin/env bash
# One command on a GPU machine (an H100 / H200), from the checkout, nothing
# installed: the CUDA tests, the benchmark against eager and torch.compile,
# and the traffic report, in under 8 minutes. Results land in bench/results/
# named after the GPU:
#   <gpu>-host.csv           python -m bench --host (per-call host time against torch)
#   <gpu>.csv, <gpu>.png     python -m bench --quick (rows appended per run)
#   <gpu>-traffic.csv/.txt   python -m bench.traffic (modeled bytes, sm_90 compile)
#   <gpu>-check.log          everything this script printed
# Each step runs under `timeout`; a failing or hung step does not stop the
# next ones, and the script exits non-zero if any step failed.
# Time limits in seconds (default 130 + 30 + 180 + 30 + 90 = 7.7 min), each can be changed:
#   TESTS_S=130 HOST_S=30 BENCH_S=180 PLOT_S=30 TRAFFIC_S=90 bash bench/gpu_check.sh
# The bench appends rows as it goes: cut off by its limit, it still leaves the rows it measured.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PYTHON=${PYTHON:-python}
TESTS_S=${TESTS_S:-130}
HOST_S=${HOST_S:-30}
BENCH_S=${BENCH_S:-180}
PLOT_S=${PLOT_S:-30}
TRAFFIC_S=${TRAFFIC_S:-90}

if ! gpu=$("$PYTHON" -c 'import re, torch; assert torch.cuda.is_available(), "no CUDA device"
print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-"))'); then
    echo "gpu_check: no CUDA device visible to torch; this script is for a GPU machine" >&2
    exit 2
fi
sms=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_properties(0).multi_processor_count)')
results=bench/results
mkdir -p "$results"
log="$results/$gpu-check.log"
: > "$log"
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, remember failures
    local name=$1 limit=$2 start rc
    shift 2
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
    echo "gpu_check on $gpu ($sms SMs), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(
        git status --porcelain -- kernels tritonbn bench 2>/dev/null | grep -q . && echo -dirty)"
    "$PYTHON" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
"triton", triton.__version__)'
} 2>&1 | tee -a "$log"

step "cuda tests" "$TESTS_S" "$PYTHON" -m pytest -m cuda -q
step "bench --host" "$HOST_S" "$PYTHON" -m bench --host --out "$results"
# the bench appends rows to $results/$gpu.csv as it goes, so a timeout keeps what was measured
step "bench --quick" "$BENCH_S" "$PYTHON" -m bench --quick --no-plot --out "$results"
if [ ! -f "$results/$gpu.csv" ]; then
    echo "=== plot: skipped, the bench wrote no $results/$gpu.csv" | tee -a "$log"
elif ! "$PYTHON" -c 'import matplotlib' 2>/dev/null; then
    echo "=== plot: skipped, matplotlib is not installed (the CSV is there)" | tee -a "$log"
else
    step "plot" "$PLOT_S" "$PYTHON" -m bench.plot "$results/$gpu.csv"
fi
step "traffic report" "$TRAFFIC_S" bash -c "'$PYTHON' -m bench.traffic --sms $sms --jobs 8 \
    --csv '$results/$gpu-traffic.csv' > '$results/$gpu-traffic.txt' && tail -n 40 '$results/$gpu-traffic.txt'"

echo "results in $results/: $(cd "$results" && ls "$gpu"* 2>/dev/null | tr '\n' ' ')" | tee -a "$log"
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: ${#failed[@]} step(s) failed: ${failed[*]}" | tee -a "$log"
    exit 1
fi
echo "gpu_check: all steps passed" | tee -a "$log"
