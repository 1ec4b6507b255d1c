"""FixMatch (Sohn et al., NeurIPS'20) on this pipeline: UniMatch V2's step with one strong view and
no feature dropout (the paper's Table 5 baseline)."""
from __future__ import annotations

from methods.base import Method, register
from methods.step import SemiOptions


@register
class FixMatch(Method):
    name = 'fixmatch'
    summary = 'one strong view, no feature dropout'
    options = SemiOptions(views=1, comp_drop=False)
