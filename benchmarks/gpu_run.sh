#!/usr/bin/env bash
# The one prepared GPU run (device tool): bf16 correctness on the compiled kernels, then
# the gpu benchmark suite, everything written under $OUT for benchmarks/results/.
#   run(command="bash benchmarks/gpu_run.sh", timeout_s=540)
set -uo pipefail
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    git rev-parse HEAD 2>/dev/null || echo "commit: (no git on the device; see the submitting session)"
    date -u
} > "$OUT/provenance.txt" 2>&1
# No build isolation: the device's torch must be the one fastlm builds against.
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
# fastlm-bench --suite gpu runs tests/gpu first and stops on any mismatch.
timeout 480 python3 -m fastlm.bench.cli --suite gpu --out "$OUT" 2>&1 | tee "$OUT/log.txt"
