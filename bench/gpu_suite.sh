#!/usr/bin/env bash
# The GPU suite: one call, at most 540 s on one H100 / H200, offline, steps in order of value, each with
# its own time limit (the limits sum to <= 540 s). Every record is written the moment it is measured, to
# bench/results/ (GPU records only) and to $MAE_RESULTS_DIR when set, so a run cut off keeps what it measured;
# the step table (name, limit, seconds, exit code) and the whole log land beside them.
#   bash bench/gpu_suite.sh              # on a machine with one CUDA GPU, from anywhere in the checkout
#   bash bench/gpu_suite.sh --dry-run    # every step at a tiny size on the CPU (< 3 min on 2 cores);
#                                        # records go to $MAE_RESULTS_DIR or a new temp folder, never bench/results/
# On a lent device machine (only $OUT comes back, at most 8 files), keep every record in one archive:
#   MAE_RESULTS_DIR=/tmp/r bash bench/gpu_suite.sh; rc=$?; tar czf "$OUT/results.tgz" -C /tmp r; exit $rc
# then unpack it into bench/results/ here. MAE_SUITE_LIMITS="25 25 190 ..." retunes the 9 step limits.
# The GPU image rehearsed on the CPU (bench/rehearse_gpu_image.sh) and its result: bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "gpu_suite.sh: error: unknown option '$1' (give --dry-run or nothing)" >&2; exit 2 ;;
esac
BUDGET=530  # step limits are cut to what is left of this; + at most KILL_AFTER s for a step that overruns
KILL_AFTER=8
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  export MAE_RESULTS_DIR="${MAE_RESULTS_DIR:-$(mktemp -d -t mae-suite-dry-XXXXXX)}"
  BUDGET=240
fi
OUTDIR="${MAE_RESULTS_DIR:-bench/results}"
mkdir -p "$OUTDIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOG="$OUTDIR/gpu-suite-$STAMP.log"
TABLE="$OUTDIR/gpu-suite-$STAMP.tsv"
exec > >(tee -a "$LOG") 2>&1
printf 'step\tlimit_s\tseconds\texit\n' > "$TABLE"
T0=$(date +%s)
failed=0

step() {  # step NAME LIMIT CMD...: run CMD under its own time limit; a failure is counted, the suite goes on
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - T0)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le 0 ]; then
    echo "--- [$name] skipped: no time left for it (limit 0 s, or the suite's ${BUDGET} s are spent)"
    printf '%s\t0\t0\tskipped\n' "$name" >> "$TABLE"
    return
  fi
  echo "=== [$name] limit ${limit} s, at $(($(date +%s) - T0)) s: $*"
  local t=$(date +%s)
  # SIGINT first: pytest then still writes its junit report (benchmarks rewrite theirs as they go); SIGKILL after
  timeout -s INT -k "$KILL_AFTER" "$limit" bash -c '"$@"' "$name" "$@"  # bash -c: CMD may be a function
  local rc=$? dt=$(($(date +%s) - t))
  if [ "$rc" != 0 ]; then
    failed=$((failed + 1))
    echo "!!! [$name] exit $rc after ${dt} s$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo ' (its time limit: what it wrote so far is kept)')"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$limit" "$dt" "$rc" >> "$TABLE"
}

install_package() {  # offline: no dependencies, no build isolation (setup.py maps the folders into mae_fast.*)
  # already importable from this checkout (not from some other copy): nothing to do
  $PY -c "import os, sys, mae_fast.bench.throughput as t
sys.exit(0 if os.path.realpath(t.__file__).startswith(os.path.realpath('.') + os.sep) else 1)" 2>/dev/null && return 0
  $PY -m pip install -q --no-deps --no-build-isolation -e .
}
bench() { $PY -m mae_fast.bench.throughput "$@"; }
export -f install_package bench
export PY DRY
TESTS="tests/test_kernel_patch_embed_gather.py tests/test_kernel_unshuffle.py tests/test_kernel_masked_loss.py
       tests/test_kernels_in_model.py tests/test_attention.py"
JUNIT="$OUTDIR/.gpu-tests-$STAMP.xml"

