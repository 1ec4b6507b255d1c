"""FixMatch with two strong image views (the paper's Table 6 / Figure 4b, the original's
`fixmatch_dualstream` runs): each view CutMix-ed with its own box and trained on the same
pseudo-labels, L_u the mean of the two; no feature perturbation."""
from __future__ import annotations

from methods.base import Method, register
from methods.step import SemiOptions


@register
class FixMatchDualStream(Method):
    name = 'fixmatch_dualstream'
    summary = 'FixMatch with two strong image views (Table 6)'
    options = SemiOptions(views=2, comp_drop=False)
