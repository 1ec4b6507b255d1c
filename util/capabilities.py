"""What a method can need of the task it runs on, in words both sides use: a method's `needs`
(methods/base.py, read from what it defines) against a task's `provides` (tasks/base.py). A method
runs on a task that gives all it needs (`methods.runs_on`, checked once per run by
`methods.check_run`)."""
from __future__ import annotations

OWN_MODEL = 'a model of its own'             # it builds its model: a head or bottleneck on the DPT segmentor
STEP_HOOKS = 'step hooks on pixel maps'      # it adds to the step through hooks that read per-pixel maps
                                             # (logits, pseudo-labels, CutMix boxes)
