"""FixMatch + feature perturbation (the paper's Table 6 / Figure 4a, the original's
`fixmatch_addfeataug` runs): FixMatch's one strong view, whose encoder features get channel
dropout (p 0.5, per image and channel, one mask for the four taps) in the same student forward.
With one stream there is no pair to make complementary, so the dropout is independent."""
from __future__ import annotations

from methods.base import Method, register
from methods.step import SemiOptions


@register
class FixMatchAddFeatAug(Method):
    name = 'fixmatch_addfeataug'
    summary = 'FixMatch, its strong view also feature-perturbed (Table 6)'
    options = SemiOptions(views=1, comp_drop=False, feat_drop=True)
