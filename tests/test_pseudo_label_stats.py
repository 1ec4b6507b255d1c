"""Pseudo-label diagnostics (`pseudo_label_stats: true`, docs/diagnostics.md): the figures from
hand-made tensors with known answers, the table and the scalars, the generators left untouched; a
toy run that writes them to results.json and train.log; training bit-identical with the flag on
and off; the one-line error when the unlabeled masks are missing."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import supervised
import unimatch_v2
from dataset.checks import DataError
from util.labels import IGNORE_INDEX
from util.metrics import ConfusionMatrix
from util.pseudo_labels import (confident_targets, format_pseudo_label_table, preserved_rng, pseudo_label_stats,
                                stats_scalars)

ROOT = Path(__file__).resolve().parents[1]
ON = ['pseudo_label_stats=true']


def counts(probs: torch.Tensor, target: torch.Tensor, thresh: float) -> tuple[list, list]:
    """(confusion, confident) of `probs` [B, C, ...] against `target`, as tasks/evaluation.py counts."""
    nclass = probs.shape[1]
    full, confident = ConfusionMatrix(nclass), ConfusionMatrix(nclass)
    full.update(probs.argmax(1), target)
    confident.update(*confident_targets(probs, target, thresh, IGNORE_INDEX))
    return full.mat.tolist(), confident.mat.tolist()


def one_hot_probs(labels: list[int], confs: list[float], nclass: int) -> torch.Tensor:
    """[1, nclass, 1, N]: pixel k predicts labels[k] with probability confs[k], the rest spread evenly."""
    probs = torch.empty(1, nclass, 1, len(labels))
    for k, (c, p) in enumerate(zip(labels, confs)):
        probs[0, :, 0, k] = (1 - p) / (nclass - 1)
        probs[0, c, 0, k] = p
    return probs


def test_figures_from_hand_made_pixels():
    # 10 pixels, 3 classes, threshold 0.9. Truth / pseudo-label / confidence:
    truth = [0, 0, 0, 0, 1, 1, 1, 2, 2, IGNORE_INDEX]
    label = [0, 0, 1, 0, 1, 0, 1, 0, 2, 0]
    conf = [.95, .99, .92, .5, .97, .91, .6, .93, .4, .99]
    probs = one_hot_probs(label, conf, 3)
    target = torch.tensor(truth)[None, None]
    full, confident = counts(probs, target, 0.9)
    # The ignored pixel counts nowhere; confident pixels: 0->0, 0->0, 0->1, 1->1, 1->0, 2->0 (6 of 9).
    assert confident == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert full == [[3, 1, 0], [1, 2, 0], [1, 0, 1]]
    s = pseudo_label_stats(full, confident)
    assert s['pixels'] == 9
    assert s['confident_share'] == pytest.approx(600 / 9)
    assert s['accuracy'] == pytest.approx(300 / 6)
    assert s['precision'][:2] == pytest.approx([200 / 4, 100 / 2]) and s['precision'][2] is None  # nothing labelled 2
    assert s['recall'] == pytest.approx([200 / 3, 50.0, 0.0])
    assert s['confident'] == pytest.approx([75.0, 200 / 3, 50.0])     # 3 of 4, 2 of 3, 1 of 2 pixels confident
    assert s['share'] == pytest.approx([400 / 6, 200 / 6, 0.0])
    assert s['true_share'] == pytest.approx([400 / 9, 300 / 9, 200 / 9])


class SignOfRed(torch.nn.Module):
    """Logits (a, -a) with a = the image's first channel: class 0, confident where a is large."""
    def forward(self, x):
        return torch.stack((x[:, 0], -x[:, 0]), 1)


def test_the_evaluation_counts_confident_pixels():
    """tasks/evaluation.py's pass (the diagnostics' own code path) on a 14 x 14 image: the left half
    confident class 0 (p = 0.9975), the right half class 0 at p = 0.505 (not confident)."""
    from tasks.evaluation import evaluate
    image = torch.zeros(3, 14, 14)
    image[0, :, :7], image[0, :, 7:] = 3.0, 0.01
    mask = torch.zeros(14, 14, dtype=torch.int64)
    mask[0, :7], mask[:, 7:] = 1, 1                   # left: 7 pixels of class 1, 91 of class 0
    mask[5, 10] = IGNORE_INDEX                        # not counted
    res = evaluate(SignOfRed(), [{'image': image, 'mask': mask, 'name': 'x'}], 2, 'original', 14,
                   device=torch.device('cpu'), progress=False, conf_thresh=0.95)
    assert res['confident_confusion'] == [[91, 0], [7, 0]] and res['confusion'] == [[91, 0], [104, 0]]
    s = pseudo_label_stats(res['confusion'], res['confident_confusion'])
    assert s['confident_share'] == pytest.approx(9800 / 195) and s['accuracy'] == pytest.approx(9100 / 98)
    assert s['confident'] == pytest.approx([100.0, 700 / 104])
    assert 'confident_confusion' not in evaluate(SignOfRed(), [{'image': image, 'mask': mask, 'name': 'x'}], 2,
                                                 'original', 14, device=torch.device('cpu'), progress=False)


