#!/usr/bin/env bash
# One GPU, under 10 minutes: kernel benchmarks, the mae-bench presets and the loader benchmark.
# Every figure lands in bench/results/*.json (device, date, commit, command, numbers).
#   bash bench/gpu_suite.sh            # from the repository root, on a machine with one CUDA GPU
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python -c "import mae_fast.bench" 2>/dev/null || pip install -q --no-deps -e . || exit 1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true

failed=0
step() {  # run one benchmark with its own time limit; a failure is reported, the suite goes on
  local limit=$1; shift
  echo "=== $* (limit ${limit}s)"
  timeout "$limit" "$@" || { echo "!!! failed or timed out ($?): $*"; failed=$((failed + 1)); }
}

tests="tests/test_kernel_patch_embed_gather.py tests/test_kernel_unshuffle.py tests/test_kernel_masked_loss.py
       tests/test_kernels_in_model.py tests/test_attention.py tests/test_data.py"
step 150 python -m pytest -q -p no:cacheprovider $tests --junitxml=/tmp/mae-gpu-tests.xml
[ -f /tmp/mae-gpu-tests.xml ] && python -m mae_fast.bench.records gpu-tests /tmp/mae-gpu-tests.xml "pytest $(echo $tests)"
step 150 python -m pytest -q -p no:cacheprovider bench/bench_kernels.py --benchmark-disable-gc
step 120 python -m mae_fast.bench.throughput --preset vit_b16_224 --steps 10 --warmup 3
step 150 python -m mae_fast.bench.throughput --preset vit_l16_224 --steps 10 --warmup 3
step 100 python -m mae_fast.bench.throughput --preset vit_h14_224 --steps 6 --warmup 2 --variants fused,torch,official,hf
step 100 python -m mae_fast.bench.throughput --preset vit_h14_448 --steps 4 --warmup 2 --variants fused,torch,official
step 60 python -m mae_fast.bench.loader --loader all --data demo --repeat 300 --batch-size 128 --img-size 224 --steps 30
ls -l bench/results/
echo "gpu_suite: $failed step(s) failed"
exit $((failed > 0))
