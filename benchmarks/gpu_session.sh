#!/usr/bin/env bash
# The one prepared run of a session that is lent the H200 (device tool), most valuable first:
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=590)
# Each step has its own time limit, cut to what is left of BUDGET seconds (default 560, under the
# call's limit) less a reserve for packing, so a slow step cannot starve the rest or the results. Everything is written
# under a work folder and packed into $OUT/session.tar.gz (the device returns at most 8 files),
# with $OUT/summary.txt (each step's exit status and time) beside it. Unpack it into
# benchmarks/results/DATE-h200/ and commit it with the provenance it carries.
set -uo pipefail
OUT=${OUT:-benchmarks/out/gpu-session}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

BUDGET=${BUDGET:-560}
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $WORK/NAME.log, record status and time
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS - 20))
    if ((left < limit)); then limit=$left; fi
    if ((limit <= 0)); then
        echo "$name: skipped, no time left" | tee -a "$SUMMARY"
        return
    fi
    local start=$SECONDS
    timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$SUMMARY"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    git rev-parse HEAD 2>/dev/null || echo "commit: (no git on the device; see the submitting session)"
    date -u
} > "$WORK/provenance.txt" 2>&1
cp "$WORK/provenance.txt" "$OUT/"

# No build isolation: fastlm builds against the device's torch.
step install 120 python3 -m pip install -q --no-deps --no-build-isolation -e .
# 1. Correctness of every GPU kernel, all failures listed (the CUDA optimizer extension builds here);
#    -v prints each result as it comes, so a run cut by its limit still says what passed.
step tests_gpu 240 python3 -m pytest tests/gpu -v -rf
# 2. Attention against SDPA (bf16, causal, head dim 128): issue #3's forward and backward targets.
step attention 90 python3 benchmarks/gpu_attention_quick.py "$WORK/attention.jsonl"
# 3. The suite's attention, end-to-end and optimizer cases (issues #3, #5, #6, #8). When step 1 failed,
#    the suite's own correctness pass of these ops decides (and stops it if one of theirs fails).
tests_passed=()
grep -q "^tests_gpu: exit 0 " "$SUMMARY" && tests_passed=(--gpu-tests-passed)
step bench 300 python3 -m fastlm.bench.cli --suite gpu --ops attention,train,hf,optim --out "$WORK/bench" \
    "${tests_passed[@]}"
# 4. With what is left: the dK/dV tile candidates (head dim 128 first), deterministic and with atomic dQ,
#    each checked against SDPA.
step tiles 600 python3 benchmarks/attention_tile_sweep.py time "$WORK/tiles.jsonl" \
    benchmarks/results/attention-tiles-sm90.jsonl bwd_dkdv,bwd_dkdv_dq

tar -czf "$OUT/session.tar.gz" -C "$WORK" .
echo "packed: $(du -h "$OUT/session.tar.gz" | cut -f1)" >> "$SUMMARY"
