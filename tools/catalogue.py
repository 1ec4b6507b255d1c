"""The one catalogue of the paper's experiments: grid -> cells -> tags -> the paper's keys.

A grid is what `scripts/reproduce.sh <grid>` runs: its cells (dataset, split, method, encoder, the
cell's own overrides, and the tag directory an ablation's run goes under, so it never overwrites
the plain run) and the table `tools/tables.py` lays them out in, with the variant of
`reference/paper_tables.csv` each tag is and the plain runs an ablation is compared with.

    python tools/catalogue.py plan table1 --exp exp --gpus 4 -- lr=1e-5   # what reproduce.sh runs
    python tools/catalogue.py list                                        # every grid and its size

`plan` prints the table's name, then one line per cell still to run: `<tagged> <cell exp dir>
<train.sh arguments>`; finished cells (results.json holding every epoch the config plans) are named
on stderr and left out. A wrong override stops it before any line is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))    # the project root, for `util` and `methods`
import methods  # noqa: E402
from util.config import ConfigError, run_directory  # noqa: E402
from engine.config import load_config  # noqa: E402

DEFAULT_VARIANT = 'default'      # paper_tables.csv's variant of a plain run
SEEDS = (0, 1, 2)                # the classification tables' seeds


@dataclass(frozen=True)
class Cell:
    dataset: str
    split: str
    method: str
    backbone: str = ''                    # '' = the config's
    overrides: tuple[str, ...] = ()       # the cell's own key=value words
    tag: str = ''                         # the run goes under <exp>/<tag>/ ('' = the plain run)

    def words(self) -> list[str]:
        return ([f'backbone={self.backbone}'] if self.backbone else []) + list(self.overrides)


@dataclass(frozen=True)
class Grid:
    name: str                             # scripts/reproduce.sh's argument
    table: str                            # tools/tables.py's table
    kind: str                             # 'paper', 'ablation', 'change', 'seeds' or 'toy'
    title: str
    cells: Callable[['Options'], list[Cell]]
    variants: dict[str, str] = field(default_factory=dict)    # tag -> the csv's variant
    baselines: tuple[tuple[str, str], ...] = ()                 # (method, encoder) plain rows compared with


@dataclass(frozen=True)
class Options:
    overrides: tuple[str, ...] = ()       # the user's key=value words (they win over a cell's)
    with_all: bool = False                # paper grids: add the fully supervised 'all' cells


def grid(dataset: str, splits: str, methods_: str, backbones: str, *overrides: str, tag: str = '') -> list[Cell]:
    """One cell per (encoder, split, method), the encoder outermost so the cheap one finishes first;
    backbone '-' = the config's."""
    return [Cell(dataset, split, method, '' if backbone == '-' else backbone, overrides, tag)
            for backbone in backbones.split() for split in splits.split() for method in methods_.split()]


def paper_grid(dataset: str, splits: str, all_epochs: int) -> Callable[[Options], list[Cell]]:
    def cells(opt: Options) -> list[Cell]:
        out = grid(dataset, splits, 'supervised unimatch_v2', 'dinov2_small dinov2_base')
        if opt.with_all:
            out += grid(dataset, 'all', 'supervised', 'dinov2_small dinov2_base', f'epochs={all_epochs}')
        return out
    return cells


# Figures 5-6: one key swept on two splits per dataset; the default value is the plain run.
SWEEP_SPLITS = (('pascal', '183 732'), ('cityscapes', '1_8 1_4'), ('ade20k', '1_32 1_8'), ('coco', '1_512 1_128'))


def sweep(table: str, key: str, values: tuple[str, ...], default: str) -> Callable[[Options], list[Cell]]:
    def cells(opt: Options) -> list[Cell]:
        out = []
        for value in values:
            tagged = value != default
            for dataset, splits in SWEEP_SPLITS:
                out += grid(dataset, splits, 'unimatch_v2', 'dinov2_base', *([f'{key}={value}'] if tagged else []),
                            tag=f'{table}/{key}={value}' if tagged else '')
        return out
    return cells


