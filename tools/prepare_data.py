"""Prepare a dataset from the files its publisher distributes, in the layout the split lists name.

    python tools/prepare_data.py pascal --src VOCtrainval_11-May-2012.tar benchmark.tgz --dst data/pascal
    python tools/prepare_data.py cityscapes --src leftImg8bit_trainvaltest.zip gtFine_trainvaltest.zip --dst data/cityscapes
    python tools/prepare_data.py ade20k --src ADEChallengeData2016.zip --dst data/ade20k
    python tools/prepare_data.py coco --src train2017.zip val2017.zip annotations_trainval2017.zip --dst data/coco
    python tools/prepare_data.py levir --src LEVIR-CD.zip --dst data/levir

Each --src is an archive or the folder it was extracted to. Archives are extracted under
<dst>/.sources/ (removed at the end unless --keep-extracted). Rerunning resumes: finished files are
kept, each output is written to a temporary file and renamed. The run ends by counting every split
list of splits/<dataset>/ against the output and running the same checks as --check-data. Mask
conventions: dataset/prepare/converters.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.checks import DataError  # noqa: E402
from dataset.prepare import DATASETS, prepare  # noqa: E402
from dataset.prepare.core import PrepareError  # noqa: E402

SPLITS_ROOT = Path(__file__).resolve().parents[1] / 'splits'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    sources = '\n'.join(f'  {name:11s} {spec.sources}' for name, spec in DATASETS.items())
    p = argparse.ArgumentParser(description=__doc__ + '\nWhat to download:\n' + sources,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('dataset', choices=DATASETS)
    p.add_argument('--src', nargs='+', required=True, help='archives or extracted folders')
    p.add_argument('--dst', required=True, help='the dataset root, e.g. data/pascal')
    p.add_argument('--splits', default=None, help='split lists to check against (default: splits/<dataset>)')
    p.add_argument('--keep-extracted', action='store_true', help='keep <dst>/.sources/ at the end')
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    splits = Path(args.splits) if args.splits else SPLITS_ROOT / args.dataset
    try:
        prepare(args.dataset, args.src, args.dst, splits, keep_extracted=args.keep_extracted)
    except (PrepareError, DataError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
