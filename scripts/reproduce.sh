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

# switch_grid TABLE KEY "VALUES" DEFAULT: Figures 5-6, one key swept on two splits per dataset; the
# default value is the plain run (no tag, no override).
switch_grid() {
    for value in $3; do
        o=; [ "$value" = "$4" ] || o="tag=$1/$2=$value $2=$value"
        grid pascal "183 732" unimatch_v2 dinov2_base $o
        grid cityscapes "1_8 1_4" unimatch_v2 dinov2_base $o
        grid ade20k "1_32 1_8" unimatch_v2 dinov2_base $o
        grid coco "1_512 1_128" unimatch_v2 dinov2_base $o
    done
}

# seeds_grid TABLE DATASET "SPLITS": UniMatch V2 with seeds 0 1 2, each under its own tag.
seeds_grid() {
    for seed in 0 1 2; do
        grid "$2" "$3" unimatch_v2 - "tag=$1/seed=$seed" "seed=$seed"
    done
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
    figure5) tables=figure5
        cells=$(switch_grid figure5 conf_thresh "0 0.7 0.9 0.95 0.98" 0.95) ;;
    figure6) tables=figure6
        cells=$(switch_grid figure6 lossu_weight "0.5 1 2 4" 1) ;;
    table06) tables=table06
        methods="fixmatch fixmatch_addfeataug fixmatch_dualstream fixmatch_addfeataug_dualstream unimatch_v2"
        cells=$(grid pascal "92 183 366 732 1464" "$methods" dinov2_base
                grid ade20k "1_64 1_32 1_16 1_8 1_4" "$methods" dinov2_base) ;;
    table07) tables=table07
        frozen="tag=table07/frozen lock_backbone=true"
        cells=$(for backbone in dinov2_small dinov2_base; do
                    grid pascal "92 183 366 732 1464" unimatch_v2 $backbone $frozen
                    grid cityscapes "1_16 1_8 1_4 1_2" unimatch_v2 $backbone $frozen
                    grid ade20k "1_64 1_32 1_16 1_8 1_4" unimatch_v2 $backbone $frozen
                    grid coco "1_512 1_256 1_128 1_64 1_32" unimatch_v2 $backbone $frozen
                done) ;;
    table08) tables=table08
        cells=$(grid pascal "92 183 366 732 1464" "supervised unimatch_v2" dinov2_large
                grid ade20k "1_64 1_32 1_16 1_8 1_4" "supervised unimatch_v2" dinov2_large) ;;
    table09) tables=table09
        # lr 1e-5, lr_multi 10; crop 512 for BEiT-L, and for BEiT-B and SAM-L on Pascal (facts, section 1)
        other="tag=table09 lr=1e-5 lr_multi=10"
        cells=$(grid ade20k "1_64 1_16 1_4" unimatch_v2 "resnet152 mit_b5 beit_base sam_base sam_large" $other
                grid ade20k "1_64 1_16 1_4" unimatch_v2 beit_large $other crop_size=512
                grid pascal 183 unimatch_v2 "resnet152 mit_b5 sam_base" $other
                grid pascal 183 unimatch_v2 "beit_base beit_large sam_large" $other crop_size=512) ;;
    table10) tables=table10
        online="tag=table10/teacher=online teacher=online"
        cells=$(grid pascal "92 183" unimatch_v2 dinov2_base $online
                grid ade20k "1_64 1_32" unimatch_v2 dinov2_base $online
                grid coco "1_512 1_256 1_128" unimatch_v2 dinov2_base $online) ;;
    table11) tables=table11
        # the paper's 8 GPUs at the same lr: twice the batch per process on 4 (scale_lr follows processes)
        cells=$(grid pascal "92 183" fixmatch dinov2_base tag=table11/doubled batch_size=8 epochs=120
                grid ade20k "1_64 1_32" fixmatch dinov2_base tag=table11/doubled batch_size=4 epochs=120
                grid coco 1_512 fixmatch dinov2_base tag=table11/doubled batch_size=8 epochs=40) ;;
    table12) tables=table12
        site="tag=table12/comp_drop_at=classifier comp_drop_at=classifier"
        cells=$(grid pascal "92 183 366 732" unimatch_v2 dinov2_base $site
                grid ade20k "1_32 1_16" unimatch_v2 dinov2_base $site
                grid coco 1_256 unimatch_v2 dinov2_base $site) ;;
    table13) tables=table13
        # the paper's global batches on 4 processes (ADE20K + COCO: 16), its epochs (facts, section 1)
        coco_root=$(python -m util.config configs/coco.yaml data_root "$@")
        cells=$(grid cityscapes all unimatch_v2 dinov2_base tag=table13/train_extra epochs=40 \
                    "unlabeled_dirs=[leftImg8bit/train_extra]"
                grid ade20k all unimatch_v2 dinov2_base tag=table13/coco_train2017 epochs=30 batch_size=4 \
                    "unlabeled_root=$coco_root" "unlabeled_dirs=[train2017]"
                grid ade20k all unimatch_v2 dinov2_base tag=table13/coco_train2017+unlabeled2017 epochs=30 \
                    batch_size=4 "unlabeled_root=$coco_root" "unlabeled_dirs=[train2017,unlabeled2017]"
                grid coco all unimatch_v2 dinov2_base tag=table13/unlabeled2017 epochs=40 \
                    "unlabeled_dirs=[unlabeled2017]") ;;
    table14) tables=table14
        cells=$(grid levir "5% 10% 20% 40%" "supervised unimatch_v2" "dinov2_small dinov2_base"
                grid whu "20% 40%" "supervised unimatch_v2" "dinov2_small dinov2_base") ;;
    toy_cd) tables=toy_cd
        cells=$(grid toy_cd "5% 10% 20% 40%" "supervised unimatch_v2" -) ;;
    table15) tables=table15; cells=$(seeds_grid table15 cifar10 25_labels_per_class) ;;
    table16) tables=table16; cells=$(seeds_grid table16 stl10 25_labels_per_class) ;;
    table17) tables=table17; cells=$(seeds_grid table17 svhn "4_labels_per_class 25_labels_per_class") ;;
    table18) tables=table18; cells=$(seeds_grid table18 imagenet 10%) ;;
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
failed=0
while read -r dataset split method extra; do
    # tag=<dir>: the cell's run goes under <exp>/<dir>/ (an ablation beside the plain run)
    tag=; rest=
    for arg in $extra; do case "$arg" in tag=*) tag=${arg#tag=} ;; *) rest="$rest $arg" ;; esac; done
    extra=${rest# }
    cell_exp=$exp${tag:+/$tag}
    config=configs/$dataset.yaml
    # Once per dataset: load its config with the user's overrides, so that a wrong key stops the grid
    # here (set -e) rather than failing every cell, and note the config's backbone (in cb_<dataset>).
    eval "config_backbone=\${cb_$dataset-}"
    if [ -z "$config_backbone" ]; then
        config_backbone=$(python -m util.config "$config" backbone "$@"); eval "cb_$dataset=\$config_backbone"
    fi
    # The backbone train.sh will resolve (for the run directory): the last backbone= given, else the
    # config's.
    backbone=$config_backbone
    # shellcheck disable=SC2086  # $extra is the cell's key=value words
    for arg in $extra "$@"; do case "$arg" in backbone=*) backbone=${arg#backbone=} ;; esac; done
    run_dir=$cell_exp/$dataset/$method/$backbone/$split
    # shellcheck disable=SC2086
    if done_cell "$run_dir" "$config" "method=$method" $extra "$@"; then
        echo "skip $dataset $split $method ($run_dir: all epochs done)" >&2; continue
    fi
    cell="$dataset $split $method${gpus:+ $gpus}${extra:+ $extra}"
    env=; [ -z "$tag" ] || env="EXP_DIR=$cell_exp "
    if [ -n "$DRY_RUN" ] && [ "$DRY_RUN" != 0 ]; then
        echo "${env}sh scripts/train.sh $cell${*:+ $*}"
    else
        echo "== reproduce $table: ${env}sh scripts/train.sh $cell${*:+ $*}" >&2
        # shellcheck disable=SC2086  # $cell is words without spaces inside
        if ! EXP_DIR=$cell_exp sh scripts/train.sh $cell "$@" < /dev/null; then
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
