#!/bin/sh
#SBATCH --job-name=semiseg
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --signal=TERM@120
#SBATCH --requeue
# Multi-node training under SLURM: one torchrun per node, rendezvous on the first node.
#
#   sbatch --nodes 2 scripts/slurm_train.sh <dataset> <split> [method] [key=value ...]
#   sbatch --nodes 2 --gpus-per-node 8 scripts/slurm_train.sh coco 1_512 <method> backbone=dinov2_base
#
# Each node runs GPUS_PER_NODE processes (default: SLURM_GPUS_ON_NODE, else 4). The learning rate
# follows the global batch (see docs/training.md).
#
# Preemption and time limits: SLURM sends SIGTERM to every process of the job step (not only this
# batch shell) 120 s before the limit, and on preemption. The trainers save latest.pth at the
# current iteration on every rank and exit; the job then requeues itself, and the requeued job
# resumes from latest.pth (so does any resubmission of the same command).
set -e
dataset=$1; split=$2; shift 2
case "$1" in ''|*=*) ;; *) m=$1; shift; set -- "method=$m" "$@" ;; esac
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
config=configs/$dataset.yaml
gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-4}}
master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=${MASTER_PORT:-29500}
settings=$(python -m tools.launch "$config" "$split" --gpus "$gpus" --port "$port" "$@") || exit 1
eval "$settings"          # save_path: the trainer's formula
# The console goes to a file outside the run directory, added to <run dir>/out.log once the run
# has begun there: a refused command leaves a finished run's files as they were.
started=$(mktemp); console=$(mktemp)
code=0
srun --kill-on-bad-exit=1 torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$gpus" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$master:$port" \
    unimatch_v2.py --config "$config" --split "$split" --save-path "$save_path" "$@" \
    > "$console" 2>&1 || code=$?
if [ -n "$(find "$save_path/train.log" -newer "$started" 2>/dev/null)" ]; then
    cat "$console" >> "$save_path/out.log"
else
    cat "$console" >&2
fi
rm -f "$console" "$started"
if [ -f "$save_path/stopped" ]; then       # stopped on request, checkpoint saved: run again later
    echo "stopped ($(cat "$save_path/stopped")); requeueing job $SLURM_JOB_ID" >> "$save_path/out.log"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$code"
