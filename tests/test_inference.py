"""Inference modes against hand-computed results, with stub models that record what they see."""
import pytest
import torch
from torch import nn

from model.inference import predict, predict_whole, resize_to_patch_multiple, window_starts


class PixelStub(nn.Module):
    """Logits channel k = k * x[:, 0] at the input size (a per-pixel function of the input).
    Records each input's size and the (row, col) stored at its top-left pixel in channels 1, 2."""

    def __init__(self, nclass: int):
        super().__init__()
        self.nclass = nclass
        self.sizes, self.corners = [], []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        self.corners.append((int(x[0, 1, 0, 0]), int(x[0, 2, 0, 0])))
        k = torch.arange(self.nclass, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return k * x[:, :1]


class ColumnStub(nn.Module):
    """Two classes; logit 0 = SLOPE * column index of the model input, logit 1 = 0, whatever the
    pixels (not flip-equivariant)."""
    SLOPE = 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ramp = self.SLOPE * torch.arange(w, dtype=x.dtype, device=x.device).expand(b, 1, h, w)
        return torch.cat((ramp, torch.zeros_like(ramp)), dim=1)


def coords_image(h: int, w: int, b: int = 1) -> torch.Tensor:
    """[b, 3, h, w]: channel 0 a smooth pattern, channels 1 and 2 the row and column index."""
    rows = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    cols = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    pattern = torch.sin(rows / 3) * torch.cos(cols / 5)
    return torch.stack((pattern, rows, cols)).expand(b, 3, h, w).clone()


def test_resize_rule():
    assert resize_to_patch_multiple(100, 150) == (98, 154)
    assert resize_to_patch_multiple(1024, 2048) == (1022, 2044)
    assert resize_to_patch_multiple(500, 375) == (504, 378)
    assert resize_to_patch_multiple(5, 20) == (14, 14)  # never 0 patches


def test_whole_image_resizes_to_patch_multiple_and_back():
    model = PixelStub(3)
    image = coords_image(100, 150)
    image[:, 0] = torch.linspace(0, 1, 150)  # a ramp survives bilinear align_corners=True exactly
    logits = predict_whole(model, image)
    assert model.sizes == [(98, 154)]
    assert logits.shape == (1, 3, 100, 150)
    torch.testing.assert_close(logits[:, 1], image[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[:, 2], 2 * image[:, 0], atol=1e-5, rtol=0)


def test_window_positions_of_the_original():
    assert window_starts(1024, 798) == [0, 226]
    assert window_starts(2048, 798) == [0, 532, 1064, 1250]
    assert window_starts(798, 798) == [0]
    assert window_starts(500, 798) == [0]


def test_sliding_window_cityscapes_size_visits_the_8_windows():
    model = PixelStub(2)
    image = coords_image(1024, 2048)
    image[:, 0] = 0
    probs, valid = predict(model, image, 'sliding_window', 798, nclass=2)
    assert sorted(model.corners) == [(r, c) for r in (0, 226) for c in (0, 532, 1064, 1250)]
    assert set(model.sizes) == {(798, 798)}  # 798 = 57 * 14: no resize
    coverage = torch.zeros(1024, 2048)        # windows per pixel, from the windows the model saw
    for top, left in model.corners:
        coverage[top:top + 798, left:left + 798] += 1
    assert coverage.min() >= 1 and coverage.sum() == 8 * 798 * 798
    assert coverage[0, 0] == 1 and coverage[300, 600] == 4 and coverage[1023, 2047] == 1
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 1024, 2048))   # sums / windows per pixel
    assert valid.all()


def test_sliding_window_sums_softmax_for_150_classes():
    nclass, h, w = 150, 30, 50
    model = PixelStub(nclass)
    image = coords_image(h, w, b=2)
    probs = predict(model, image, 'sliding_window', 28, nclass).probs
    # stride int(28 * 2 / 3) = 18: rows 0, 2 (clamped); cols 0, 18, 22 (clamped)
    assert sorted(model.corners) == [(r, c) for r in (0, 2) for c in (0, 18, 22)]
    row_windows = torch.zeros(h)
    for r in (0, 2):
        row_windows[r:r + 28] += 1
    col_windows = torch.zeros(w)
    for c in (0, 18, 22):
        col_windows[c:c + 28] += 1
    count = row_windows[:, None] * col_windows[None, :]
    k = torch.arange(nclass, dtype=torch.float32).view(1, -1, 1, 1)
    # each window's softmax at a pixel is the same (a per-pixel model): summed over the `count`
    # windows covering it and divided by that count, it is the softmax again
    assert count.min() == 1 and count.max() == 6  # rows 2..27 x cols 22..27
    assert probs.shape == (2, nclass, h, w)
    torch.testing.assert_close(probs, (k * image[:, :1]).softmax(dim=1))


