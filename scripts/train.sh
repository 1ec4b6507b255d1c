#!/bin/sh
# Train with the paper's launch: torchrun, one process per GPU (one process on a machine without).
#
#   sh scripts/train.sh <dataset> <split> [method] [gpus] [port] [key=value ...]
#   sh scripts/train.sh toy 1_16                       # built-in data, CPU, minutes
#   sh scripts/train.sh pascal 92                      # UniMatch V2, DINOv2-S, 4 GPUs as the paper
#   sh scripts/train.sh cityscapes 1_16 <method> 8 29501 backbone=dinov2_base
#
# method: any name `python -m methods` lists (default: the config's `method`, UniMatch V2)
# gpus: processes on this node (default: every visible GPU, or 1 without GPUs; more than 1 without
#   GPUs runs that many CPU processes with gloo). The learning rate follows the global batch
#   (lr x gpus / 4, the paper's 4 GPUs); pass scale_lr=false to keep the config's lr.
# Output: exp/<dataset>/<method>/<backbone>/<split>/ (checkpoints, results.json, train.log, out.log);
#   EXP_DIR=dir puts it under dir instead of exp.
set -e
if [ $# -lt 2 ]; then
    sed -n '2,15p' "$0"; exit 2
fi
dataset=$1; split=$2; shift 2
method=; gpus=; port=
for arg in "$@"; do
    case "$arg" in *=*) break ;; esac
    if [ -z "$positional_method" ]; then method=$arg; positional_method=1
    elif [ -z "$gpus" ]; then gpus=$arg
    elif [ -z "$port" ]; then port=$arg
    fi
    shift
done
cd "$(dirname "$0")/.."
config=configs/$dataset.yaml
[ -f "$config" ] || { echo "no config $config" >&2; exit 2; }
[ -z "$method" ] || set -- "method=$method" "$@"
# One Python start: the run directory (the trainer's formula), the process count, a free port; a
# config error ends here with its one line.
settings=$(python -m tools.launch "$config" "$split" --exp "${EXP_DIR:-exp}" ${gpus:+--gpus "$gpus"} \
    ${port:+--port "$port"} "$@") || exit 1
eval "$settings"
echo "training on $dataset/$split with $gpus process(es) -> $save_path"
# A stop request -- SIGTERM or Ctrl-C to this shell's process group (a scheduler, a terminal), or
# to this shell alone (`timeout`, `kill`) -- is for the trainers: they save latest.pth at the
# current iteration and exit 0 (docs/robustness.md). The log writer ignores it; this shell passes
# it on to torchrun and waits for the run to end. The console output is kept in a file outside the
# run directory and added to <run dir>/out.log once the run has begun there (its train.log was
# written): a refused command leaves a finished run's files as they were.
started=$(mktemp); console=$(mktemp); fifo=$(mktemp -u); mkfifo "$fifo"
(trap '' TERM INT; exec tee "$console") < "$fifo" &
tee_pid=$!
torchrun --nproc_per_node="$gpus" --master_addr=127.0.0.1 --master_port="$port" \
    unimatch_v2.py --config "$config" --split "$split" --save-path "$save_path" "$@" > "$fifo" 2>&1 &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM
trap 'kill -INT "$pid" 2>/dev/null' INT
set +e
while :; do    # a trapped signal interrupts `wait`: wait again until torchrun has ended
    wait "$pid"; code=$?
    kill -0 "$pid" 2>/dev/null || break
done
wait "$tee_pid"; rm -f "$fifo"
if [ -n "$(find "$save_path/train.log" -newer "$started" 2>/dev/null)" ]; then
    cat "$console" >> "$save_path/out.log"
fi
rm -f "$console" "$started"
# torchrun exits non-zero when it was signalled itself; the trainers leave `stopped` after a stop.
if [ "$code" -ne 0 ] && [ -f "$save_path/stopped" ]; then
    echo "stopped on request ($(cat "$save_path/stopped")): checkpoint saved; rerun the same command to resume"
    code=0
fi
exit "$code"
