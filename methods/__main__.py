"""`python -m methods`: the registered methods, their step, what they add, their config keys, what
they need of a task and the tasks that give it.
`python -m methods --names`: their names on one line (for shell scripts)."""
import dataclasses
import sys

import methods
import tasks

if sys.argv[1:] == ['--names']:
    print(' '.join(methods.names()))
    raise SystemExit(0)
for name, cls in methods.REGISTRY.items():
    steps = 'labeled only' if cls.options is None else \
        f'{cls.options.views} strong view(s){", complementary dropout" if cls.options.comp_drop else ""}' \
        f'{", feature dropout" if cls.options.feat_drop else ""}' \
        f'{", fp stream" if cls.options.fp_weight else ""}'
    keys = ', '.join(f.name for f in dataclasses.fields(cls.Keys)) if cls.Keys else '-'
    needs = ', '.join(sorted(cls.needs())) or 'nothing'
    runs_on = ', '.join(t for t in tasks.names() if methods.runs_on(name, tasks.get(t)))
    print(f'{name:12s} {cls.summary}\n{"":12s} step: {steps}; keys: {keys}'
          f'{"; benchmark recipe" if cls.benchmark_recipe else ""}\n{"":12s} needs: {needs}; tasks: {runs_on}')
