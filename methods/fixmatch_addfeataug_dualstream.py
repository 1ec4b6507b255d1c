"""FixMatch with two strong image views, each feature-perturbed (the paper's Table 6 / Figure 4c,
the original's `fixmatch_addfeataug_dualstream` runs): channel dropout on each view drawn
independently, where UniMatch V2 makes the two views' masks complementary (Figure 4d)."""
from __future__ import annotations

from methods.base import Method, register
from methods.step import SemiOptions


@register
class FixMatchAddFeatAugDualStream(Method):
    name = 'fixmatch_addfeataug_dualstream'
    summary = 'two strong views, each with independent feature dropout (Table 6)'
    options = SemiOptions(views=2, comp_drop=False, feat_drop=True)
