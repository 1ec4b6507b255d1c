"""`python -m model`: the preset table; `python -m model --params`: parameter counts of every
preset with a count in the paper, and of the classification networks, ours beside the paper's
(FACTS §8), and of the DINOv3 segmentors beside Meta's encoder sizes."""
import argparse

from model.params import classifier_table, dinov3_table, parameter_table
from model.presets import DINOV3_PREFIX, DINOV3_PRESETS, ENCODERS, PRESETS

parser = argparse.ArgumentParser(prog='python -m model', description='the model size table')
parser.add_argument('--params', action='store_true', help="print parameter counts: ours and the paper's")
if parser.parse_args().params:
    print(parameter_table())
    print()
    print(classifier_table())
    print()
    print(dinov3_table())
else:
    for name, spec in {**{f'dinov2_{k}': v for k, v in PRESETS.items()},
                       **{f'{DINOV3_PREFIX}{k}': v for k, v in DINOV3_PRESETS.items()}, **ENCODERS}.items():
        print(f'{name:17s} {spec}')