def seeds(table: str, *cells_: tuple[str, str]) -> Callable[[Options], list[Cell]]:
    """UniMatch V2 with seeds 0 1 2, each seed its own labeled set and run directory."""
    def cells(opt: Options) -> list[Cell]:
        return [c for seed in SEEDS for dataset, splits in cells_
                for c in grid(dataset, splits, 'unimatch_v2', '-', f'seed={seed}', tag=f'{table}/seed={seed}')]
    return cells


def fixed(*parts: list[Cell]) -> Callable[[Options], list[Cell]]:
    return lambda opt: [c for part in parts for c in part]


def table13(opt: Options) -> list[Cell]:
    """All labels + extra unlabeled images, at the paper's global batches on 4 processes and its
    epochs (facts, section 1); ADE20K reads COCO's images from COCO's data_root."""
    coco_root = load_config(ROOT / 'configs/coco.yaml', list(opt.overrides)).data_root
    return (grid('cityscapes', 'all', 'unimatch_v2', 'dinov2_base', 'epochs=40',
                 'unlabeled_dirs=[leftImg8bit/train_extra]', tag='table13/train_extra')
            + grid('ade20k', 'all', 'unimatch_v2', 'dinov2_base', 'epochs=30', 'batch_size=4',
                   f'unlabeled_root={coco_root}', 'unlabeled_dirs=[train2017]', tag='table13/coco_train2017')
            + grid('ade20k', 'all', 'unimatch_v2', 'dinov2_base', 'epochs=30', 'batch_size=4',
                   f'unlabeled_root={coco_root}', 'unlabeled_dirs=[train2017,unlabeled2017]',
                   tag='table13/coco_train2017+unlabeled2017')
            + grid('coco', 'all', 'unimatch_v2', 'dinov2_base', 'epochs=40', 'unlabeled_dirs=[unlabeled2017]',
                   tag='table13/unlabeled2017'))


def toy(opt: Options) -> list[Cell]:
    return grid('toy', '1_16 1_8 1_4', ' '.join(methods.names()), '-') + grid('toy', 'all', 'supervised', '-')


PASCAL, ADE20K = '92 183 366 732 1464', '1_64 1_32 1_16 1_8 1_4'
CITYSCAPES, COCO = '1_16 1_8 1_4 1_2', '1_512 1_256 1_128 1_64 1_32'
TABLE5 = 'fixmatch unimatch_v1 unimatch_v2'
TABLE6 = 'fixmatch fixmatch_addfeataug fixmatch_dualstream fixmatch_addfeataug_dualstream unimatch_v2'
FROZEN = ('lock_backbone=true',)
# Table 9's lr. The original crops 518 except BEiT-L (512) and BEiT-B / SAM-L on Pascal (512); timm's
# 16-pixel-patch BEiT and SAM take multiples of 16 (BEiT exactly its 512), so every BEiT and SAM cell
# here crops 512: a deviation for ADE20K's BEiT-B, SAM-B, SAM-L and Pascal's SAM-B (docs/paper_tables.md).
OTHER_ENCODERS = ('lr=1e-5', 'lr_multi=10')
ONLINE = ('teacher=online',)
CLASSIFIER = ('comp_drop_at=classifier',)
BASE = (('unimatch_v2', 'dinov2_base'),)

