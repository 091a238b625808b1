#!/usr/bin/env bash
# Every GPU measurement of the project in one prepared run, for a GPU lent for minutes rather than hours.
#
#   bash benchmarks/gpu_session.sh tests             # the device-parametrised tests, on CUDA
#   bash benchmarks/gpu_session.sh model cost quality   # bf16 cost benchmarks on SmolLM2, then the gpu_short protocol
#   bash benchmarks/gpu_session.sh paper             # the paper's Copilot at the paper's proportions (gpu protocol)
#   PAPER_PROTOCOL=smoke PAPER_MODEL=<tiny folder> TASKS=basic_arithmetic SEEDS=0 bash benchmarks/gpu_session.sh paper
#                                                    # the same script end to end on a CPU, in minutes
#
# Results go to $OUT (default gpu_out/). The quality cells run side by side as separate processes (a 135M Pilot
# leaves one GPU mostly idle); every process stops at the deadline (QUALITY_SECONDS, default 420), and a cell cut
# short still leaves its partial.json. runs.tgz holds every cell's JSON and log; tabulate them on any machine with
#   tar xzf runs.tgz && python -m benchmarks.quality.quality --protocol gpu_short --report-only --runs runs/quality
set -u
OUT=${OUT:-gpu_out}
RUNS=${RUNS:-runs/quality}
QUALITY_SECONDS=${QUALITY_SECONDS:-420}
PAPER_SECONDS=${PAPER_SECONDS:-540}
PAPER_PROTOCOL=${PAPER_PROTOCOL:-gpu}
PAPER_MODEL=${PAPER_MODEL:-smollm2-135m}
SEEDS=${SEEDS:-0 1 2}
TASKS=${TASKS:-arc_easy piqa boolq basic_arithmetic}
VARIANTS=${VARIANTS:-rerank_ce,rerank_ce_x8,paper_x8}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT" "$RUNS"
OUT=$(realpath "$OUT")
export PYTHONUNBUFFERED=1

stage_tests() {
    python3 -m pytest -q -p no:cacheprovider tests -k cuda 2>&1 | tee "$OUT/tests.log"
}

stage_model() {  # SmolLM2 converted once, before anything is timed
    python3 -c "from hf_copilot.recipes.assets import fetch_smollm2; print(fetch_smollm2())"
}

stage_cost() {  # each benchmark measures with and without the Copilot in one process, median of 5
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/cost.md"
    timeout "${COST_SECONDS:-200}" bash -c "
        python3 -m benchmarks.cost.training_overhead --pilot smollm2 --bf16 --repeats 5 --steps 10 --warmup 2
        python3 -m benchmarks.cost.memory --pilot smollm2 --bf16 --steps 12 --seq 256 --log-rounds 4 \
            --output $OUT/memory_gpu.md
        python3 -m benchmarks.cost.generation_overhead --pilot smollm2 --device cuda --dtype bfloat16 --repeats 5 \
            --beams 1 4 --batches 1 8 --new-tokens 64" 2>&1 | tee -a "$OUT/cost.md"
}

run_cell() {  # task seed deadline: the cell, then the Copilot variants on its saved Mistake Log
    local left=$(( $3 - $(date +%s) ))
    (( left > 0 )) && timeout "$left" python3 -m benchmarks.quality.quality --protocol gpu_short --tasks "$1" --seeds "$2" \
        --runs "$RUNS" --table /dev/null || return
    left=$(( $3 - $(date +%s) ))
    (( left > 0 )) && timeout "$left" python3 -m benchmarks.quality.copilot_variants --protocol gpu_short --tasks "$1" \
        --seeds "$2" --variants "$VARIANTS" --runs "$RUNS" --table /dev/null
}

stage_quality() {
    export OMP_NUM_THREADS=1  # one process per cell: they share the CPU cores
    stage_model >/dev/null || return  # convert once, not in every cell
    local deadline=$(( $(date +%s) + QUALITY_SECONDS ))
    for seed in $SEEDS; do
        for task in $TASKS; do
            mkdir -p "$RUNS/gpu_short/$task/seed$seed"
            run_cell "$task" "$seed" "$deadline" >"$RUNS/gpu_short/$task/seed$seed/log.txt" 2>&1 &
        done
    done
    wait
    python3 -m benchmarks.quality.quality --protocol gpu_short --report-only --runs "$RUNS" --table "$OUT/quality_gpu_short.md"
    find "$RUNS/gpu_short" \( -name "*.json" -o -name "log.txt" \) -print0 | tar czf "$OUT/runs.tgz" --null -T -
}

stage_paper() {  # every (task, seed) cell of the paper protocol side by side; each resumes if run again
    export OMP_NUM_THREADS=1
    [[ "$PAPER_MODEL" == smollm2-135m ]] && { stage_model >/dev/null || return; }
    local runs=runs/paper
    for seed in $SEEDS; do
        for task in $TASKS; do
            mkdir -p "$runs/$PAPER_PROTOCOL/$task/seed$seed"
            timeout "$PAPER_SECONDS" python3 -m benchmarks.quality.paper --protocol "$PAPER_PROTOCOL" --tasks "$task" \
                --seeds "$seed" --model "$PAPER_MODEL" --runs "$runs" \
                >"$runs/$PAPER_PROTOCOL/$task/seed$seed/log.txt" 2>&1 &
        done
    done
    wait
    python3 -m benchmarks.quality.paper --protocol "$PAPER_PROTOCOL" --report-only --runs "$runs" \
        --tasks "${TASKS// /,}" --seeds "${SEEDS// /,}" | tee "$OUT/paper_$PAPER_PROTOCOL.md"
    find "$runs/$PAPER_PROTOCOL" \( -name "*.json" -o -name "log.txt" \) -print0 | tar czf "$OUT/paper_runs.tgz" --null -T -
}

for stage in "$@"; do
    echo "== $stage ($(date +%T))"
    "stage_$stage"
done
