"""Parameter counts of the presets, ours beside the paper's, and DINOv3's beside Meta's
(`python -m model --params`)."""
from __future__ import annotations

import torch
from torch import nn

from model.dpt import build_model
from model.presets import DINOV3_PREFIX, DINOV3_PRESETS, META_PARAMS_M, PAPER_PARAMS_M, LibraryPreset, preset


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_model(backbone: str, nclass: int) -> nn.Module:
    """The full-size model on the meta device: shapes only, no memory, no init (seconds)."""
    with torch.device('meta'):
        return build_model(backbone, nclass)


def parameter_table(nclass: tuple[int, ...] = (21, 150)) -> str:
    """Our parameter counts (millions: encoder + decoder = total, per class count) beside the
    paper's, one line per encoder; built on the meta device (no memory, seconds)."""
    lines = [f'{"backbone":14s} {"library model":24s} {"encoder":>8s} ' + ' '.join(
        f'{f"decoder/{n}":>11s} {f"total/{n}":>10s}' for n in nclass) + f' {"paper":>7s} {f"diff/{nclass[-1]}":>9s}']
    for name, paper in PAPER_PARAMS_M.items():
        cells, totals = [], []
        for n in nclass:
            model = meta_model(name, n)
            enc, dec = count(model.backbone) / 1e6, count(model.head) / 1e6
            cells.append(f'{dec:11.3f} {enc + dec:10.3f}')
            totals.append(enc + dec)
        spec = preset(name)[1]
        lib = spec.name if isinstance(spec, LibraryPreset) else 'model/dinov2.py'
        diff = (totals[-1] - paper) / paper * 100
        lines.append(f'{name:14s} {lib:24s} {enc:8.3f} {" ".join(cells)} {paper:7.1f} {diff:+8.2f}%')
    return '\n'.join(lines)


def dinov3_table(nclass: tuple[int, ...] = (21, 150)) -> str:
    """DINOv3 segmentors (millions: encoder, decoder and total per class count), the encoder beside
    Meta's published size; on the meta device (the 7B too)."""
    lines = [f'{"backbone":18s} {"timm model":36s} {"encoder":>9s} {"Meta":>6s} {"diff":>7s} ' + ' '.join(
        f'{f"decoder/{n}":>11s} {f"total/{n}":>10s}' for n in nclass)]
    for size, meta in META_PARAMS_M.items():
        name = f'{DINOV3_PREFIX}{size}'
        cells = []
        for n in nclass:
            model = meta_model(name, n)
            enc, dec = count(model.backbone) / 1e6, count(model.head) / 1e6
            cells.append(f'{dec:11.3f} {enc + dec:10.3f}')
        lines.append(f'{name:18s} {DINOV3_PRESETS[size].timm_name:36s} {enc:9.3f} {meta:5d}M '
                     f'{(enc - meta) / meta * 100:+6.2f}% {" ".join(cells)}')
    return '\n'.join(lines)


def classifier_table(nclass: int = 10) -> str:
    """The classification networks (model/classifiers.py) with `nclass` classes beside the paper's
    counts (FACTS §8)."""
    from model.classifiers import PAPER_PARAMS_M as CLASSIFIER_PARAMS_M, build_classifier
    lines = [f'{"backbone":14s} {f"params/{nclass}":>12s} {"paper":>7s}']
    for name, paper in CLASSIFIER_PARAMS_M.items():
        with torch.device('meta'):
            n = count(build_classifier(name, nclass))
        lines.append(f'{name:14s} {n:12,d} {paper:6.2f}M')
    return '\n'.join(lines)

