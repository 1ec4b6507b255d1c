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
# Ablations (dinov2_base unless said; each cell's run goes to <exp>/<tag>/<dataset>/..., so it never
#   overwrites the plain run; the plain runs they compare with are cells too, without a tag):
#   figure5 conf_thresh 0 0.7 0.9 (0.95) 0.98, figure6 lossu_weight 0.5 (1) 2 4 -- pascal 183 732,
#   cityscapes 1/8 1/4, ade20k 1/32 1/8, coco 1/512 1/128. table06 FixMatch + feature perturbation,
#   + dual stream, + both (vs fixmatch, unimatch_v2): pascal 92..1464, ade20k 1/64..1/4. table07
#   frozen encoder (lock_backbone), S and B, every split of the four datasets. table08 DINOv2-L,
#   supervised and unimatch_v2, pascal and ade20k. table09 other encoders (lr 1e-5, lr_multi 10):
#   ade20k 1/64 1/16 1/4, pascal 183. table10 teacher=online. table11 FixMatch, batch and epochs
#   doubled. table12 comp_drop_at=classifier. table13 all labels + extra unlabeled images:
#   cityscapes + train_extra, ade20k + COCO train2017 (+ unlabeled2017), coco + unlabeled2017.
# table14 change detection: levir 5% 10% 20% 40%, whu 20% 40% x {supervised, unimatch_v2} x
#   {dinov2_small, dinov2_base}, with configs/levir.yaml and whu.yaml (one GPU, online teacher).
# toy_cd: the change-detection toy, 5% 10% 20% 40% x {supervised, unimatch_v2}.
# Classification, UniMatch V2 over seeds 0 1 2 (each seed its own labeled set and run directory,
#   <exp>/<table>/seed=<N>/...): table15 cifar10 25 labels per class, table16 stl10 25, table17 svhn
#   4 and 25, table18 imagenet 10% (our settings: configs/imagenet.yaml).
# The grids, their cells and tags are tools/catalogue.py's (`python tools/catalogue.py list`).
# Cells whose results.json shows every planned epoch done are skipped; partial ones resume. key=value
# overrides follow each cell's own (backbone=, epochs=), so they win. EXP_DIR as for train.sh. Ends
# with python tools/tables.py, written to <exp>/tables.md.
set -e
set -f    # cells hold YAML lists (unlabeled_dirs=[...]): no pathname expansion
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

# The grid's cells, from the one catalogue (tools/catalogue.py): the table's name, then one line per
# cell still to run, "<tagged> <cell exp dir> <train.sh arguments>"; finished cells are named on stderr.
# A wrong key=value stops it before anything runs.
cellfile=$(mktemp)
trap 'rm -f "$cellfile" "$cellfile.cells"' EXIT
with_all=; [ -z "$WITH_ALL" ] || [ "$WITH_ALL" = 0 ] || with_all=--with-all
code=0
python tools/catalogue.py plan "$table" --exp "$exp" ${gpus:+--gpus "$gpus"} $with_all -- "$@" > "$cellfile" || code=$?
[ "$code" -ne 2 ] || usage
[ "$code" -eq 0 ] || exit "$code"
tables=$(sed -n 1p "$cellfile")
sed 1d "$cellfile" > "$cellfile.cells"
failed=0
while read -r tagged cell_exp cell; do
    env=; [ "$tagged" = 0 ] || env="EXP_DIR=$cell_exp "
    if [ -n "$DRY_RUN" ] && [ "$DRY_RUN" != 0 ]; then
        echo "${env}sh scripts/train.sh $cell${*:+ $*}"
    else
        echo "== reproduce $table: ${env}sh scripts/train.sh $cell${*:+ $*}" >&2
        # shellcheck disable=SC2086  # $cell is words without spaces inside
        if ! EXP_DIR=$cell_exp sh scripts/train.sh $cell "$@" < /dev/null; then
            failed=$((failed + 1)); echo "== failed: $cell" >&2
        fi
    fi
done < "$cellfile.cells"

if [ -n "$DRY_RUN" ] && [ "$DRY_RUN" != 0 ]; then
    echo "python tools/tables.py --exp $exp --tables $tables --out $exp/tables.md"
    exit 0
fi
python tools/tables.py --exp "$exp" --tables "$tables" --out "$exp/tables.md"
if [ "$failed" -gt 0 ]; then echo "$failed cell(s) failed" >&2; exit 1; fi
