"""torch.hub entry points: the original's released checkpoints as ready `segmenter.Segmenter`s.

    import torch
    seg = torch.hub.load('/path/to/this/repo', 'unimatch_v2', name='pascal_92_dinov2_base', source='local')
    ids = seg.predict('photo.jpg')          # int64 [H, W] class ids; seg.model is the nn.Module

`name` is a released name as `python predict.py --list-released` prints it
(`pascal_unimatch_v2_92labels_dinov2_base`) or its short form `<dataset>_<split>_<backbone>`
(`pascal_92_dinov2_base`, `levir_5%_dinov2_small`, `ade20k_1_16_dinov2_base`). The file is fetched
once into the cache by model/hub.py (`$SEMISEG_MIRROR` for a local mirror); the other keywords go
to `Segmenter.from_checkpoint` (weights, device, mode, flip, scales, config, overrides).
"""
from __future__ import annotations

dependencies = ['torch', 'torchvision', 'timm', 'numpy', 'PIL', 'yaml', 'tqdm']


def released_name(name: str) -> str:
    """The released name of `name` (itself, or a short `<dataset>_<split>_<backbone>`)."""
    from model.hub import RELEASED, released_remote
    if name in RELEASED:
        return name
    short = {f'{r.dataset}_{r.split}_{r.backbone}': full for full, r in RELEASED.items()}
    if name in short:
        return short[name]
    released_remote(name)       # raises, listing the names
    raise AssertionError('unreachable')


def unimatch_v2(name: str = 'pascal_92_dinov2_base', **kwargs):
    """A released UniMatch V2 checkpoint as a `segmenter.Segmenter` (its `.model` in eval mode)."""
    from model.hub import RELEASED_PREFIX
    from segmenter import Segmenter
    return Segmenter.from_checkpoint(RELEASED_PREFIX + released_name(name), **kwargs)