def test_threshold_is_inclusive_and_nothing_confident_is_none():
    probs = one_hot_probs([1, 1], [0.95, 0.949], 2)
    full, confident = counts(probs, torch.tensor([[[1, 1]]]), 0.95)
    assert confident == [[0, 0], [0, 1]]           # conf >= thresh, as the training step
    s = pseudo_label_stats(full, [[0, 0], [0, 0]])
    assert s['confident_share'] == 0.0 and s['accuracy'] is None and s['precision'] == [None, None]


def test_matrices_that_do_not_belong_together_are_refused():
    with pytest.raises(ValueError, match='same square shape'):
        pseudo_label_stats([[1, 0], [0, 1]], [[1, 0, 0]])
    with pytest.raises(ValueError, match='exceed'):
        pseudo_label_stats([[1, 0], [0, 1]], [[2, 0], [0, 0]])


def test_table_and_scalars():
    s = pseudo_label_stats([[6, 2], [1, 1]], [[4, 1], [0, 1]])
    table = format_pseudo_label_table({'student': s, 'ema': s}, ['bg', 'fg'], 0.95)
    lines = table.splitlines()
    assert lines[0] == 'student: confident 60.00 of 10 labeled pixels (conf >= 0.95), accuracy 83.33'
    assert lines[2].split() == ['0', 'bg', '100.00', '80.00', '62.50', '66.67', '80.00']
    assert lines[3].split() == ['1', 'fg', '50.00', '100.00', '50.00', '33.33', '20.00']
    assert lines[4].startswith('ema: ') and len(lines) == 8
    scalars = stats_scalars({'ema': s}, ['bg', 'fg'])
    assert scalars['ema/accuracy'] == pytest.approx(500 / 6) and scalars['ema/share/fg'] == pytest.approx(100 / 3)
    assert len(scalars) == 2 + 5 * 2


def test_preserved_rng_leaves_every_generator_as_it_was():
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = draws()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with preserved_rng():
        draws(), draws()
    assert draws() == expected


# ---- in a run ---------------------------------------------------------------------------------------

def run(entry, toy, run_dir: Path, extra: list[str], config: str = 'configs/toy.yaml', split: str = '1_16') -> dict:
    entry.main(['--config', str(ROOT / config), '--split', split, '--save-path', str(run_dir)] + toy + extra)
    return json.loads((run_dir / 'results.json').read_text())


def test_a_toy_run_logs_the_stats_each_epoch(toy, tmp_path, monkeypatch):
    import engine.loop
    real, states = engine.loop.pseudo_label_diagnostics, []

    def rng_states():
        return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()

    def recorded(tr, epoch):      # the generators' states around the pass
        before = rng_states()
        out = real(tr, epoch)
        states.append((before, rng_states()))
        return out
    monkeypatch.setattr(engine.loop, 'pseudo_label_diagnostics', recorded)
    res = run(unimatch_v2, toy, tmp_path / 'run', ON + ['epochs=2', 'pseudo_label_stats_images=5'])
    assert len(states) == 2
    for (t0, py0, np0), (t1, py1, np1) in states:
        assert torch.equal(t0, t1) and py0 == py1 and (np0 == np1).all(), 'the pass moved a global generator'
    log = (tmp_path / 'run/train.log').read_text()
    for epoch, entry in enumerate(res['history']):
        stats = entry['pseudo_labels']
        assert set(stats) == {'student', 'ema'}
        for s in stats.values():
            assert s['pixels'] > 0 and 0 <= s['confident_share'] <= 100
            assert len(s['precision']) == len(s['true_share']) == 6
            assert sum(s['true_share']) == pytest.approx(100.0)
        assert f'epoch {epoch} pseudo-labels on 5 unlabeled images (the EMA labels the weak view' in log
    assert log.count(' class         prec  recall    conf   share    true') == 4     # 2 epochs x 2 models
    assert list((tmp_path / 'run/tb').iterdir()), 'no TensorBoard file'


