"""ConfusionMatrix: counts, ignored pixels, the original's IoU formula with an absent class."""
import pytest
import torch

from util.metrics import ConfusionMatrix


def test_hand_made_confusion_matrix():
    # 4 classes; class 3 appears in neither prediction nor target -> IoU 0, still in the mean.
    target = torch.tensor([[0, 0, 1, 1, 2],
                           [2, 255, 255, 0, 7]])  # 255 ignored, 7 is outside [0, 4): ignored too
    pred = torch.tensor([[0, 1, 1, 1, 2],
                         [0, 0, 2, 0, 1]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    expected = torch.tensor([[2, 1, 0, 0],   # true 0: pixels (0,0)->0 (0,1)->1 (1,3)->0
                             [0, 2, 0, 0],   # true 1: two correct
                             [1, 0, 1, 0],   # true 2: (0,4)->2 (1,0)->0
                             [0, 0, 0, 0]])
    assert torch.equal(cm.mat, expected)
    assert cm.n_images == 1
    # class 0: I=2, U=3+3-2=4 -> 50;  class 1: I=2, U=2+3-2=3 -> 66.67;  class 2: I=1, U=2+1-1=2 -> 50
    iou = cm.iou()
    assert iou.tolist() == pytest.approx([50.0, 200 / 3, 50.0, 0.0])
    assert cm.miou() == pytest.approx((50 + 200 / 3 + 50 + 0) / 4)
    assert cm.pixel_acc() == pytest.approx(5 / 7 * 100)


def test_batches_accumulate_and_reduce_once_in_one_process():
    cm = ConfusionMatrix(3)
    pred = torch.randint(0, 3, (2, 5, 6))
    target = torch.randint(0, 3, (2, 5, 6))
    target[0, 0] = 255
    cm.update(pred, target)
    cm.update(pred[0], target[0])
    assert cm.n_images == 3
    assert cm.mat.sum().item() == 3 * 30 - 2 * 6
    before = cm.mat.clone()
    cm.reduce().reduce()  # a no-op without a process group, and idempotent
    assert torch.equal(cm.mat, before)


def test_all_ignored_gives_zeros_and_shape_mismatch_fails():
    cm = ConfusionMatrix(2)
    cm.update(torch.zeros(3, 3, dtype=torch.long), torch.full((3, 3), 255))
    assert cm.miou() == 0.0 and cm.pixel_acc() == 0.0
    with pytest.raises(ValueError, match='shape'):
        cm.update(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long))
