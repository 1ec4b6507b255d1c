"""A labeled and an unlabeled batch with fixed CutMix boxes, for the method-specific step tests."""
from __future__ import annotations

import torch

NCLASS = 3
CROP = 28


def fixed_box_batch(b: int = 4, seed: int = 0, boxless: tuple[int, int] | None = None) -> tuple[dict, dict]:
    """Random images and masks; each view's box at a fixed place (`boxless` = (image, view) without
    one); image 0's right columns are padding."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.zeros(b, 2, CROP, CROP, dtype=torch.bool)
    boxes[:, 0, 4:16, 6:20] = True
    boxes[:, 1, 10:26, 2:12] = True
    if boxless is not None:
        boxes[boxless] = False
    valid = torch.ones(b, CROP, CROP, dtype=torch.bool)
    valid[0, :, 20:] = False
    return ({'image': torch.randn(b, 3, CROP, CROP, generator=g),
             'mask': torch.randint(0, NCLASS, (b, CROP, CROP), generator=g)},
            {'image': torch.randn(b, 3, CROP, CROP, generator=g),
             'strong': torch.randn(b, 2, 3, CROP, CROP, generator=g), 'boxes': boxes, 'valid': valid})
