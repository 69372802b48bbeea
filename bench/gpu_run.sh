#!/usr/bin/env bash
# The GPU run: on a machine with an NVIDIA GPU, build rlengine with its CUDA kernels, run the
# whole test suite (the device tests then run on "cuda" too), run compute-sanitizer's memcheck
# and racecheck over every kernel, and run the benchmarks against the baselines.
#
#   bench/gpu_run.sh [STAGE ...]     STAGE: build, test, sanitize, bench (default: all, in order)
#
# Results go to $RESULTS (default: $OUT where the device tool runs this, else bench/results):
#   env.txt                      device, driver, nvcc, python, torch, triton, baseline versions
#   build.log, tests.log         the CUDA build and the test run
#   sanitize-<tool>.log          compute-sanitizer's report over bench/gpu_sanitize.py
#   gpu-<device>-<date>.{json,md} the benchmarks (bench/gpu_bench.py; extra arguments for it
#                                go in $BENCH_ARGS, e.g. "--only gae")
# Baselines that the machine lacks (liger-kernel, cut-cross-entropy, trl and what trl imports)
# are installed from wheels in ./.whl when that folder exists: `make gpu-wheels` fetches them
# on a machine with a package index. The script exits non-zero if any stage failed; later
# stages still run, so one call brings back everything there is to see.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-${OUT:-bench/results}}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test sanitize bench)
failed=()

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/rlengine-baselines .whl/*.whl || failed+=("baseline-wheels")
  export PYTHONPATH=/tmp/rlengine-baselines${PYTHONPATH:+:$PYTHONPATH}
fi
export CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$CUDACXX" --version | tail -n 2
  $PY - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("triton", "liger-kernel", "cut-cross-entropy", "trl", "transformers"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
} > "$RESULTS/env.txt" 2>&1
cat "$RESULTS/env.txt"

run_build() {
  # Only the machine's own architecture (sm_90a on Hopper): a fraction of the default build.
  local arch
  arch=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); \
print(f'{m}{n}a' if m >= 9 else f'{m}{n}')") || return 1
  RLENGINE_CUDA=ON $PY -m pip install --no-build-isolation --no-deps -e . \
    -Cbuild-dir=build/gpu -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" \
    >"$RESULTS/build.log" 2>&1 || { tail -n 60 "$RESULTS/build.log"; return 1; }
  $PY - <<'EOF'
import rlengine
from rlengine._extension import has_kernel
ops = ["token_logprobs", "token_logprobs_backward", "sequence_scores", "rrhf_rank_loss",
       "bt_loss", "gae", "discounted_returns", "entropy_segments", "segment_reduce",
       "segment_rewards_to_dense", "masked_mean", "masked_var", "masked_whiten"]
missing = [op for op in ops if not has_kernel(op, "CUDA")]
print("CUDA kernels registered for", len(ops) - len(missing), "of", len(ops), "ops")
raise SystemExit(f"no CUDA kernel for: {', '.join(missing)}" if missing else 0)
EOF
}

run_test() {
  $PY -m pytest tests -q -p no:cacheprovider -ra >"$RESULTS/tests.log" 2>&1
  local status=$?
  tail -n 25 "$RESULTS/tests.log"
  return $status
}

run_sanitize() {
  # Every tensor its own allocation, so that an access past a tensor's end is caught.
  local tool status=0
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 9 \
      --print-limit 100 $PY bench/gpu_sanitize.py >"$RESULTS/sanitize-$tool.log" 2>&1 || status=1
    echo "== compute-sanitizer $tool"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|gpu_sanitize:|Error|error" \
      "$RESULTS/sanitize-$tool.log" | head -n 40
  done
  return $status
}

run_bench() {
  # shellcheck disable=SC2086  (BENCH_ARGS is a list of arguments)
  $PY bench/gpu_bench.py --out "$RESULTS" ${BENCH_ARGS:-}
}

for stage in "${stages[@]}"; do
  echo "==== $stage"
  case "$stage" in
    build | test | sanitize | bench) "run_$stage" || failed+=("$stage") ;;
    *) echo "unknown stage: $stage (build, test, sanitize, bench)"; failed+=("$stage") ;;
  esac
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_run: FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu_run: all stages passed: ${stages[*]}"
