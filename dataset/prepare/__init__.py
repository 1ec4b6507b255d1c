"""Datasets prepared from their official archives: `prepare(name, srcs, dst)`.

`tools/prepare_data.py` is the command line; `core.py` the shared skeleton (sources, resumable
atomic jobs, the final check); `converters.py` one function per dataset and its conventions.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from dataset import registry
from dataset.checks import check_inputs
from dataset.prepare import converters
from dataset.prepare.core import SOURCES_DIR, PrepareError, open_sources, run_jobs, verify_splits
from dataset.splits import Sample


@dataclass(frozen=True)
class SourceSpec:
    """How a dataset is made from its official archives (its class count and task: dataset/registry.py)."""
    convert: Callable[[Sequence[Path]], list]   # source folders -> jobs
    sources: str                                 # what to download, for --help and errors
    published: str | None = None                 # the archive of it the original's repository holds
                                                 # (tools/prepare_data.py fetches it when no --src is given)


DATASETS = {
    'pascal': SourceSpec(converters.pascal, 'VOCtrainval_11-May-2012.tar and SBD benchmark.tgz'),
    'cityscapes': SourceSpec(converters.cityscapes, 'leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip '
                                                    '(optionally leftImg8bit_trainextra.zip)'),
    'ade20k': SourceSpec(converters.ade20k, 'ADEChallengeData2016.zip'),
    'coco': SourceSpec(converters.coco, 'train2017.zip, val2017.zip and annotations_trainval2017.zip'),
    'levir': SourceSpec(converters.change_detection, "the original's LEVIR-CD.zip", published='LEVIR-CD.zip'),
    'whu': SourceSpec(converters.change_detection, "the original's WHU-CD.zip", published='WHU-CD.zip'),
}


def _segmentation_paths(sample: Sample, role: str) -> list[str]:
    return [sample.image] + ([sample.mask] if sample.mask and role != 'unlabeled' else [])


def _tile_paths(sample: Sample, role: str) -> list[str]:
    return [f'{folder}/{sample.image}' for folder in converters.CD_FOLDERS]


def prepare(name: str, srcs: Sequence[str | Path], dst: str | Path, splits_dir: str | Path,
            keep_extracted: bool = False, log=print) -> int:
    """Convert `srcs` (folders or archives) into `dst`, check the result against the split lists
    in `splits_dir`; returns how many files were written (0 when resuming a finished run)."""
    if name not in DATASETS:
        raise PrepareError(f'unknown dataset {name!r}; choose one of {", ".join(DATASETS)}')
    spec, dst, splits_dir = DATASETS[name], Path(dst), Path(splits_dir)
    facts = registry.get_spec(name)
    roots = open_sources(srcs, dst)
    written = run_jobs(spec.convert(roots), dst, desc=f'prepare {name}')
    log(f'{name}: wrote {written} files into {dst}')
    if facts.task == 'change_detection':
        verify_splits(dst, splits_dir, _tile_paths,
                      lambda split, role: converters.check_change_detection(dst, split), log=log)
    else:
        verify_splits(dst, splits_dir, _segmentation_paths,
                      lambda split, role: check_inputs(dst, {role: split}, facts.nclass, full=True), log=log)
    if not keep_extracted and (dst / SOURCES_DIR).is_dir():
        shutil.rmtree(dst / SOURCES_DIR)
    return written
