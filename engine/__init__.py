"""The loop's machinery, for every method and task: a run's set-up (`run`), its data loaders
(`data`), model, optimizer and step (`build`), learning-rate and evaluation schedule (`schedule`),
state, checkpoints and resume (`state`), stop requests (`preemption`), the epoch loop and its
evaluation (`loop`), and how a failed run ends (`failures`). The entry scripts (`unimatch_v2.py`,
`supervised.py`) are the recipes that call it; it stands above `methods/` and `tasks/` and names
no method or task.
"""