def test_labeled_only_runs_get_the_students(toy, tmp_path):
    res = run(supervised, toy, tmp_path / 'sup', ON + ['epochs=1', 'pseudo_label_stats_images=3'])
    assert set(res['history'][0]['pseudo_labels']) == {'student'}


def test_change_detection_toy_logs_the_stats(tmp_path):
    cd = ['crop_size=42', 'batch_size=2', 'max_iters_per_epoch=1', 'log_interval=1', 'num_workers=0',
          'pretrained=null', 'toy_train=20', 'toy_val=2', f'data_root={tmp_path / "data"}',
          f'splits_root={tmp_path / "splits"}']
    res = run(unimatch_v2, cd, tmp_path / 'cd', ['epochs=1', 'pseudo_label_stats_images=4'], 'configs/toy_cd.yaml', '5%')
    stats = res['history'][0]['pseudo_labels']
    assert set(stats) == {'student', 'ema'} and len(stats['student']['share']) == 2
    assert 'the student labels the weak view' in (tmp_path / 'cd/train.log').read_text()     # teacher: online


def test_the_flag_changes_no_step(toy, tmp_path, on_the_cpu):
    """The masks never reach the loss, and the pass changes nothing the training draws or updates:
    every logged loss and the final weights (student and EMA) are bit-identical, flag on or off."""
    args = ['epochs=2', 'max_iters_per_epoch=2']
    off = run(unimatch_v2, toy, tmp_path / 'off', args)
    on = run(unimatch_v2, toy, tmp_path / 'on', args + ON)
    assert 'pseudo_labels' not in off['history'][0] and 'pseudo_labels' in on['history'][0]
    keys = [k for k in off['history'][0] if k.startswith('loss') or k == 'mask_ratio']
    assert 'loss_u' in keys
    assert [[h[k] for k in keys] for h in off['history']] == [[h[k] for k in keys] for h in on['history']]
    a, b = (torch.load(tmp_path / name / 'latest.pth', weights_only=True) for name in ('off', 'on'))
    for part in ('model', 'model_ema'):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f'{part}.{key} differs with pseudo_label_stats on'


def test_missing_unlabeled_masks_are_one_line_naming_the_file(toy, toy_root, tmp_path, capsys):
    data = tmp_path / 'data'
    shutil.copytree(toy_root / 'data', data)
    unlabeled = (toy_root / 'splits/toy/1_16/unlabeled.txt').read_text().splitlines()
    missing = data / unlabeled[3].split()[1]
    missing.unlink()
    overrides = [o for o in toy if not o.startswith('data_root=')] + [f'data_root={data}']
    with pytest.raises(SystemExit) as exit_:
        run(unimatch_v2, overrides, tmp_path / 'run', ON + ['epochs=1'])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and not (tmp_path / 'run').exists()
    assert err.count('\n') == 0 and str(missing) in err and 'pseudo_label_stats' in err, err
    run(unimatch_v2, overrides, tmp_path / 'run', ['epochs=1'])     # without the flag the run goes


def test_the_check_names_a_line_without_a_mask(toy, toy_root, tmp_path):
    import engine.run
    lines = (toy_root / 'splits/toy/1_16/unlabeled.txt').read_text().splitlines()
    images_only = tmp_path / 'unlabeled.txt'
    images_only.write_text(''.join(line.split()[0] + '\n' for line in lines))
    args = engine.run.parse_args('t', ['--config', str(ROOT / 'configs/toy.yaml'), '--split', '1_16',
                                    '--unlabeled-id-path', str(images_only),
                                    '--labeled-id-path', str(toy_root / 'splits/toy/1_16/labeled.txt'),
                                    *toy, *ON])
    with pytest.raises(DataError, match=rf'^pseudo_label_stats: true needs .*{images_only}:1: .* no mask path '
                                        rf'\(and {len(lines) - 1} more problem\(s\)\)') as err:
        engine.run.setup_run(args)
    assert '\n' not in str(err.value)


def test_classification_counts_images(tmp_path):
    from tests.test_classification import TEST, TRAIN, fast, write_cifar
    write_cifar(tmp_path / 'cifar', TRAIN, TEST)
    res = run(unimatch_v2, fast(tmp_path / 'cifar'), tmp_path / 'cls', ON + ['epochs=1', 'pseudo_label_stats_images=12'],
              'configs/cifar10.yaml', '2_labels_per_class')
    stats = res['history'][0]['pseudo_labels']
    assert set(stats) == {'student', 'ema'} and stats['ema']['pixels'] == 12      # one label per image
    assert 'labeled images (conf >= 0.95)' in (tmp_path / 'cls/train.log').read_text()