GRIDS = [
    Grid('table1', 'table01', 'paper', 'Table 1: Pascal VOC 2012 (labeled images)', paper_grid('pascal', PASCAL, 60)),
    Grid('table2', 'table02', 'paper', 'Table 2: Cityscapes', paper_grid('cityscapes', CITYSCAPES, 360)),
    Grid('table3', 'table03', 'paper', 'Table 3: ADE20K', paper_grid('ade20k', ADE20K, 120)),
    Grid('table4', 'table04', 'paper', 'Table 4: COCO', paper_grid('coco', COCO, 40)),
    Grid('table5', 'table05', 'paper', 'Table 5: FixMatch and UniMatch V1 vs UniMatch V2', fixed(
        grid('pascal', PASCAL, TABLE5, 'dinov2_base'), grid('ade20k', ADE20K, TABLE5, 'dinov2_base'),
        grid('coco', '1_512 1_256 1_128', TABLE5, 'dinov2_base'))),
    Grid('figure5', 'figure5', 'ablation', 'Figure 5: confidence threshold',
         sweep('figure5', 'conf_thresh', ('0', '0.7', '0.9', '0.95', '0.98'), '0.95'),
         {f'figure5/conf_thresh={t}': f'conf_thresh={t}' for t in ('0', '0.7', '0.9', '0.98')}, BASE),
    Grid('figure6', 'figure6', 'ablation', 'Figure 6: unlabeled loss weight',
         sweep('figure6', 'lossu_weight', ('0.5', '1', '2', '4'), '1'),
         {f'figure6/lossu_weight={w}': f'unlabeled_loss_weight={float(w)}' for w in ('0.5', '2', '4')}, BASE),
    Grid('table06', 'table06', 'ablation', 'Table 6: FixMatch + feature perturbation, + dual stream, + both', fixed(
        grid('pascal', PASCAL, TABLE6, 'dinov2_base'), grid('ade20k', ADE20K, TABLE6, 'dinov2_base')),
         baselines=(('fixmatch', 'dinov2_base'), ('unimatch_v2', 'dinov2_base'))),
    Grid('table07', 'table07', 'ablation', 'Table 7: frozen encoder', fixed(*[
        grid(dataset, splits, 'unimatch_v2', backbone, *FROZEN, tag='table07/frozen')
        for backbone in ('dinov2_small', 'dinov2_base')
        for dataset, splits in (('pascal', PASCAL), ('cityscapes', CITYSCAPES), ('ade20k', ADE20K), ('coco', COCO))]),
         {'table07/frozen': 'frozen_encoder(lock_backbone=True)'},
         (('unimatch_v2', 'dinov2_small'), ('unimatch_v2', 'dinov2_base'))),
    Grid('table08', 'table08', 'ablation', 'Table 8: DINOv2-L', fixed(
        grid('pascal', PASCAL, 'supervised unimatch_v2', 'dinov2_large'),
        grid('ade20k', ADE20K, 'supervised unimatch_v2', 'dinov2_large'))),
    Grid('table09', 'table09', 'ablation', 'Table 9: other encoders (best mIoU of the model, not the EMA, as the paper)',
         fixed(grid('ade20k', '1_64 1_16 1_4', 'unimatch_v2', 'resnet152 mit_b5', *OTHER_ENCODERS, tag='table09'),
               grid('ade20k', '1_64 1_16 1_4', 'unimatch_v2', 'beit_base sam_base sam_large beit_large',
                    *OTHER_ENCODERS, 'crop_size=512', tag='table09'),
               grid('pascal', '183', 'unimatch_v2', 'resnet152 mit_b5', *OTHER_ENCODERS, tag='table09'),
               grid('pascal', '183', 'unimatch_v2', 'sam_base beit_base beit_large sam_large', *OTHER_ENCODERS,
                    'crop_size=512', tag='table09')),
         {'table09': DEFAULT_VARIANT}),
    Grid('table10', 'table10', 'ablation',
         'Table 10: pseudo-labels from the online model (best mIoU of the model, not the EMA)', fixed(
             grid('pascal', '92 183', 'unimatch_v2', 'dinov2_base', *ONLINE, tag='table10/teacher=online'),
             grid('ade20k', '1_64 1_32', 'unimatch_v2', 'dinov2_base', *ONLINE, tag='table10/teacher=online'),
             grid('coco', '1_512 1_256 1_128', 'unimatch_v2', 'dinov2_base', *ONLINE, tag='table10/teacher=online')),
         {'table10/teacher=online': 'noEMA(online_model_as_teacher)'}, BASE),
    # the paper's 8 GPUs at the same lr: twice the batch per process on 4 (scale_lr follows processes)
    Grid('table11', 'table11', 'ablation', 'Table 11: FixMatch with twice the batch and the epochs', fixed(
        grid('pascal', '92 183', 'fixmatch', 'dinov2_base', 'batch_size=8', 'epochs=120', tag='table11/doubled'),
        grid('ade20k', '1_64 1_32', 'fixmatch', 'dinov2_base', 'batch_size=4', 'epochs=120', tag='table11/doubled'),
        grid('coco', '1_512', 'fixmatch', 'dinov2_base', 'batch_size=8', 'epochs=40', tag='table11/doubled')),
         {'table11/doubled': 'fixmatch_doubled_batch_and_epochs'},
         (('fixmatch', 'dinov2_base'), ('unimatch_v2', 'dinov2_base'))),
    Grid('table12', 'table12', 'ablation', 'Table 12: complementary dropout on the classifier input', fixed(
        grid('pascal', '92 183 366 732', 'unimatch_v2', 'dinov2_base', *CLASSIFIER, tag='table12/comp_drop_at=classifier'),
        grid('ade20k', '1_32 1_16', 'unimatch_v2', 'dinov2_base', *CLASSIFIER, tag='table12/comp_drop_at=classifier'),
        grid('coco', '1_256', 'unimatch_v2', 'dinov2_base', *CLASSIFIER, tag='table12/comp_drop_at=classifier')),
         {'table12/comp_drop_at=classifier': 'comp_dropout_at_decoder_classifier'}, BASE),
    Grid('table13', 'table13', 'ablation', 'Table 13: all labels plus extra unlabeled images', table13, {
        'table13/train_extra': 'extra_unlabeled_20K',
        # the csv's log name says 123K; the facts sheet (section 1) has ADE20K + COCO train2017 (118K)
        'table13/coco_train2017': 'extra_unlabeled_123K_COCO',
        'table13/coco_train2017+unlabeled2017': 'extra_unlabeled_241K_COCO',
        'table13/unlabeled2017': 'extra_unlabeled_123K'}),
    Grid('table14', 'table14', 'change', 'Table 14: change detection (changed IoU / OA, best non-EMA epoch as the paper)',
         fixed(grid('levir', '5% 10% 20% 40%', 'supervised unimatch_v2', 'dinov2_small dinov2_base'),
               grid('whu', '20% 40%', 'supervised unimatch_v2', 'dinov2_small dinov2_base'))),
    Grid('toy_cd', 'toy_cd', 'toy', 'toy_cd', fixed(grid('toy_cd', '5% 10% 20% 40%', 'supervised unimatch_v2', '-'))),
    Grid('table15', 'table15', 'seeds', 'Table 15: CIFAR-10 (WRN-28-2)', seeds('table15', ('cifar10', '25_labels_per_class'))),
    Grid('table16', 'table16', 'seeds', "Table 16: STL-10 (USB's WideResNetVar)",
         seeds('table16', ('stl10', '25_labels_per_class'))),
    Grid('table17', 'table17', 'seeds', 'Table 17: SVHN (WRN-28-2)',
         seeds('table17', ('svhn', '4_labels_per_class 25_labels_per_class'))),
    Grid('table18', 'table18', 'seeds', "Table 18: ImageNet-1K (our settings: configs/imagenet.yaml; the paper's log is absent)",
         seeds('table18', ('imagenet', '10%'))),
    Grid('toy', 'toy', 'toy', 'toy', toy),
]
BY_NAME = {g.name: g for g in GRIDS}
BY_TABLE = {g.table: g for g in GRIDS}


