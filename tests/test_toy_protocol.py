"""The built-in toys compare methods under the original's protocol (issue 30, docs/toys.md): labeled-only
training repeats the labeled list to the share of the train set the original's does (FACTS §2: 3000
samples per epoch for Pascal's 10582 train images and for LEVIR-CD's 7120 tiles), at twice the batch,
while the semi-supervised methods iterate over the unlabeled set. Equal steps (the toys' old
`labeled_upsample` of 750 and 560) gave labeled-only training about 7x and 4.5x the original's share."""
import pytest

from dataset import toy
from engine.config import load_config
from engine.data import epoch_samples
from methods.step import SemiOptions

PASCAL_SHARE = 3000 / 10582     # FACTS §2: Pascal supervised, labeled list up-sampled to 3000 of 10582
LEVIR_SHARE = 3000 / 7120       # FACTS §2, §7: 3000 for change detection, of LEVIR-CD's 7120 train tiles


@pytest.mark.parametrize('config, share, split_fraction', [
    ('configs/toy.yaml', PASCAL_SHARE, 1 / 16),
    ('configs/toy_cd.yaml', LEVIR_SHARE, 0.05),
])
def test_labeled_only_sees_the_originals_share_of_the_train_set(config, share, split_fraction):
    cfg = load_config(config)
    n_train = cfg.toy_train if config.endswith('toy_cd.yaml') else toy.N_TRAIN
    n_labeled = round(n_train * split_fraction)
    [(samples, batch)] = epoch_samples(cfg, None, n_labeled)
    assert samples % batch == 0, 'whole labeled-only steps per epoch'
    assert abs(samples - share * n_train) <= batch / 2, (samples, share * n_train)   # the nearest whole step
    # the semi-supervised run iterates over the unlabeled set: several times labeled-only's steps
    (n_u, batch_u), _ = epoch_samples(cfg, SemiOptions(), None, n_train - n_labeled)
    assert (n_u // batch_u) / (samples // batch) > 4
