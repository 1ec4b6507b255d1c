"""Labeled-only training: the baseline every semi-supervised result is compared with.

As the original: batch size 2x the semi-supervised one, the labeled list repeated to
`labeled_upsample` samples per epoch when it is shorter (3000 for Pascal/Cityscapes), the same
optimizer, schedule and evaluation, no EMA teacher.
"""
from __future__ import annotations

from methods.base import Method, register


@register
class Supervised(Method):
    name = 'supervised'
    summary = 'labeled images only (the baseline)'
    options = None
