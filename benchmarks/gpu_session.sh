#!/bin/bash
# Every GPU check and figure that docs/benchmarks.md and docs/results.md still lack, in one call that fits a
# 10-minute slot: the CUDA tests, one run against a stack of one, stacked throughput, ME over 16 seeds with TF32
# off (stacked), and the SCAN table at three seeds with every ablation. Each step has its own time limit and
# writes its log and its small results (eval reports, metrics logs, tables; never checkpoints) to OUT; a step
# that fails or runs out of time does not stop the next, and a rerun resumes the grids where they stopped
# (reproduce is idempotent).
#
#   OUT=gpu_out bash benchmarks/gpu_session.sh                  # everything
#   STEPS=tests,stacks bash benchmarks/gpu_session.sh           # some steps
#   DEVICE=cpu NUM_EPISODES=20 STEPS=me16 bash benchmarks/gpu_session.sh   # a smoke test of the plumbing
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
GRID=${GRID:-runs_gpu}              # ignored by git, so a warm machine keeps it between calls
DEVICE=${DEVICE:-cuda}
NUM_EPISODES=${NUM_EPISODES:-10000}
mkdir -p "$OUT"

wanted() { [ -z "${STEPS:-}" ] || [[ ",$STEPS," == *",$1,"* ]]; }

# step NAME SECONDS COMMAND...: COMMAND may be an exported function. SIGINT at the limit, so that training writes
# its checkpoints before it exits.
step() {
    local name=$1 limit=$2 start=$SECONDS code
    shift 2
    wanted "$name" || return 0
    echo "== $name (at most ${limit}s)"
    timeout --signal=INT --kill-after=60 "$limit" bash -c '"$@"' "$name" "$@" > "$OUT/$name.log" 2>&1
    code=$?
    echo "$name: exit $code after $((SECONDS - start))s" | tee -a "$OUT/steps.txt"
}

machine() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    lscpu | grep -E "Model name|^CPU\(s\)"
}

# The small results of a grid: its tables, and each run's record, metrics log and eval report (no checkpoints).
bring_back() {
    local grid=$1 dest=$OUT/$2
    [ -d "$grid" ] || return 0
    mkdir -p "$dest" && dest=$(cd "$dest" && pwd)
    cp "$grid"/results.* "$dest"/ 2>/dev/null
    (cd "$grid" && find . -path './*/*/seed*' \( -name run.json -o -name '*.metrics.jsonl' -o -name eval.log \
        -o -path '*/eval/results.json' \) -print0 | xargs -0 -r cp --parents -t "$dest")
}

grid() { python cli.py reproduce --device "$DEVICE" --num_episodes "$NUM_EPISODES" "$@"; }
table() {
    grid --experiments scan_prim_permutation --variants full,no_memory,no_attention,no_support_loss --seeds 0,1,2 \
        --jobs 4 --out "$GRID/table" &&
    grid --experiments scan_prim_augmentation,scan_around_right,scan_length --seeds 0,1,2 --jobs 3 --out "$GRID/table"
}
export OUT GRID DEVICE NUM_EPISODES
export -f machine grid table

step machine 30 machine
step tests 150 python -m pytest -q tests/test_gpu.py tests/test_model.py -k "cuda or gpu"
step single 90 sh -c "python benchmarks/train.py --device $DEVICE --types ME scan_prim_augmentation --batch_sizes 1 \
    > $OUT/single.json"   # today's single-run path (cuDNN), against the stack's M=1 below
step stacks 120 sh -c "python benchmarks/stacks.py --device $DEVICE --sizes 1 16 64 --steps 20 > $OUT/stacks.json"
step me16 180 grid --experiments ME --seeds 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 --stacked --out "$GRID/me16"
step table 300 table
bring_back "$GRID/me16" me16
bring_back "$GRID/table" table
echo "results in $OUT"
