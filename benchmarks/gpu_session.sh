#!/usr/bin/env bash
# Every GPU check in one go, for a short loan of a GPU machine (at most 9.5 minutes: one device command):
#   1. the environment (nvidia-smi, torch, CUDA);
#   2. make bench-gpu's benchmark, --quick (the papers' speed claims; under 2 minutes);
#   3. bench_train --gpu (does the pipeline keep the GPU busy: data wait, Ray Train vs torchrun, loader CPUs);
#   4. the GPU-path tests on the GPU: every model family in bf16 / fp16 and compiled whole with inductor.
# Each step has its own time limit, and a step that fails does not stop the others. Logs and JSON go to
# $OUT (default gpu_out/); the summary is printed at the end.
#
#   OUT=gpu_out PYTHON=.venv/bin/python benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to $OUT/NAME.log, record its status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

: >"$OUT/summary.txt"
{
    nvidia-smi
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
    "$PYTHON" -c "import ray, mlflow, timm, webdataset, pyarrow; print('ray', ray.__version__, 'mlflow', mlflow.__version__, 'timm', timm.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step bench_gpu 130 "$PYTHON" -m benchmarks.bench_gpu --quick --json "$OUT/bench_gpu.json"
step bench_train_gpu 290 "$PYTHON" -m benchmarks.bench_train --gpu --json "$OUT/bench_train_gpu.json"
VITPIPE_TEST_DEVICE=cuda step gpu_tests 140 "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_precision_compile.py

for log in bench_gpu bench_train_gpu; do
    echo "--- $log (tables)"
    grep -E '^\||^[A-Za-z].*(overhead|data wait|CPUs per GPU|target)' "$OUT/$log.log" | tail -60
done
echo "--- gpu_tests"
tail -5 "$OUT/gpu_tests.log"
cat "$OUT/summary.txt"
