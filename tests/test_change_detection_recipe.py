"""The change-detection labeled-only baseline runs the original's iterations per epoch: its
remote-sensing supervised.py repeats the labeled list to 3000 pairs (FACTS §2, §7), so LEVIR 5%
(356 labeled pairs, the paper's split) trains 3000 // 16 = 187 iterations per epoch at batch 16,
as the Table 14 labeled-only logs show.

    python -m pytest tests/test_change_detection_recipe.py -q
"""
from pathlib import Path
from types import SimpleNamespace

import pytest

import tasks
from engine.config import load_config
from engine.data import epoch_iterations, train_loaders

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('dataset, split, labeled, iterations', [
    ('levir', '5%', 356, 187),       # the table14-levir_cd_labeled_only_5% log: 187 iterations per epoch
    ('levir', '40%', 2848, 187),     # every split below 3000 pairs is repeated to 3000
    ('whu', '20%', 1189, 187),
    ('whu', '40%', 2378, 187),
])
def test_labeled_only_epoch_is_the_originals(dataset, split, labeled, iterations):
    cfg = load_config(ROOT / f'configs/{dataset}.yaml', ['method=supervised', 'num_workers=0'])
    split_file = ROOT / f'splits/{dataset}/{split}/labeled.txt'
    assert len(split_file.read_text().split()) == labeled          # the paper's split sizes (FACTS §2)
    run = SimpleNamespace(cfg=cfg, task=tasks.for_config(cfg), labeled=split_file)
    loaders = train_loaders(run, None)                             # labeled only: one loader at 2 x batch
    assert epoch_iterations(loaders[0], cfg) == iterations        # the old configs: 356 // 16 = 22 on LEVIR 5%
    assert loaders[0].batch_size == 16 and len(loaders[0].dataset) == 3000
