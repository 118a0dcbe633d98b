#!/usr/bin/env bash
# Every GPU check in one go, for a short loan of a GPU machine (at most 9.5 minutes: one 10-minute command):
#   1. the environment (nvidia-smi, torch, CUDA, the packages the steps need);
#   2. make bench-gpu's benchmark, --quick (the papers' speed claims);
#   3. bench_train --gpu (does the pipeline keep the GPU busy: data wait, Ray Train vs torchrun, loader CPUs);
#      without Ray or MLflow installed, bench_train --gpu --loader-only (the data plane alone) instead;
#   4. the GPU-path tests on the GPU: every model family's training step compiled whole with inductor, bf16.
# Each step has its own time limit, and a step that fails does not stop the others. Logs and JSON go to
# $OUT (default gpu_out/); the summary is printed at the end.
#
#   OUT=gpu_out PYTHON=.venv/bin/python benchmarks/gpu_session.sh
#
# Wheels for packages the machine lacks, in .whl/ (one version of each), are installed first into a scratch
# site (--no-index: such a machine may have no network). Steps 2 and 4 need torch, timm, pyyaml only; step 3
# needs the whole pipeline (ray, mlflow, webdataset, pyarrow).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to $OUT/NAME.log, record its status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

: >"$OUT/summary.txt"
{
    nvidia-smi
    df -h /dev/shm /tmp
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
    for module in timm yaml ray mlflow webdataset pyarrow pynvml; do
        "$PYTHON" -c "import $module; print('$module', getattr($module, '__version__', 'present'))" 2>/dev/null \
            || echo "$module: missing"
    done
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step bench_gpu 125 "$PYTHON" -m benchmarks.bench_gpu --quick --json "$OUT/bench_gpu.json"
if "$PYTHON" -c "import ray.train, mlflow, webdataset, pyarrow" 2>/dev/null; then
    step bench_train_gpu 300 "$PYTHON" -m benchmarks.bench_train --gpu --json "$OUT/bench_train_gpu.json" --logs "$OUT"
else
    echo "bench_train_gpu: ray, mlflow or webdataset missing: the loader alone instead" | tee -a "$OUT/summary.txt"
    step bench_train_gpu 120 "$PYTHON" -m benchmarks.bench_train --gpu --loader-only --json "$OUT/bench_train_gpu.json"
fi
VITPIPE_TEST_DEVICE=cuda step gpu_tests 130 "$PYTHON" -m pytest -q -p no:cacheprovider --timeout 60 \
    tests/test_precision_compile.py -k test_training_step_and_inference_compile_without_graph_breaks

for log in bench_gpu bench_train_gpu; do
    echo "--- $log (tables)"
    grep -E '^\||(overhead|data wait|CPUs per GPU|target)' "$OUT/$log.log" | tail -60
done
echo "--- gpu_tests"
tail -5 "$OUT/gpu_tests.log"
cat "$OUT/summary.txt"
