"""tools/plot_run.py writes loadable, non-empty PNGs from a run's results.json and config.yaml."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from tests.test_tables import write_run
from tools import plot_run


def png_size(path: Path) -> tuple[int, int]:
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        im.load()
        assert im.format == 'PNG'
        return im.size


def test_semi_run_pictures(tmp_path):
    run = write_run(tmp_path / 'exp', 'toy', 'unimatch_v2', 'dinov2_tiny', '1_16',
                    miou=[10.0, 30.0, 20.0], miou_ema=[12.0, 25.0, 40.0], epochs_total=3, nclass=6)
    written = plot_run.plot_run(run, tmp_path / 'figs')
    assert sorted(p.name for p in written) == ['curves.png', 'per_class_iou.png']
    assert all(p.parent == tmp_path / 'figs' for p in written)
    width, height = png_size(tmp_path / 'figs' / 'curves.png')
    assert width > 3 * height  # three panels side by side: mIoU, losses, mask ratio
    png_size(tmp_path / 'figs' / 'per_class_iou.png')


def test_best_epoch_and_class_names(tmp_path):
    run = write_run(tmp_path / 'exp', 'toy', 'unimatch_v2', 'dinov2_tiny', '1_16',
                    miou=[10.0, 30.0, 20.0], miou_ema=[12.0, 25.0, 40.0], epochs_total=3, nclass=6)
    results, cfg = plot_run.load_run(run)
    # The EMA model's best epoch (2), not the student's (1).
    assert plot_run.best_epoch_iou(results) == ('EMA', 2, [40.0] * 6)
    names = plot_run.run_class_names(results, cfg, 6)
    assert names[0] == 'background' and len(names) == 6 and names[1] != 'class_1'
    assert plot_run.loss_keys(results['history']) == ['loss', 'loss_s1', 'loss_s2', 'loss_u', 'loss_x']


def test_supervised_run_pictures_via_main(tmp_path):
    run = write_run(tmp_path / 'exp', 'pascal', 'supervised', 'dinov2_small', '92',
                    miou=[50.0, 60.0], miou_ema=None, epochs_total=4, nclass=21)
    results, _ = plot_run.load_run(run)
    assert plot_run.best_epoch_iou(results) == ('student', 1, [60.0] * 21)
    plot_run.main([str(run)])
    width, height = png_size(run / 'curves.png')  # written beside results.json by default
    assert width < 3 * height  # two panels: mIoU and losses, no mask ratio for labeled-only runs
    png_size(run / 'per_class_iou.png')


def test_change_detection_run_plots_changed_iou(tmp_path, monkeypatch):
    from tests.test_tables import write_cd_run
    write_cd_run(tmp_path / 'exp', 'toy_cd', 'unimatch_v2', '5%', iou=[40.0, 50.0], oa=[90.0, 92.0],
                 iou_ema=[30.0, 45.0], backbone='dinov2_tiny')
    run = tmp_path / 'exp/toy_cd/unimatch_v2/dinov2_tiny/5%'
    (run / 'config.yaml').write_text('dataset: toy_cd\nnclass: 2\nclass_names: null\n')
    plotted = []
    real = plot_run.series
    monkeypatch.setattr(plot_run, 'series', lambda history, key: plotted.append(key) or real(history, key))
    written = plot_run.plot_run(run, tmp_path / 'figs')
    assert [p.name for p in written] == ['curves.png']      # no per-class IoU in a change run's history
    assert plotted[:2] == ['changed_iou', 'changed_iou_ema']


def test_pseudo_label_diagnostics_picture(tmp_path, monkeypatch):
    """A run with `pseudo_label_stats: true` gets pseudo_labels.png, drawn from its labeller's figures
    (the EMA; the student with teacher: online)."""
    import json
    from util.pseudo_labels import pseudo_label_stats
    run = write_run(tmp_path / 'exp', 'toy', 'unimatch_v2', 'dinov2_tiny', '1_16',
                    miou=[10.0, 30.0], miou_ema=[12.0, 25.0], epochs_total=2, nclass=2)
    res = json.loads((run / 'results.json').read_text())
    for e, h in enumerate(res['history']):
        h['pseudo_labels'] = {'student': pseudo_label_stats([[6, 2], [1, 1]], [[4, 1], [0, 1]]),
                              'ema': pseudo_label_stats([[6, 2], [1, 1]], [[5 - e, 0], [0, 0]])}
    (run / 'results.json').write_text(json.dumps(res))
    drawn = []
    real = plot_run.labeller
    monkeypatch.setattr(plot_run, 'labeller', lambda history, cfg: drawn.append(real(history, cfg)) or drawn[-1])
    written = plot_run.plot_run(run, tmp_path / 'figs')
    assert [p.name for p in written] == ['curves.png', 'per_class_iou.png', 'pseudo_labels.png']
    width, height = png_size(tmp_path / 'figs' / 'pseudo_labels.png')
    assert width > 3 * height and drawn == ['ema']
    (run / 'config.yaml').write_text('dataset: toy\nnclass: 2\nteacher: online\n')
    plot_run.plot_run(run, tmp_path / 'figs')
    assert drawn == ['ema', 'student']