# ---- what tools/tables.py reads ------------------------------------------------------------------------

def tables_of(kind: str) -> tuple[str, ...]:
    return tuple(g.table for g in GRIDS if g.kind == kind)


def tags() -> dict[str, tuple[str, str]]:
    """Run directory tag -> (table, the csv's variant), for every ablation tag."""
    return {tag: (g.table, variant) for g in GRIDS for tag, variant in g.variants.items()}


def seed_cells() -> dict[str, tuple[tuple[str, str], ...]]:
    """Seed table -> its (dataset, split) cells, in the grid's order."""
    return {g.table: tuple(dict.fromkeys((c.dataset, c.split) for c in g.cells(Options()))) for g in GRIDS
            if g.kind == 'seeds'}


# ---- what scripts/reproduce.sh runs -----------------------------------------------------------------------

def last_backbone(words: list[str], default: str) -> str:
    """The backbone train.sh resolves: the last backbone= given, else the config's."""
    return next((w.split('=', 1)[1] for w in reversed(words) if w.startswith('backbone=')), default)


def finished(run_dir: Path, planned_epochs: int) -> bool:
    results = run_dir / 'results.json'
    return results.is_file() and json.loads(results.read_text())['epochs'] >= planned_epochs


def plan(grid_: Grid, exp: str, gpus: str | None, opt: Options) -> list[str]:
    """One line per cell still to run: `<tagged 0|1> <cell exp dir> <train.sh arguments>` (the user's
    overrides are the shell's to append); finished cells are named on stderr."""
    lines, configs = [], {}
    for cell in grid_.cells(opt):
        config = ROOT / 'configs' / f'{cell.dataset}.yaml'
        if cell.dataset not in configs:       # a wrong user override stops the grid here
            configs[cell.dataset] = load_config(config, list(opt.overrides))
        words = cell.words()
        cell_exp = f'{exp}/{cell.tag}' if cell.tag else exp
        backbone = last_backbone(words + list(opt.overrides), configs[cell.dataset].backbone)
        run_dir = run_directory(cell_exp, cell.dataset, cell.method, backbone, cell.split)
        planned = load_config(config, [f'method={cell.method}', *words, *opt.overrides]).epochs
        if finished(run_dir, planned):
            print(f'skip {cell.dataset} {cell.split} {cell.method} ({run_dir}: all epochs done)', file=sys.stderr)
            continue
        args = [cell.dataset, cell.split, cell.method, *([gpus] if gpus else []), *words]
        lines.append(' '.join([str(int(bool(cell.tag))), cell_exp, *args]))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest='command', required=True)
    run = sub.add_parser('plan', help="the cells scripts/reproduce.sh runs, after the table's name")
    run.add_argument('grid')
    run.add_argument('--exp', default='exp')
    run.add_argument('--gpus')
    run.add_argument('--with-all', action='store_true', help="paper grids: add the supervised 'all' cells")
    run.add_argument('overrides', nargs='*')
    sub.add_parser('list', help='every grid, its table and its number of cells')
    argv = sys.argv[1:] if argv is None else argv
    words = argv[argv.index('--') + 1:] if '--' in argv else []      # key=value words, as the user gave them
    args = p.parse_args(argv[:argv.index('--')] if '--' in argv else argv)
    overrides = tuple(getattr(args, 'overrides', ())) + tuple(words)
    if args.command == 'list':
        for g in GRIDS:
            print(f'{g.name:<8} {g.table:<8} {g.kind:<9} {len(g.cells(Options())):>4} cells  {g.title}')
        return 0
    if args.grid not in BY_NAME:
        print(f"unknown table '{args.grid}' (one of: {' '.join(BY_NAME)})", file=sys.stderr)
        return 2
    grid_ = BY_NAME[args.grid]
    try:
        lines = plan(grid_, args.exp, args.gpus, Options(overrides, args.with_all))
    except ConfigError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(grid_.table)
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
