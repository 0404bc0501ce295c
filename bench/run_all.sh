#!/usr/bin/env bash
# Regenerate every number in BENCHMARKS.md into bench/results/ (about 6 minutes
# on 2 cores). Run it on a quiet machine: `python -m fastadam bench` prints how
# many cores other processes kept busy, and warns when that is not ~0. The runs
# whose tables BENCHMARKS.md checks against the speed targets pass --targets.
#
#   bash bench/run_all.sh            # uses `python` from PATH
#   PYTHON=.venv/bin/python bash bench/run_all.sh
#
# Runs the Python code of the checkout it lives in (PYTHONPATH) with the C library
# installed from it (`pip install .` first; or FASTADAM_C_LIBRARY=path/to/.so).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=bench/results
mkdir -p "$out"

# 1. The default sweep (2^12..2^24 float32, every backend), table + JSON + plot.
$PY -m fastadam bench --markdown --no-progress --targets \
    --json "$out/default.json" --plot "$out/default.png" | tee "$out/default.md"

# 1b. The same sizes against a roofline measured at every size (in-cache
#     ceilings), and single-threaded (the per-element compute cost).
$PY -m fastadam bench --markdown --no-progress --targets --roofline-per-size --sizes 2^12,2^16,2^18,2^20,2^22,2^24 \
    --backends numba,c,torch-fused --no-per-call --plot "$out/per-size.png" | tee "$out/per-size.md"
$PY -m fastadam bench --markdown --no-progress --roofline-per-size --threads 1 \
    --sizes 2^10,2^12,2^14,2^16 --backends numba,c --no-per-call | tee "$out/single-thread.md"

# 2. float64 at a few sizes.
$PY -m fastadam bench --markdown --no-progress --dtype float64 --sizes 2^16,2^20,2^24 \
    --no-per-call --json "$out/float64.json" | tee "$out/float64.md"

# 3. Thread scaling, 1 -> 2 threads, at 2^24 and 2^26 (the roofline is measured
#    with the same thread count, so compare GB/s across the two files).
for t in 1 2; do
    $PY -m fastadam bench --markdown --no-progress --targets --threads "$t" --sizes 2^24,2^26 \
        --backends numpy,numba,c,torch-fused --no-per-call \
        --json "$out/threads-$t.json" | tee "$out/threads-$t.md"
done

# 4. The model-shaped benchmark (FlatParams vs a list of arrays vs torch).
$PY -m pytest bench/test_bench_model.py --benchmark-only -q \
    --benchmark-columns=min,median,rounds | tee "$out/model.txt"

# 5. Start-up of the Numba backend with a warm on-disk cache.
$PY bench/first_call.py --runs 5 | tee "$out/first_call.txt"

# 6. bfloat16 optimizer states against float32 states (timed in alternating rounds).
$PY -m fastadam bench --markdown --no-progress --targets --dtype float32,bf16 --sizes 2^24,2^26 \
    --backends numba,c --no-per-call | tee "$out/bf16.md"

# 7. A whole optimizer step over GPT-2-shaped parameter lists, optimizer against optimizer.
$PY -m fastadam bench --markdown --no-progress --targets --model gpt2-mini,gpt2-small \
    --backends c,numba,torch-fused,torch-foreach | tee "$out/model-gpt2.md"
