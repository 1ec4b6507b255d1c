#!/bin/sh
# Run the grid of one paper table with scripts/train.sh, one cell after another, then tabulate.
#
#   sh scripts/reproduce.sh [--dry-run] <table> [gpus] [key=value ...]
#   sh scripts/reproduce.sh table1 4                               # Pascal grid on 4 GPUs, as the paper
#   sh scripts/reproduce.sh toy 1 epochs=1 max_iters_per_epoch=2   # smoke run of the toy grid
#   sh scripts/reproduce.sh --dry-run table5    # or DRY_RUN=1: print the train.sh commands only
#
# table1 pascal 92..1464, table2 cityscapes 1/16..1/2, table3 ade20k 1/64..1/4, table4 coco
#   1/512..1/32: every split x {supervised, unimatch_v2} x {dinov2_small, dinov2_base}.
#   WITH_ALL=1 adds the fully supervised 'all' cells with the paper's epochs (60/360/120/40).
# table5 fixmatch, unimatch_v1, unimatch_v2 with dinov2_base on Table 5's splits (pascal 92..1464,
#   ade20k 1/64..1/4, coco 1/512..1/128). toy: 1_16 1_8 1_4 x every registered method (`python -m
#   methods`), plus supervised on all.
# Cells whose results.json shows every planned epoch done are skipped; partial ones resume. key=value
# overrides follow each cell's own (backbone=, epochs=), so they win. EXP_DIR as for train.sh. Ends
# with python tools/tables.py, written to <exp>/tables.md.
set -e
usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
[ "$1" = --dry-run ] && { DRY_RUN=1; shift; }
[ $# -ge 1 ] || usage
table=$1; shift
[ "$1" = --dry-run ] && { DRY_RUN=1; shift; }
gpus=
if [ $# -ge 1 ]; then
    case "$1" in
        *=*) ;;
        *[!0-9]*|'') echo "gpus must be a number, got '$1'" >&2; usage ;;
        *) gpus=$1; shift ;;
    esac
fi
cd "$(dirname "$0")/.."
exp=${EXP_DIR:-exp}

# grid DATASET "SPLITS" "METHODS" "BACKBONES" [override ...]: one cell per line, "dataset split
# method override...", backbone outermost so the cheap encoder finishes first; backbone - = config's.
grid() {
    dataset=$1; splits=$2; methods=$3; backbones=$4; shift 4
    for backbone in $backbones; do
        for split in $splits; do
            for method in $methods; do
                b=; [ "$backbone" = - ] || b="backbone=$backbone"
                echo "$dataset $split $method $b $*"
            done
        done
    done
}

paper_grid() {  # DATASET "SPLITS" ALL_EPOCHS
    grid "$1" "$2" "supervised unimatch_v2" "dinov2_small dinov2_base"
    if [ -n "$WITH_ALL" ] && [ "$WITH_ALL" != 0 ]; then
        grid "$1" all supervised "dinov2_small dinov2_base" "epochs=$3"
    fi
}

case "$table" in
    table1) tables=table01; cells=$(paper_grid pascal "92 183 366 732 1464" 60) ;;
    table2) tables=table02; cells=$(paper_grid cityscapes "1_16 1_8 1_4 1_2" 360) ;;
    table3) tables=table03; cells=$(paper_grid ade20k "1_64 1_32 1_16 1_8 1_4" 120) ;;
    table4) tables=table04; cells=$(paper_grid coco "1_512 1_256 1_128 1_64 1_32" 40) ;;
    table5) tables=table05
        methods="fixmatch unimatch_v1 unimatch_v2"
        cells=$(grid pascal "92 183 366 732 1464" "$methods" dinov2_base
                grid ade20k "1_64 1_32 1_16 1_8 1_4" "$methods" dinov2_base
                grid coco "1_512 1_256 1_128" "$methods" dinov2_base) ;;
    toy) tables=toy
        cells=$(grid toy "1_16 1_8 1_4" "$(python -m methods --names)" -
                grid toy all supervised -) ;;
    *) echo "unknown table '$table'" >&2; usage ;;
esac

# done_cell RUN_DIR CONFIG OVERRIDE...: true when results.json holds every epoch the config plans.
done_cell() {
    [ -f "$1/results.json" ] || return 1
    python -c '
import json, sys
from util.config import load_config
done = json.load(open(sys.argv[1] + "/results.json"))["epochs"]
sys.exit(0 if done >= load_config(sys.argv[2], sys.argv[3:]).epochs else 1)' "$@"
}

cellfile=$(mktemp)
trap 'rm -f "$cellfile"' EXIT
echo "$cells" > "$cellfile"
failed=0; config_backbone_of=
while read -r dataset split method extra; do
    config=configs/$dataset.yaml
    # Once per dataset: load its config with the user's overrides, so that a wrong key stops the grid
    # here (set -e) rather than failing every cell, and note the config's backbone.
    if [ "$config_backbone_of" != "$dataset" ]; then
        config_backbone=$(python -m util.config "$config" backbone "$@"); config_backbone_of=$dataset
    fi
    # The backbone train.sh will resolve (for the run directory): the last backbone= given, else the
    # config's.
    backbone=$config_backbone
    # shellcheck disable=SC2086  # $extra is the cell's key=value words
    for arg in $extra "$@"; do case "$arg" in backbone=*) backbone=${arg#backbone=} ;; esac; done
    run_dir=$exp/$dataset/$method/$backbone/$split
    # shellcheck disable=SC2086
    if done_cell "$run_dir" "$config" "method=$method" $extra "$@"; then
        echo "skip $dataset $split $method ($run_dir: all epochs done)" >&2; continue
    fi
    cell="$dataset $split $method${gpus:+ $gpus}${extra:+ $extra}"
    if [ -n "$DRY_RUN" ] && [ "$DRY_RUN" != 0 ]; then
        echo "sh scripts/train.sh $cell${*:+ $*}"
    else
        echo "== reproduce $table: sh scripts/train.sh $cell${*:+ $*}" >&2
        # shellcheck disable=SC2086  # $cell is words without spaces inside
        if ! sh scripts/train.sh $cell "$@" < /dev/null; then
            failed=$((failed + 1)); echo "== failed: $cell" >&2
        fi
    fi
done < "$cellfile"

if [ -n "$DRY_RUN" ] && [ "$DRY_RUN" != 0 ]; then
    echo "python tools/tables.py --exp $exp --tables $tables --out $exp/tables.md"
    exit 0
fi
python tools/tables.py --exp "$exp" --tables "$tables" --out "$exp/tables.md"
if [ "$failed" -gt 0 ]; then echo "$failed cell(s) failed" >&2; exit 1; fi