if [ "$DRY" = 1 ]; then  # every step, tiny, on the CPU; trace-only compile (inductor on 2 cores takes minutes)
  TINY=(--device cpu --model mae_vit_tiny_patch8 --img-size 32 --batch-size 2 --steps 1 --warmup 1
        --compile-backend aot_eager)
  L16=("${TINY[@]}" --rounds 2); H448=("${TINY[@]}" --grad-checkpointing 1 --rounds 1); PRE=(--tiny)
  TEST_MODE=(--collect-only)
  PROFILE=(--device cpu --model mae_vit_tiny_patch8 --img-size 32 --batch-size 2 --steps 1 --warmup 1)
  LOADER=(--loader pil --device cpu --data demo --batch-size 4 --img-size 32 --steps 2 --warmup 1)
  LIM=(30 25 50 35 25 30 30 20 15)
else
  # ViT-L: 3 rounds of 4 steps, the variants interleaved (each ratio with its range over the rounds);
  # ViT-H @ 448: one variant in memory at a time (--rounds 1), 5 steps each
  L16=(--preset vit_l16_224 --steps 4 --rounds 3 --warmup 3); H448=(--preset vit_h14_448 --steps 5 --rounds 1 --warmup 2)
  PRE=(--require-cuda); TEST_MODE=()
  PROFILE=(--model mae_vit_large_patch16 --batch-size 256 --steps 5 --warmup 2)
  LOADER=(--loader all --data demo --repeat 100 --batch-size 128 --img-size 224 --steps 20 --warmup 3)
  # install preflight headline kernels tests h448 l16-more profile loader: sum 530 s (+ <= 8 s on an overrun)
  LIM=(25 25 190 55 70 60 70 20 15)
fi
# the next GPU session may retune them without an edit: MAE_SUITE_LIMITS="25 25 190 55 70 60 70 20 15"
[ -n "${MAE_SUITE_LIMITS:-}" ] && read -r -a LIM <<< "$MAE_SUITE_LIMITS"
[ "${#LIM[@]}" = 9 ] || { echo "gpu_suite.sh: error: MAE_SUITE_LIMITS needs 9 numbers, got '${LIM[*]}'" >&2; exit 2; }

step install "${LIM[0]}" install_package
step preflight "${LIM[1]}" $PY -m mae_fast.bench.preflight "${PRE[@]}"
if [ "$DRY" = 0 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_suite: no CUDA device: nothing to measure (bash bench/gpu_suite.sh --dry-run runs on a CPU)"
  exit 1
fi
# 1. the headline: ViT-L/16 @ 224, batch 256: fused (compile per block) vs official-equivalent vs HF vs whole-model compile
step headline "${LIM[2]}" bench "${L16[@]}" --variants official,fused,hf,compile
# 2. kernel bandwidths at the headline shapes (Triton vs eager; torch.compile'd references are left out for time)
step kernels "${LIM[3]}" $PY -m mae_fast.bench.bench_kernels --impls eager,triton,triton_fused,triton_gemm
# 3. the CUDA-aware correctness tests, counted in a record
step tests "${LIM[4]}" $PY -m pytest -q -p no:cacheprovider -p no:xdist ${TEST_MODE[@]+"${TEST_MODE[@]}"} $TESTS --junitxml="$JUNIT"
if [ -s "$JUNIT" ]; then $PY -m mae_fast.bench.records gpu-tests "$JUNIT" "pytest $(echo $TESTS)"; rm -f "$JUNIT"; fi
# 4. ViT-H/14 @ 448, batch 32: checkpointed (the preset) and not (no_ckpt), vs official-equivalent
step h448 "${LIM[5]}" bench "${H448[@]}" --variants official,fused,no_ckpt
# 5. the rest: the other ViT-L options, the step profile, the loaders
step l16-more "${LIM[6]}" bench "${L16[@]}" --variants official,eager,torch,graphs,bf16act
if $PY -c "import mae_fast.bench.profile" 2>/dev/null; then
  step profile "${LIM[7]}" $PY -m mae_fast.bench.profile "${PROFILE[@]}"
else
  echo "--- [profile] skipped: mae_fast.bench.profile is not in this checkout"
fi
step loader "${LIM[8]}" $PY -m mae_fast.bench.loader "${LOADER[@]}"

echo "=== gpu_suite: $failed step(s) failed, $(($(date +%s) - T0)) s; records in $OUTDIR$([ "$OUTDIR" != bench/results ] && [ "$DRY" = 0 ] && echo ' and bench/results')"
column -t -s $'\t' "$TABLE" 2>/dev/null || cat "$TABLE"
find "$OUTDIR" -maxdepth 1 -name '*.json' -newermt "@$T0" | sort | sed 's/^/  /'
exit $((failed > 0))