def test_sliding_window_resizes_odd_windows_and_small_images():
    model = PixelStub(2)
    out = predict(model, coords_image(40, 40), 'sliding_window', 30, nclass=2).probs  # 30 is not a multiple of 14
    assert sorted(model.corners) == [(0, 0), (0, 10), (10, 0), (10, 10)]
    assert set(model.sizes) == {(28, 28)}
    assert out.shape == (1, 2, 40, 40)

    model = PixelStub(2)
    out = predict(model, coords_image(20, 25), 'sliding_window', 28, nclass=2).probs  # smaller than the window
    assert model.sizes == [(14, 28)]  # one window: the whole image, resized like `original`
    assert out.shape == (1, 2, 20, 25)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(1, 20, 25))

    with pytest.raises(ValueError, match='nclass'):
        predict(PixelStub(3), coords_image(20, 25), 'sliding_window', 28, nclass=2)


def test_center_crop_scores_only_the_crop():
    model = PixelStub(3)
    image = coords_image(20, 30)
    probs, valid = predict(model, image, 'center_crop', 14, 3)
    assert model.corners == [(3, 8)]  # (20 - 14) // 2, (30 - 14) // 2
    k = torch.arange(3, dtype=torch.float32).view(1, -1, 1, 1)
    assert valid.sum() == 14 * 14 and valid[0, 3:17, 8:22].all()
    torch.testing.assert_close(probs[:, :, 3:17, 8:22], (k * image[:, :1, 3:17, 8:22]).softmax(dim=1))
    assert (probs[:, :, ~valid[0]] == 0).all()

    model = PixelStub(3)  # crop larger than the image along one axis: that axis is kept whole
    _, valid = predict(model, coords_image(10, 40), 'center_crop', 28, 3)
    assert model.corners == [(0, 6)] and model.sizes == [(14, 28)]
    assert valid[0].sum() == 10 * 28


def test_flip_averages_with_the_mirrored_prediction():
    image = torch.zeros(1, 3, 14, 28)
    j = torch.arange(28, dtype=torch.float32)
    p0 = predict(ColumnStub(), image, 'original', 14, 2).probs[0, 0]
    torch.testing.assert_close(p0, torch.sigmoid(ColumnStub.SLOPE * j).expand(14, 28))
    p0 = predict(ColumnStub(), image, 'original', 14, 2, flip=True).probs[0, 0]
    expected = (torch.sigmoid(ColumnStub.SLOPE * j) + torch.sigmoid(ColumnStub.SLOPE * (27 - j))) / 2
    torch.testing.assert_close(p0, expected.expand(14, 28))
    # centre crop: the crop (rows 3..16, cols 13..26 of 20 x 40) is flipped, not the whole image
    probs, valid = predict(ColumnStub(), torch.zeros(1, 3, 20, 40), 'center_crop', 14, 2, flip=True)
    assert valid[0].sum() == 14 * 14 and valid[0, 3:17, 13:27].all()
    torch.testing.assert_close(probs[0, 0, 3:17, 13:27], (torch.sigmoid(ColumnStub.SLOPE * j[:14])
                               + torch.sigmoid(ColumnStub.SLOPE * (13 - j[:14]))).expand(14, 14) / 2)

    image = coords_image(28, 42)  # a per-pixel model is flip-equivariant: flipping changes nothing
    plain = predict(PixelStub(4), image, 'original', 28, 4).probs
    torch.testing.assert_close(predict(PixelStub(4), image, 'original', 28, 4, flip=True).probs, plain)


def test_scales_predict_at_each_size_and_average_probabilities():
    model = PixelStub(3)
    image = torch.full((1, 3, 28, 42), 0.5)
    image[:, 1:] = 0
    probs, valid = predict(model, image, 'original', 28, 3, flip=True, scales=(0.5, 1.0, 2.0))
    assert model.sizes == [(14, 28)] * 2 + [(28, 42)] * 2 + [(56, 84)] * 2
    expected = (torch.arange(3.0) * 0.5).softmax(dim=0).view(1, 3, 1, 1).expand(1, 3, 28, 42)
    torch.testing.assert_close(probs, expected)
    assert valid.all()

    model = PixelStub(3)  # sliding window at scale 0.5: one 14 x 28 window; at 1.0: three windows
    image = torch.full((1, 3, 28, 56), 0.5)
    image[:, 1:] = 0
    probs, _ = predict(model, image, 'sliding_window', 28, 3, scales=(0.5, 1.0))
    assert model.sizes == [(14, 28)] + [(28, 28)] * 3
    expected = (torch.arange(3.0) * 0.5).softmax(dim=0).view(1, 3, 1, 1).expand(1, 3, 28, 56)
    torch.testing.assert_close(probs, expected)

    image = coords_image(30, 45)
    whole = predict_whole(PixelStub(3), image).softmax(dim=1)
    torch.testing.assert_close(predict(PixelStub(3), image, 'original', 28, 3).probs, whole)
    with pytest.raises(ValueError, match='mode'):
        predict(PixelStub(3), image, 'tiles', 28, 3)
