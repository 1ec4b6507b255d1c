"""UniMatch V1 (Yang et al., CVPR'23) on this pipeline: pseudo-labels from the student's own
weak-view prediction (detached, computed in the same forward as the labeled images), two
image-level strong views and a feature-perturbation stream (channel dropout on the weak view's
encoder features), L_u = 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp. No EMA teacher in the step (the EMA is
still kept and evaluated, as for every semi-supervised method here)."""
from __future__ import annotations

from methods.base import Method, register
from methods.step import SemiOptions


@register
class UniMatchV1(Method):
    name = 'unimatch_v1'
    summary = 'two strong views + feature-perturbation stream, V1 weights'
    options = SemiOptions(views=2, comp_drop=False, fp_weight=0.5)     # L_u = 0.25 s1 + 0.25 s2 + 0.5 fp
