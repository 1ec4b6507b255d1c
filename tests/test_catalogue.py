"""tools/catalogue.py, the one catalogue of experiments that scripts/reproduce.sh runs and
tools/tables.py reads: every cell names a config, a registered method and a shipped split; every
ablation tag is a variant of the paper's csv, and every grid's cells have a paper value to stand
beside (paper grids and ablations); reproduce.sh runs exactly the catalogue's cells.

    python -m pytest tests/test_catalogue.py -q
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import methods
from tools import catalogue, tables

ROOT = Path(__file__).resolve().parents[1]
PAPER = tables.paper_values(ROOT / 'reference' / 'paper_tables.csv')
SHIPPED_SPLITS = ('pascal', 'cityscapes', 'ade20k', 'coco', 'levir', 'whu')   # splits/<dataset>/ in the repository
CELLS = {g.name: g.cells(catalogue.Options(with_all=True)) for g in catalogue.GRIDS}


@pytest.mark.parametrize('grid', catalogue.GRIDS, ids=lambda g: g.name)
def test_every_cell_names_a_config_a_method_and_a_split(grid):
    for cell in CELLS[grid.name]:
        assert (ROOT / 'configs' / f'{cell.dataset}.yaml').is_file(), cell
        assert cell.method in methods.REGISTRY, cell
        if cell.dataset in SHIPPED_SPLITS and cell.split != 'all':
            assert (ROOT / 'splits' / cell.dataset / cell.split / 'labeled.txt').is_file(), cell


@pytest.mark.parametrize('grid', [g for g in catalogue.GRIDS if g.kind == 'ablation'], ids=lambda g: g.name)
def test_every_ablation_tag_is_a_variant_of_the_papers_table(grid):
    tags = {c.tag for c in CELLS[grid.name] if c.tag}
    assert tags <= set(grid.variants), f'{grid.name}: tags tools/tables.py cannot place: {tags - set(grid.variants)}'
    csv_variants = {k[5] for k in PAPER if k[0] == grid.table}
    assert set(grid.variants.values()) <= csv_variants, (grid.name, set(grid.variants.values()) - csv_variants)


@pytest.mark.parametrize('grid', [g for g in catalogue.GRIDS if g.kind in ('paper', 'ablation', 'change')],
                         ids=lambda g: g.name)
def test_every_cell_of_a_paper_grid_has_a_paper_value(grid):
    missing = []
    for cell in CELLS[grid.name]:
        if cell.split == 'all':
            continue                          # WITH_ALL's fully supervised cells: not in the paper's tables
        table, variant = catalogue.tags().get(cell.tag, (grid.table, catalogue.DEFAULT_VARIANT))
        method, variant = (tables.METHOD_VARIANTS[cell.method][1:] if cell.method in tables.METHOD_VARIANTS
                           else (cell.method, variant))
        dataset = tables.CD_DATASETS.get(cell.dataset, cell.dataset)
        encoder = tables.encoder_name(cell.backbone or 'dinov2_small')
        keys = [k for k in PAPER if k[1:] == (dataset, cell.split, encoder, method, variant)]
        if not keys:
            missing.append(f'{cell.dataset} {cell.split} {cell.method} {encoder} {variant}')
    assert not missing, f'{grid.name}: cells without a paper value: {missing}'


def test_seed_grids_run_each_seed_under_its_own_tag():
    for grid in (g for g in catalogue.GRIDS if g.kind == 'seeds'):
        cells = CELLS[grid.name]
        assert {c.tag for c in cells} == {f'{grid.table}/seed={s}' for s in catalogue.SEEDS}
        assert all(f'seed={c.tag.rsplit("=", 1)[1]}' in c.overrides for c in cells)


def test_reproduce_runs_exactly_the_catalogues_cells(tmp_path):
    for name in ('table07', 'table13', 'toy'):
        env = {**os.environ, 'EXP_DIR': str(tmp_path)}
        res = subprocess.run(['sh', 'scripts/reproduce.sh', '--dry-run', name, '4'], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        lines = [ln for ln in res.stdout.splitlines() if 'scripts/train.sh' in ln]
        expected = [(f'EXP_DIR={tmp_path}/{c.tag} ' if c.tag else '')
                    + ' '.join(['sh scripts/train.sh', c.dataset, c.split, c.method, '4', *c.words()])
                    for c in CELLS[name]]
        assert lines == expected
        assert res.stdout.splitlines()[-1].endswith(f'--tables {catalogue.BY_NAME[name].table} --out {tmp_path}/tables.md')


def test_reproduce_usage_lists_every_grid():
    header = (ROOT / 'scripts' / 'reproduce.sh').read_text().split('\nset -e')[0]
    assert all(g.name in header for g in catalogue.GRIDS), [g.name for g in catalogue.GRIDS if g.name not in header]


@pytest.mark.parametrize('grid', catalogue.GRIDS, ids=lambda g: g.name)
def test_every_cell_is_a_valid_run(grid):
    """Each cell's own overrides load: a cell the config check refuses (a crop that is not a multiple
    of its encoder's patch, a method its task cannot run) would fail at launch, hours into a grid."""
    from util.config import ConfigError
    from engine.config import load_config
    refused = []
    for cell in CELLS[grid.name]:
        try:
            load_config(ROOT / 'configs' / f'{cell.dataset}.yaml', [f'method={cell.method}', *cell.words()])
        except ConfigError as err:
            refused.append(f'{cell.dataset} {cell.split} {cell.method} {cell.backbone}: {err}')
    assert not refused, refused
