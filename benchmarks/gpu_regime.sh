#!/usr/bin/env bash
# The regime map's GPU edition (benchmarks/quality/regime.py, edition "gpu"): one prepared run of at most 10 minutes
# on a machine with torch and transformers (plus accelerate, which Trainer needs), no network, no datasets, no
# weights to fetch. Every cell runs as its own process, side by side (these Pilots leave one GPU mostly idle), and
# stops at the deadline; a cell cut short keeps the stages it finished. Cells, table and figure go to $OUT.
#
#   bash benchmarks/gpu_regime.sh                                   # on the GPU machine (OUT defaults to gpu_out)
#   EDITION=smoke OUT=/tmp/regime_smoke bash benchmarks/gpu_regime.sh   # the same run end to end on a CPU
#
# Without accelerate installed there, put its wheel in runs/wheels/ (pip download accelerate --no-deps -d
# runs/wheels) and carry that folder: a pure-Python wheel imports straight from the zip.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-gpu_out}
EDITION=${EDITION:-gpu}
DEADLINE=${REGIME_SECONDS:-540}
RUNS=${RUNS:-runs/regime_$EDITION}
export PYTHONUNBUFFERED=1
if ! python3 -c "import accelerate" 2>/dev/null; then
    WHEEL=$(ls runs/wheels/accelerate-*.whl 2>/dev/null | head -1)
    if [ -z "$WHEEL" ]; then
        echo "accelerate is missing (transformers.Trainer needs it) and runs/wheels/ has no accelerate wheel." >&2
        exit 2
    fi
    export PYTHONPATH="$PWD/$WHEEL${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$OUT/logs"
mapfile -t CELLS < <(python3 -m benchmarks.quality.regime --edition "$EDITION" --list 2>"$OUT/logs/list.log")
if [ "${#CELLS[@]}" -eq 0 ]; then
    echo "No cell to run: listing the $EDITION grid failed (see $OUT/logs/list.log)." >&2
    exit 2
fi
for cell in "${CELLS[@]}"; do
    name=$(echo "$cell" | tr -d ' -')
    timeout "$DEADLINE" python3 -m benchmarks.quality.regime --edition "$EDITION" $cell --threads 1 --no-report \
        --runs "$RUNS" --out "$OUT" > "$OUT/logs/$name.log" 2>&1 &
done
wait
python3 -m benchmarks.quality.regime --edition "$EDITION" --report-only --out "$OUT" | tee "$OUT/report.log"
