"""UniMatch V2 (Yang et al., TPAMI 2025): the EMA teacher labels the weak view; two strong views,
each CutMix-ed, are trained on its confident pixels with complementary channel dropout on their
encoder features. The step itself is `methods.step.semi_step`; this module only names it."""
from __future__ import annotations

from methods.base import Method, register
from methods.step import SemiOptions


@register
class UniMatchV2(Method):
    name = 'unimatch_v2'
    summary = 'EMA teacher, two strong views, complementary dropout (the default)'
    options = SemiOptions(views=2, comp_drop=True)
